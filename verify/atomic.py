"""Writes that never leave a half-written file under its final name: temp name, fsync, rename."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file beside DEST; on success fsync it and rename it to DEST, else delete it."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_open(dest) as f:
        f.write(data)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
