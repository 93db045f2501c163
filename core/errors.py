"""The one exception hierarchy of weightswarm.

Every error names what it is about (a file, a source, or an option and its value) and the problem, so the
CLI can print ``Error: <what>: <problem>`` and pick the exit status from the class alone:
0 success, 1 the data is wrong, 2 bad input or usage, 3 the swarm did not deliver (a rerun continues).
"""
from __future__ import annotations

import os

_CONTROLS = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 9: "\\t", 13: "\\r", 127: "\\x7f"}


def one_line(text: str) -> str:
    """text with its control characters escaped: what a hostile input puts in a message stays on its line."""
    return text.translate(_CONTROLS)


class WeightswarmError(Exception):
    """Base class: an error about one path (or source) with a one-line problem."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.path}: {problem}")

    @property
    def subject(self) -> str:
        """What the ``Error:`` line names first."""
        return self.path


class InputError(WeightswarmError):
    """Bad input or usage: a file that is not what it claims, an unsafe path, a bad request. Exit 2."""


class OptionError(InputError):
    """An option's value that cannot be used; ``path`` stays empty, the subject is ``--option value``."""

    def __init__(self, option: str, value: object, problem: str, hint: str | None = None):
        self.option, self.value = option, value
        super().__init__("", problem, hint)
        self.args = (f"{self.subject}: {problem}",)

    @property
    def subject(self) -> str:
        return f"{self.option} {self.value}" if self.value not in (None, "") else self.option


class TorrentError(InputError):
    """A .torrent, magnet or info-hash that cannot be used."""


class FormatError(InputError):
    """A weight file, manifest or params.json that breaks its format's rules."""


class Forbidden(InputError):
    """A path outside the folder it must stay in (API status 403)."""


class NotFound(InputError):
    """No such torrent or file (API status 404)."""


class Conflict(InputError):
    """Already registered, or busy (API status 409)."""


class SwarmError(WeightswarmError):
    """The swarm did not deliver before the deadline (no metadata, no peers, no progress). Exit 3: nothing
    that arrived is lost, and the same command continues."""

    exit_code = 3


class VerificationError(WeightswarmError):
    """The data is wrong: a piece, checksum or tensor does not match. Exit 1."""

    exit_code = 1
