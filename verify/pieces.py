"""Re-hash a payload against its torrent: v1 SHA-1 pieces and v2 per-file SHA-256 merkle trees.

Independent of any client state, and the one piece verifier: ``verify --torrent`` checks every piece on a
pool of threads (hashlib and pread release the GIL, so both cores work); the daemon's scrubs check the
pieces a torrent has, one thread, at a bounded rate. Each piece is read once and fed to every hash the
torrent has.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from weightswarm.core import interrupt
from weightswarm.core.hashing import Spend
from weightswarm.core.paths import confined
from weightswarm.verify.report import Finding, first_few

BLOCK = 16 * 1024  # BEP 52 leaf size
ZERO = bytes(32)

if TYPE_CHECKING:  # verify needs no BitTorrent code at run time; distrib imports verify
    from weightswarm.distrib.torrentfile import FileEntry, Torrent


def merkle_root(leaves: list[bytes], width: int, pad: bytes = ZERO) -> bytes:
    """Root of a tree of ``width`` leaves (a power of two): ``leaves`` then ``pad`` hashes."""
    layer = leaves + [pad] * (width - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for 0)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


class _Payload:
    """The v1 byte stream of a torrent (files and pad files end to end), read by piece.

    Each thread keeps at most one file open (its pieces are contiguous, so mostly the same file).
    """

    def __init__(self, root: Path, torrent: Torrent):
        self.plen = torrent.info.piece_length()
        self.total = torrent.info.total_size()
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

    def spans(self, piece: int) -> list[tuple[FileEntry, int, int]]:
        """(file, offset in file, length) covering the piece."""
        start = piece * self.plen
        out, end = [], min(start + self.plen, self.total)
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
        """The bytes of the spans, or None if a file is missing, short or unreadable."""
        parts = []
        for f, off, n in spans:
            if f.pad:
                parts.append(bytes(n))
                continue
            try:
                data = os.pread(self._fd(f.index), n, off) if f.index in self.paths else b""
            except OSError:
                return None
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
        return [f.path for f, _, _ in self.spans(piece) if not f.pad]


@dataclass
class PieceResult:
    checked: int = 0
    bytes: int = 0
    bad: list[int] = field(default_factory=list)  # sorted: a hash differs, or the piece cannot be read
    v2_hashes: dict[int, dict[int, bytes | None]] = field(default_factory=dict)  # file index -> {k: hash}


def check_pieces(root: str | os.PathLike, torrent: Torrent, pieces: Iterable[int] | None = None, workers: int = 2,
                 spend: Spend | None = None, progress: Callable[[int], None] | None = None,
                 on_bad: Callable[[int], None] | None = None) -> PieceResult:
    """Hash ``pieces`` (default: all) of the payload at root against every hash family the torrent has.

    A v2 piece is compared with its piece layer (or, for a one-piece file, the file's root); without
    layers (a magnet's metadata) the v1 hash, where present, still applies, and verify_pieces checks
    whole files against their roots. ``spend(n)`` is called before each piece is read (a rate limit or a
    stop raises there), ``progress(n)`` after, ``on_bad(piece)`` as soon as a piece fails."""
    root = Path(root)
    ti = torrent.info
    payload = _Payload(root, torrent)
    v1, v2 = torrent.v1 is not None, torrent.v2 is not None
    owner = _piece_owners(torrent) if v2 else {}
    wanted = list(range(ti.num_pieces()) if pieces is None else pieces)
    result = PieceResult()
    lock = threading.Lock()

    def one(i: int) -> None:
        interrupt.check()
        spans = payload.spans(i)
        size = sum(n for _, _, n in spans)
        if spend:
            spend(size)
        data = payload.read(spans)
        ok = data is not None
        if ok and v1:
            ok = hashlib.sha1(data).digest() == ti.hash_for_piece(i)
        if v2 and i in owner:
            f, k = owner[i]
            # The file's bytes open the piece; pad bytes after them are not part of its v2 hash.
            n = next((n for g, _, n in spans if g.index == f.index), None)
            body = None if data is None or n is None else data[:n]
            got = _piece_hash(body, torrent.info.piece_length(), f.size)
            want = _expected_v2(torrent, f, k)
            ok = ok and got is not None and (want is None or got == want)
            with lock:
                result.v2_hashes.setdefault(f.index, {})[k] = got
        with lock:
            result.checked += 1
            result.bytes += size
            if not ok:
                result.bad.append(i)
        if not ok and on_bad:
            on_bad(i)
        if progress:
            progress(size)

    def run(chunk: list[int]) -> None:
        try:
            for i in chunk:
                one(i)
        finally:
            payload.release()

    step = max(1, min(64, len(wanted) // (workers * 4) or 1))
    chunks = [wanted[j:j + step] for j in range(0, len(wanted), step)]
    if workers <= 1:
        for c in chunks:
            run(c)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, chunks))
    result.bad.sort()
    return result


def _piece_owners(torrent: Torrent) -> dict[int, tuple[FileEntry, int]]:
    """piece -> (the one file it holds, its index in that file): in v2 every piece lies inside one file."""
    out = {}
    for f in torrent.payload_files():
        for k, piece in enumerate(torrent.file_pieces(f)):
            out[piece] = (f, k)
    return out


def _piece_hash(body: bytes | None, plen: int, file_size: int) -> bytes | None:
    """A v2 piece-layer hash (or, for a file of one piece, its root); None when unreadable."""
    if body is None:
        return None
    leaves = [hashlib.sha256(body[i:i + BLOCK]).digest() for i in range(0, len(body), BLOCK)]
    return merkle_root(leaves, plen // BLOCK if file_size > plen else pow2(len(leaves)))


def _expected_v2(torrent: Torrent, f: FileEntry, k: int) -> bytes | None:
    if f.size <= torrent.info.piece_length():
        return torrent.pieces_root(f)
    layer = torrent.layers.get(torrent.pieces_root(f))
    return layer[k] if layer else None


def verify_pieces(root: str | os.PathLike, torrent: Torrent, workers: int = 2,
                  progress: Callable[[int], None] | None = None) -> list[Finding]:
    """One Finding per payload file for each hash family the torrent has ("pieces" v1, "merkle" v2)."""
    root = Path(root)
    payload = _Payload(root, torrent)
    res = check_pieces(root, torrent, workers=workers, progress=progress)
    v1, v2 = torrent.v1 is not None, torrent.v2 is not None
    findings = []
    for f in torrent.payload_files():
        if f.index in payload.missing:
            findings += [Finding(c, f.path, False, "missing or wrong size") for c in ("pieces", "merkle")
                         if (v1 if c == "pieces" else v2)]
            continue
        plen = torrent.info.piece_length()
        # An empty file still "covers" the piece it would start (v1 counts it as one piece).
        pieces = torrent.file_pieces(f) or range(f.offset // plen, f.offset // plen + 1)
        bad = [i for i in res.bad if pieces.start <= i < pieces.stop]
        if v1:
            findings.append(_v1_finding(f, bad, len(pieces), payload))
        if v2 and f.size:
            findings.append(_v2_finding(torrent, f, res.v2_hashes.get(f.index, {})))
    return findings


def _v1_finding(f: FileEntry, bad: list[int], count: int, payload: _Payload) -> Finding:
    if not bad:
        return Finding("pieces", f.path, True, f"{count} SHA-1 piece{'s' if count != 1 else ''} ok")
    return Finding("pieces", f.path, False,
                   first_few([f"piece {i} failed (covers {', '.join(payload.covered(i))})" for i in bad]))


def _v2_finding(torrent: Torrent, f: FileEntry, hashes: dict[int, bytes | None]) -> Finding:
    plen = torrent.info.piece_length()
    n = len(torrent.file_pieces(f))
    first = f.offset // plen
    got = [hashes.get(k) for k in range(n)]
    want = [_expected_v2(torrent, f, k) for k in range(n)]
    mismatched = [first + k for k in range(n) if got[k] is None or (want[k] is not None and got[k] != want[k])]
    if f.size <= plen:
        ok = got[0] == torrent.pieces_root(f)
        return Finding("merkle", f.path, ok, "SHA-256 root ok" if ok else f"piece {first} failed (merkle root)")
    if mismatched:
        return Finding("merkle", f.path, False, first_few([f"piece {i} failed" for i in mismatched]))
    if merkle_root(got, pow2(n), merkle_root([], plen // BLOCK)) != torrent.pieces_root(f):
        # Only possible without piece layers (a magnet's metadata): some piece differs, which one is unknown.
        return Finding("merkle", f.path, False, "merkle root mismatch (no piece layer to name the piece)")
    return Finding("merkle", f.path, True, f"SHA-256 root and {n} piece hashes ok")
