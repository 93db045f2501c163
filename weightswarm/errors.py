"""The one exception hierarchy of weightswarm.

Every error names the file (or source) it is about and the problem, so the CLI can print
``Error: <path>: <problem>`` and pick the exit status from the class alone.
"""
from __future__ import annotations

import os


class WeightswarmError(Exception):
    """Base class: an error about one path (or source) with a one-line problem."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.path}: {problem}")


class InputError(WeightswarmError):
    """Bad input or usage: a file that is not what it claims, an unsafe path, a bad option. Exit 2."""


class TorrentError(InputError):
    """A .torrent, magnet or info-hash that cannot be used."""


class FormatError(InputError):
    """A weight file or params.json that breaks its format's rules."""


class SwarmError(WeightswarmError):
    """The swarm could not deliver (no metadata, no peers before the deadline, disk error). Exit 2."""


class VerificationError(WeightswarmError):
    """The data is wrong: a piece, checksum or tensor does not match. Exit 1."""

    exit_code = 1
