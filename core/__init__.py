"""The ground floor: errors, atomic writes, units, input files, paths, hashing, locks and interrupts.

Nothing here imports any other part of weightswarm; every other package may import this one.
"""
