"""Deterministic torrent creation: the same files give the same info-hash on any machine.

Policy: files sorted by path, hidden files and folders (a leading ``.``) left out, no creation date,
no modification times, no file attributes; hybrid v1+v2 by default, with per-file piece alignment
(v2 requires it), so any subset of files can be fetched and verified alone. Piece hashing runs in a
spawned subprocess because libtorrent's ``set_piece_hashes`` holds the GIL for its whole run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import libtorrent as lt

from weightswarm import __version__
from weightswarm.core.atomic import atomic_write_bytes
from weightswarm.core.errors import InputError, OptionError
from weightswarm.core.paths import check_output_file, walk_files
from weightswarm.distrib.torrentfile import Torrent, parse_torrent

MIN_PIECE = 16 * 1024
MAX_PIECE = 16 * 1024 * 1024
# An origin resends about N x (a piece) x ln(pieces) / payload to N fetchers, for pieces that two of them
# booked before either announced it: smaller pieces cut that. N = 16 fetchers on 100 Mbit/s links, 264 MB:
# the origin sent 1.12x the payload with 256 KiB pieces (1,008), 1.09-1.10x with 128 KiB, 1.09x with 64 KiB
# (BENCHMARKS.md). 4096 SHA-1 hashes are an 80 KB info dict; the cap below keeps big releases at 16 MiB pieces.
TARGET_PIECES = 4096
FORMATS = ("hybrid", "v1", "v2")


def auto_piece_size(total: int) -> int:
    """The smallest power of two giving at most 4096 pieces, clamped to 16 KiB .. 16 MiB."""
    size = MIN_PIECE
    while size < MAX_PIECE and total / size > TARGET_PIECES:
        size *= 2
    return size


@dataclass(frozen=True)
class CreateOptions:
    format: str = "hybrid"
    piece_size: int = 0  # 0 = auto_piece_size
    trackers: tuple[str, ...] = ()
    web_seeds: tuple[str, ...] = ()
    private: bool = False
    comment: str = ""

    def check(self) -> None:
        if self.format not in FORMATS:
            raise OptionError("--format", self.format, f"choose from {', '.join(FORMATS)}")
        ps = self.piece_size
        if ps and (ps < MIN_PIECE or ps > MAX_PIECE or ps & (ps - 1)):
            raise OptionError("--piece-size", ps, "must be a power of two from 16 KiB to 16 MiB")
        for url in self.trackers:
            if urlparse(url).scheme not in ("http", "https", "udp"):
                raise OptionError("--tracker", url, "must start with http://, https:// or udp://")
        for url in self.web_seeds:
            if urlparse(url).scheme not in ("http", "https"):
                raise OptionError("--web-seed", url, "must start with http:// or https://")


def list_payload(path: Path) -> list[tuple[str, int]]:
    """(path inside the torrent, size) for every file, sorted; symlinks are followed."""
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    if not path.is_dir():
        raise InputError(path, "no such file or folder" if not path.exists() else "not a regular file or folder")
    out = [(rel, p.stat().st_size) for rel, p in walk_files(path, follow_links=True, strict=True)]
    if not out:
        raise InputError(path, "no files to put in a torrent (hidden files are left out)")
    return sorted(out)


def create_torrent(path: str | os.PathLike, opts: CreateOptions = CreateOptions(),
                   progress: Callable[[int, int], None] | None = None) -> bytes:
    """Hash PATH and return the bencoded .torrent."""
    opts.check()
    path = Path(path)
    files = list_payload(path)
    total = sum(s for _, s in files)
    if total == 0:
        raise InputError(path, "all files are empty: a torrent needs at least one byte")
    path = path.resolve()  # the torrent's name is the folder's own name, even for "."
    entries = files if path.is_file() else [(f"{path.name}/{rel}", size) for rel, size in files]
    piece_size = opts.piece_size or auto_piece_size(total)
    job = dict(entries=entries, piece_size=piece_size, format=opts.format, parent=str(path.parent),
               src=str(path), trackers=list(opts.trackers),
               web_seeds=list(opts.web_seeds), private=opts.private, comment=opts.comment)
    data = _run_hasher(job, progress)
    d = lt.bdecode(data)
    d.pop(b"creation date", None)
    return lt.bencode(d)


def write_torrent(path: str | os.PathLike, out: str | os.PathLike, opts: CreateOptions = CreateOptions(),
                  progress: Callable[[int, int], None] | None = None, force: bool = False) -> Torrent:
    """Hash PATH and write its torrent to OUT; an existing OUT is replaced only with ``force``."""
    out = check_output_file(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise InputError(out, "already exists", hint="give another name, or --force to replace it")
    data = create_torrent(path, opts, progress)
    atomic_write_bytes(out, data)
    return parse_torrent(data, out)


def _run_hasher(job: dict, progress) -> bytes:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_hasher, args=(job, send), daemon=True)
    proc.start()
    send.close()
    try:
        while True:
            try:
                kind, value = recv.recv()
            except EOFError:
                raise InputError(job["src"], f"hashing process died (exit status {proc.exitcode})") from None
            if kind == "progress" and progress:
                progress(*value)
            elif kind == "error":
                raise InputError(job["src"], value)
            elif kind == "done":
                return value
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join()


def _hasher(job: dict, conn) -> None:
    """Runs in the subprocess: builds the torrent, reports progress every ~1% of pieces."""
    try:
        entries = [lt.create_file_entry(name, size) for name, size in job["entries"]]
        # v1 stays pad-free for older clients; hybrids align files to pieces but skip the useless tail pad.
        flags = lt.create_torrent.no_attributes
        flags |= {"hybrid": lt.create_torrent.canonical_files_no_tail_padding,
                  "v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only}[job["format"]]
        ct = lt.create_torrent(entries, job["piece_size"], flags)
        for tier, url in enumerate(job["trackers"]):
            ct.add_tracker(url, tier)
        for url in job["web_seeds"]:
            ct.add_url_seed(url)
        ct.set_priv(job["private"])
        if job["comment"]:
            ct.set_comment(job["comment"])
        ct.set_creator(f"weightswarm {__version__}")
        total = ct.num_pieces()
        step = max(1, total // 100)

        def cb(piece: int) -> None:
            if piece % step == 0 or piece == total - 1:
                conn.send(("progress", (piece + 1, total)))

        lt.set_piece_hashes(ct, job["parent"], cb)
        conn.send(("done", lt.bencode(ct.generate())))
    except Exception as e:  # reported to the parent, which raises it as an InputError
        conn.send(("error", str(e)))
    finally:
        conn.close()
