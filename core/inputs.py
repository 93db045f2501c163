"""Reading files a user or a peer handed us: regular files only, within a size bound, one error per failure.

A character device reports ``st_size`` 0 and never ends (``/dev/zero``), a FIFO blocks its reader until a
writer comes: both are refused before a byte is read. The bound is checked against what is read, not only
against what ``stat`` says, so a file that grows while it is read cannot take more memory than the bound.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from typing import BinaryIO

from weightswarm.core.errors import FormatError, InputError

KINDS = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
JSON_LIMIT = 64 << 20  # params, configs, indexes and manifests are kilobytes; a 93 GB model's manifest ~1 MB


def os_problem(e: OSError) -> str:
    """An OS error as a short problem text: ``no such file``, ``permission denied``, ``no space left``."""
    known = {errno.ENOENT: "no such file or folder", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "disk quota exceeded", errno.EISDIR: "is a folder", errno.ENOTDIR: "not a folder",
             errno.EROFS: "read-only file system", errno.EFBIG: "file too large for this system",
             errno.ELOOP: "too many levels of symbolic links", errno.ENAMETOOLONG: "name too long"}
    return known.get(e.errno, (e.strerror or str(e)).lower())


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open PATH for reading if it is a regular file (symlinks followed); InputError naming it otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(path, os_problem(e)) from None
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise InputError(path, f"is {KINDS.get(kind, 'not a regular file')}, not a {what}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise InputError(path, f"is {size} bytes, too large for a {what} (at most {limit})")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(path, f"grew past {limit} bytes while it was read: too large for a {what}")
    return data


def read_json(path: str | os.PathLike, limit: int = JSON_LIMIT):
    """A JSON document from a regular file; FormatError naming the file for anything that is not one."""
    try:
        data = read_regular(path, limit, "JSON file")
    except InputError as e:
        raise FormatError(path, e.problem) from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(path, f"not valid JSON: not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise FormatError(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise FormatError(path, f"not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(path, "not valid JSON: nested too deeply") from None
