"""Integrity scrub: re-read the pieces a torrent has and check them against its hashes, at a bounded rate.

Runs in a worker thread (hashlib and pread release the GIL, so the event loop keeps answering), through
verify's one piece verifier and its one manifest check: v1 and hybrid torrents by their SHA-1 pieces,
v2 by their piece layers, and the files of a weightswarm blake3 ``manifest.json`` in the payload too.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from weightswarm.core.errors import InputError
from weightswarm.distrib.torrentfile import Torrent
from weightswarm.formats.manifest import NAME, load_manifest
from weightswarm.verify.manifest import check_files
from weightswarm.verify.pieces import check_pieces


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
    good_pieces: list[int] = field(default_factory=list)  # of those the client lacked: good data on disk
    manifest_mismatches: list[str] = field(default_factory=list)  # files whose blake3 differs from manifest.json
    seconds: float = 0.0

    def report(self) -> dict:
        return {"ok": not (self.bad_pieces or self.manifest_mismatches), "pieces_checked": self.pieces_checked,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "bad_pieces": self.bad_pieces,
                "manifest_mismatches": self.manifest_mismatches}


def scrub(torrent: Torrent, save_path: Path, have: list[bool], limit: RateLimit,
          on_bad: Callable[[int], None], progress: Callable[[int, int], None] | None = None) -> ScrubResult:
    """Check every piece in ``have`` (``on_bad(piece)`` as soon as one fails, from this thread), then the
    pieces the client lacks, whose good data may be back on disk (a repaired file): those that pass are
    listed in ``good_pieces``, so the daemon can re-check and serve them again."""
    start = time.monotonic()
    root = torrent.root(save_path)
    held = [i for i, h in enumerate(have) if h]
    lacking = [i for i, h in enumerate(have) if not h]
    total, done = len(have), 0

    def step(n: int) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    res = check_pieces(root, torrent, held, workers=1, spend=limit.spend, progress=step, on_bad=on_bad)
    missing = check_pieces(root, torrent, lacking, workers=1, spend=limit.spend, progress=step) if lacking else None
    out = ScrubResult(res.checked, res.bytes, res.bad)
    if missing is not None:
        out.pieces_checked += missing.checked
        out.bytes += missing.bytes
        out.good_pieces = sorted(set(lacking) - set(missing.bad))
    if all(have):  # a manifest says nothing useful about files still being downloaded
        out.manifest_mismatches = _check_manifest(root, limit)
    out.seconds = time.monotonic() - start
    return out


def _check_manifest(root: Path, limit: RateLimit) -> list[str]:
    """Files of a top-level weightswarm manifest.json whose size or blake3 differ; [] without one."""
    path = root / NAME
    if not path.is_file():
        return []
    try:
        m = load_manifest(path)
    except InputError:
        return []  # a manifest.json that is not ours: nothing to check against
    return [f.path for f in check_files(root, m, path, workers=1, spend=limit.spend) if f.absent or not f.ok]
