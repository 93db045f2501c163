"""weightswarm: fetch, verify, convert and seed open model weights released over BitTorrent.

The packages, from the top down (imports only go down; DEVELOPERS.md has the rules):
``weightswarm.cli`` the command line, ``weightswarm.demo``, ``weightswarm.procs`` (commands as subprocesses),
``weightswarm.testbed`` (multi-host swarms), ``weightswarm.distrib`` (BitTorrent and the daemon),
``weightswarm.runner`` (the model), ``weightswarm.convert``, ``weightswarm.verify``, ``weightswarm.formats``
(checkpoint formats) and ``weightswarm.core`` (the ground floor).
"""

__version__ = "0.2.0"
