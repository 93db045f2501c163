"""Integrity scrub: re-read the pieces a torrent has and check them against its hashes, at a bounded rate.

Runs in a worker thread (hashlib and pread release the GIL, so the event loop keeps answering). v1 and
hybrid torrents are checked with their SHA-1 piece hashes, v2-only torrents with their SHA-256 piece layers.
When the payload carries a weightswarm blake3 ``manifest.json``, its files are checked against it too.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import blake3

from distrib.torrentfile import Torrent
from verify.manifest import load_manifest
from verify.paths import confined
from verify.pieces import BLOCK, merkle_root
from weightswarm.errors import InputError

CHUNK = 1 << 20  # manifest files are hashed in chunks this size, so the rate limit applies to them too


class Cancelled(Exception):
    """The daemon is stopping: the scrub ends without a verdict."""


class RateLimit:
    """Sleep so that reads average at most ``rate`` bytes/s (0 = unlimited); a stop cuts the sleep short."""

    def __init__(self, rate: int, stop: threading.Event):
        self.rate, self.stop = rate, stop
        self.next = time.monotonic()

    def spend(self, n: int) -> None:
        if self.stop.is_set():
            raise Cancelled()
        if not self.rate:
            return
        self.next = max(self.next, time.monotonic() - 1.0) + n / self.rate  # at most 1 s of saved-up burst
        delay = self.next - time.monotonic()
        if delay > 0 and self.stop.wait(delay):
            raise Cancelled()


@dataclass
class ScrubResult:
    pieces_checked: int = 0
    bytes: int = 0
    bad_pieces: list[int] = field(default_factory=list)
    manifest_mismatches: list[str] = field(default_factory=list)  # files whose blake3 differs from manifest.json
    seconds: float = 0.0

    def report(self) -> dict:
        return {"ok": not (self.bad_pieces or self.manifest_mismatches), "pieces_checked": self.pieces_checked,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "bad_pieces": self.bad_pieces,
                "manifest_mismatches": self.manifest_mismatches}


def scrub(torrent: Torrent, save_path: Path, have: list[bool], limit: RateLimit,
          on_bad: Callable[[int], None], progress: Callable[[int, int], None] | None = None) -> ScrubResult:
    """Check every piece in ``have``; ``on_bad(piece)`` is called as soon as one fails (from this thread)."""
    start = time.monotonic()
    res = ScrubResult()
    ti, fs = torrent.info, torrent.info.layout()
    expected_v2 = None if torrent.v1 else _v2_piece_hashes(torrent)
    pieces = [i for i, h in enumerate(have) if h]
    fds: dict[int, int] = {}
    try:
        for done, i in enumerate(pieces):
            size = ti.piece_size(i)
            limit.spend(size)
            data, payload = _read_piece(ti, fs, save_path, i, size, fds)
            if data is None:
                ok = False
            elif expected_v2 is None:
                ok = hashlib.sha1(data).digest() == ti.hash_for_piece(i)
            else:
                ok = _v2_ok(data[:payload], expected_v2.get(i))
            res.pieces_checked += 1
            res.bytes += size
            if not ok:
                res.bad_pieces.append(i)
                on_bad(i)
            if progress:
                progress(done + 1, len(pieces))
    finally:
        for fd in fds.values():
            os.close(fd)
    if all(have):  # a manifest says nothing useful about files still being downloaded
        res.manifest_mismatches = _check_manifest(torrent.root(save_path), limit)
    res.seconds = time.monotonic() - start
    return res


def _read_piece(ti, fs, save_path: Path, piece: int, size: int, fds: dict[int, int]) -> tuple[bytes | None, int]:
    """The piece's bytes (pad files read as zeros) and how many of them are file data; None if unreadable."""
    parts, payload = [], 0
    for sl in ti.map_block(piece, 0, size):
        if int(fs.file_flags(sl.file_index)) & int(fs.flag_pad_file):
            parts.append(bytes(sl.size))
            continue
        payload += sl.size
        try:
            fd = fds.get(sl.file_index)
            if fd is None:
                if len(fds) >= 8:  # pieces come in file order: close what is behind us
                    os.close(fds.pop(next(iter(fds))))
                fd = fds[sl.file_index] = os.open(save_path / fs.file_path(sl.file_index), os.O_RDONLY)
            data = os.pread(fd, sl.size, sl.offset)
        except OSError:
            return None, 0
        if len(data) != sl.size:
            return None, 0
        parts.append(data)
    return b"".join(parts), payload


def _v2_piece_hashes(torrent: Torrent) -> dict[int, tuple[bytes, int]]:
    """piece -> (expected SHA-256 piece hash, merkle width in 16 KiB blocks) from the piece layers."""
    ti, fs = torrent.info, torrent.info.layout()
    plen = ti.piece_length()
    layers = torrent.raw.get(b"piece layers", {})
    out = {}
    for f in torrent.payload_files():
        if not f.size:
            continue
        first = f.offset // plen
        root = fs.root(f.index).to_bytes()
        if f.size <= plen:  # a one-piece file: its root is its piece hash, over just its own blocks
            blocks = -(-f.size // BLOCK)
            out[first] = (root, 1 << max(0, (blocks - 1).bit_length()))
            continue
        layer = layers.get(root, b"")
        for k in range(len(layer) // 32):
            out[first + k] = (layer[32 * k:32 * k + 32], plen // BLOCK)
    return out


def _v2_ok(body: bytes, expected: tuple[bytes, int] | None) -> bool:
    """In v2 a piece lies inside one file; its hash covers that file's bytes only (BEP 52)."""
    if expected is None:
        # No piece layer to compare with (a v2-only magnet's metadata carries none): unverifiable, not
        # bad, or every scrub would force a needless full re-check. v1 hashes, where present, still apply.
        return True
    leaves = [hashlib.sha256(body[i:i + BLOCK]).digest() for i in range(0, len(body), BLOCK)]
    return merkle_root(leaves, expected[1]) == expected[0]


def _check_manifest(root: Path, limit: RateLimit) -> list[str]:
    """Files of a top-level weightswarm manifest.json whose size or blake3 differ; [] without one."""
    path = root / "manifest.json"
    if not path.is_file():
        return []
    try:
        m = load_manifest(path)
    except InputError:
        return []  # a manifest.json that is not ours: nothing to check against
    bad = []
    for e in m["files"]:
        try:
            p = confined(root, e["path"], path)
            with open(p, "rb", buffering=0) as f:
                h, n = blake3.blake3(), 0
                while chunk := f.read(CHUNK):
                    limit.spend(len(chunk))
                    h.update(chunk)
                    n += len(chunk)
            ok = n == e["size"] and h.hexdigest() == e["blake3"]
        except (OSError, InputError):
            ok = False
        if not ok:
            bad.append(e["path"])
    return bad
