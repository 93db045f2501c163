"""Exclusive locks on a state folder, so two processes never drive the same torrent or daemon state."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from weightswarm.core.errors import InputError


def lock_exclusive(path: str | os.PathLike, subject: str | os.PathLike, busy: str) -> IO:
    """Lock PATH (created if absent) without waiting; InputError(subject, busy) if another process holds it.
    The lock lasts until the returned file is closed (or the process ends, even by kill -9)."""
    f = open(Path(path), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(subject, busy) from None
    return f
