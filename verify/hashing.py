"""Streaming digests shared by checksum verification and split joining."""
from __future__ import annotations

import hashlib
import mmap
import os
from typing import BinaryIO

import blake3

from weightswarm import interrupt

# Hex digits of each supported digest; also the order in which a digest's length picks its algorithm.
DIGEST_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128, "blake3": 64}

# Big reads keep the per-chunk Python overhead negligible while bounding memory; hashlib and
# zlib drop the GIL on buffers this size, so two threads really use two cores.
CHUNK = 4 << 20
MAP_WINDOW = 16 << 20  # a multiple of the page size, big enough for blake3's threads to share


def new_hasher(algo: str):
    """A fresh hash object for one of DIGEST_HEX_LEN's algorithms (ValueError for others)."""
    if algo == "blake3":
        # blake3 is fast enough to be I/O bound only when it hashes with several threads.
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algo not in DIGEST_HEX_LEN:
        raise ValueError(f"unsupported hash algorithm {algo!r}")
    return hashlib.new(algo)


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


def hash_file(path: str | os.PathLike, algo: str) -> str:
    """Hex digest of a regular file.

    blake3 hashes memory-mapped windows with its threads: as fast as one mapping of the whole file, but a
    window is unmapped before the next, so resident memory stays at one window instead of growing to the
    file's size, and Ctrl-C is seen between windows.
    """
    h = new_hasher(algo)
    if algo == "blake3":
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for offset in range(0, size, MAP_WINDOW):
                interrupt.check()
                with mmap.mmap(f.fileno(), min(MAP_WINDOW, size - offset), access=mmap.ACCESS_READ,
                               offset=offset) as window:
                    h.update(window)
    else:
        with open(path, "rb", buffering=0) as f:
            copy_hashing(f, h)
    return h.hexdigest()
