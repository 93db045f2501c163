"""Writes that never leave a half-written file under its final name: temp name, fsync, rename."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def temp_path(dest: str | os.PathLike) -> Path:
    """A hidden name beside DEST, on the same filesystem so the final rename is atomic."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{os.getpid()}.tmp")


def naming(e: OSError, dest: str | os.PathLike) -> OSError:
    """The error with DEST as its file when it names none (a failed write or fsync: ENOSPC, EIO)."""
    if e.filename is None:
        return OSError(e.errno, e.strerror, os.fspath(dest))
    return e


def commit(f: BinaryIO, dest: str | os.PathLike) -> Path:
    """Make the temp file ``f`` durable, close it and give it its final name."""
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    except OSError as e:
        raise naming(e, dest) from None
    os.replace(f.name, dest)
    return Path(dest)


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file beside DEST; on success commit it to DEST, else delete it."""
    tmp = temp_path(dest)
    try:
        f = open(tmp, "wb")
    except OSError as e:  # name the file the user asked for, not our temp name
        raise OSError(e.errno, e.strerror, os.fspath(dest)) from None
    try:
        yield f
        commit(f, dest)
    except OSError as e:
        discard(f)
        raise naming(e, dest) from None
    except BaseException:
        discard(f)
        raise
    fsync_dir(Path(dest).parent)


def discard(f: BinaryIO) -> None:
    """Close and delete a temp file whose writing failed (its buffer may not flush: the disk may be full)."""
    with contextlib.suppress(OSError):
        f.close()
    Path(f.name).unlink(missing_ok=True)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(dest) as f:
        f.write(data)
    return Path(dest)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
