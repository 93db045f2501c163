"""Checkpoint formats, without torch: safetensors, torch.save zips, split parts, params.json and config.json,
the layouts a checkpoint comes in, the per-expert layout's names and the manifest.

Readers here treat every file as hostile: declared sizes are checked against the file before anything is
allocated, and pickles are read by a restricted unpickler that builds byte ranges, never objects.
"""
