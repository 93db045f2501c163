"""Streaming digests of files and buffers: checksum files, manifests, scrubs, split joins and the converter.

Big reads keep the per-chunk Python overhead negligible while bounding memory; hashlib and zlib drop the
GIL on buffers this size, so two threads really use two cores.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from typing import BinaryIO

import blake3

from weightswarm.core import interrupt
from weightswarm.core.inputs import open_regular

# Hex digits of each supported digest; also the order in which a digest's length picks its algorithm.
DIGEST_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128, "blake3": 64}
CHUNK = 4 << 20
MAP_WINDOW = 16 << 20  # a multiple of the page size, big enough for blake3's threads to share
# Below this, starting blake3's threads costs more than they save.
BLAKE3_THREADS_FROM = 1 << 20

Spend = Callable[[int], None]  # called before each chunk is read: a rate limit, or a stop, raises


def new_hasher(algo: str, size: int | None = None):
    """A fresh hash object for one of DIGEST_HEX_LEN's algorithms (ValueError for others); ``size``, the
    number of bytes it will see when known, lets blake3 skip its threads for small inputs."""
    if algo == "blake3":
        threads = blake3.blake3.AUTO if size is None or size >= BLAKE3_THREADS_FROM else 1
        return blake3.blake3(max_threads=threads)
    if algo not in DIGEST_HEX_LEN:
        raise ValueError(f"unsupported hash algorithm {algo!r}")
    return hashlib.new(algo)


def blake3_hex(data) -> str:
    """blake3 of a buffer (a tensor's raw bytes)."""
    h = new_hasher("blake3", memoryview(data).nbytes)
    h.update(data)
    return h.hexdigest()


def copy_hashing(src: BinaryIO, hasher=None, dest: BinaryIO | None = None) -> int:
    """Feed src to hasher (if any) and dest (if any) chunk by chunk; returns the number of bytes."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        interrupt.check()
        n = src.readinto(view)
        if not n:
            return total
        if hasher is not None:
            hasher.update(view[:n])
        if dest is not None:
            dest.write(view[:n])
        total += n


def hash_file(path: str | os.PathLike, algo: str, spend: Spend | None = None) -> str:
    """Hex digest of a regular file (InputError for anything else).

    blake3 hashes memory-mapped windows with its threads: as fast as one mapping of the whole file, but a
    window is unmapped before the next, so resident memory stays at one window instead of growing to the
    file's size, and Ctrl-C (or ``spend``) is seen between windows.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        h = new_hasher(algo, size)
        if algo != "blake3":
            buf = bytearray(CHUNK)
            while n := f.readinto(buf):
                interrupt.check()
                if spend:
                    spend(n)
                h.update(memoryview(buf)[:n])
            return h.hexdigest()
        for offset in range(0, size, MAP_WINDOW):
            interrupt.check()
            n = min(MAP_WINDOW, size - offset)
            if spend:
                spend(n)
            with mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=offset) as window:
                h.update(window)
    return h.hexdigest()
