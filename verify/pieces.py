"""Re-hash a payload against its torrent: v1 SHA-1 pieces and v2 per-file SHA-256 merkle trees.

Independent of any client state. Each piece is read once and fed to every hash the torrent has, on a
pool of threads (hashlib and pread release the GIL), so both cores work.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from verify.paths import confined
from weightswarm import interrupt
from verify.report import Finding, first_few

BLOCK = 16 * 1024  # BEP 52 leaf size
ZERO = bytes(32)

if TYPE_CHECKING:  # verify needs no BitTorrent code at run time; distrib imports verify
    from distrib.torrentfile import FileEntry, Torrent


def merkle_root(leaves: list[bytes], width: int, pad: bytes = ZERO) -> bytes:
    """Root of a tree of ``width`` leaves (a power of two): ``leaves`` then ``pad`` hashes."""
    layer = leaves + [pad] * (width - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Payload:
    """The v1 byte stream of a torrent (files and pad files end to end), read by piece.

    Each thread keeps at most one file open (its pieces are contiguous, so mostly the same file).
    """

    def __init__(self, root: Path, torrent: Torrent):
        self.plen = torrent.info.piece_length()
        self.files = torrent.files()
        self.offsets = [f.offset for f in self.files]
        self.paths: dict[int, Path] = {}
        self.missing: set[int] = set()
        self._open = threading.local()
        single = len(self.files) == 1 and root.is_file()
        for f in self.files:
            if f.pad:
                continue
            path = root if single else confined(root, f.path, torrent.source)
            # A folder, device or FIFO where a file belongs is as wrong as a missing file, and never opened.
            if not path.is_file() or path.stat().st_size != f.size:
                self.missing.add(f.index)
            elif f.size:
                self.paths[f.index] = path

    def spans(self, start: int, length: int) -> list[tuple[FileEntry, int, int]]:
        """(file, offset in file, length) covering ``length`` bytes from ``start``."""
        out, end = [], start + length
        i = bisect.bisect_right(self.offsets, start) - 1
        while start < end and i < len(self.files):
            f = self.files[i]
            n = min(end, f.offset + f.size) - start
            if n > 0:
                out.append((f, start - f.offset, n))
                start += n
            i += 1
        return out

    def read(self, spans) -> bytes | None:
        """The bytes of the spans, or None if a file is missing or short."""
        parts = []
        for f, off, n in spans:
            if f.pad:
                parts.append(bytes(n))
                continue
            data = os.pread(self._fd(f.index), n, off) if f.index in self.paths else b""
            if len(data) != n:
                return None
            parts.append(data)
        return b"".join(parts)

    def _fd(self, index: int) -> int:
        cur = getattr(self._open, "cur", None)
        if cur and cur[0] == index:
            return cur[1]
        self.release()
        self._open.cur = (index, os.open(self.paths[index], os.O_RDONLY))
        return self._open.cur[1]

    def release(self) -> None:
        """Close this thread's open file, if any."""
        cur = getattr(self._open, "cur", None)
        if cur:
            os.close(cur[1])
            self._open.cur = None

    def covered(self, piece: int) -> list[str]:
        return [f.path for f, _, _ in self.spans(piece * self.plen, self.plen) if not f.pad]


def verify_pieces(root: str | os.PathLike, torrent: Torrent, workers: int = 2,
                  progress: Callable[[int], None] | None = None) -> list[Finding]:
    """One Finding per payload file for each hash family the torrent has ("pieces" v1, "merkle" v2)."""
    root = Path(root)
    ti = torrent.info
    plen, npieces, total = ti.piece_length(), ti.num_pieces(), ti.total_size()
    payload = _Payload(root, torrent)
    v1, v2 = torrent.v1 is not None, torrent.v2 is not None
    # v2 piece hashes per file index, in file order: filled by the workers, then reduced to roots.
    v2_pieces: dict[int, dict[int, bytes]] = {}
    bad_v1: list[int] = []

    def work(lo: int, hi: int) -> tuple[list[int], dict[int, dict[int, bytes]]]:
        try:
            return hash_range(lo, hi)
        finally:
            payload.release()

    def hash_range(lo: int, hi: int) -> tuple[list[int], dict[int, dict[int, bytes]]]:
        bad, layers = [], {}
        for i in range(lo, hi):
            interrupt.check()
            spans = payload.spans(i * plen, min(plen, total - i * plen))
            data = payload.read(spans)
            if v1 and (data is None or hashlib.sha1(data).digest() != ti.hash_for_piece(i)):
                bad.append(i)
            if v2:
                # In v2 and hybrid torrents every piece lies inside one file (pad files align them).
                f, off, n = next(((f, o, n) for f, o, n in spans if not f.pad), (None, 0, 0))
                if f is not None:
                    body = data[:n] if data is not None else None
                    layers.setdefault(f.index, {})[off // plen] = _piece_hash(body, n, plen, f.size)
            if progress:
                progress(min(plen, total - i * plen))
        return bad, layers

    step = max(1, min(64, npieces // (workers * 4) or 1))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for bad, layers in pool.map(lambda lo: work(lo, min(lo + step, npieces)), range(0, npieces, step)):
            bad_v1 += bad
            for k, v in layers.items():
                v2_pieces.setdefault(k, {}).update(v)

    findings = []
    for f in torrent.payload_files():
        first = f.offset // plen
        last = (f.offset + max(f.size, 1) - 1) // plen
        if f.index in payload.missing:
            findings += [Finding(c, f.path, False, "missing or wrong size") for c in ("pieces", "merkle")
                         if (v1 if c == "pieces" else v2)]
            continue
        if v1:
            bad = [i for i in bad_v1 if first <= i <= last]
            findings.append(_v1_finding(f, bad, last - first + 1, payload))
        if v2 and f.size:
            findings.append(_v2_finding(torrent, f, v2_pieces.get(f.index, {}), first, plen))
    return findings


def _piece_hash(body: bytes | None, n: int, plen: int, file_size: int) -> bytes | None:
    """A v2 piece-layer hash (or, for a file of one piece, its root); None when unreadable."""
    if body is None:
        return None
    leaves = [hashlib.sha256(body[i:i + BLOCK]).digest() for i in range(0, n, BLOCK)]
    width = plen // BLOCK if file_size > plen else _pow2(len(leaves))
    return merkle_root(leaves, width)


def _v1_finding(f: FileEntry, bad: list[int], count: int, payload: _Payload) -> Finding:
    if not bad:
        return Finding("pieces", f.path, True, f"{count} SHA-1 piece{'s' if count != 1 else ''} ok")
    return Finding("pieces", f.path, False,
                   first_few([f"piece {i} failed (covers {', '.join(payload.covered(i))})" for i in bad]))


def _v2_finding(torrent: Torrent, f: FileEntry, hashes: dict[int, bytes], first: int, plen: int) -> Finding:
    expected_root = torrent.info.layout().root(f.index).to_bytes()
    n = len(range(0, f.size, plen))
    got = [hashes.get(k) for k in range(n)]
    if f.size <= plen:
        ok = got[0] == expected_root
        return Finding("merkle", f.path, ok, "SHA-256 root ok" if ok else f"piece {first} failed (merkle root)")
    layer = torrent.raw.get(b"piece layers", {}).get(expected_root, b"")
    want = [layer[i:i + 32] for i in range(0, len(layer), 32)]
    bad = [first + k for k in range(n) if got[k] is None or (want and got[k] != want[k])]
    if not bad and None not in got:
        pad = merkle_root([], plen // BLOCK)
        if merkle_root(got, _pow2(n), pad) == expected_root:
            return Finding("merkle", f.path, True, f"SHA-256 root and {n} piece hashes ok")
        return Finding("merkle", f.path, False, "merkle root mismatch (the piece layer itself is wrong)")
    return Finding("merkle", f.path, False, first_few([f"piece {i} failed" for i in bad]))
