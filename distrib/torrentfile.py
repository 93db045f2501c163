"""Reading .torrent files safely: bencode errors, unsafe paths and the file layout, in one place."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from verify.paths import check_components
from weightswarm.errors import TorrentError

MAX_TORRENT_BYTES = 64 * 1024 * 1024  # libtorrent refuses larger metadata anyway; keeps a bad path from eating RAM


@dataclass(frozen=True)
class FileEntry:
    index: int  # libtorrent's file index (pad files count)
    path: str  # inside the torrent's top folder, posix
    size: int
    offset: int  # in the v1 concatenation of all files
    pad: bool


@dataclass(frozen=True)
class Torrent:
    """A parsed torrent: libtorrent's torrent_info plus the facts we use everywhere."""

    info: lt.torrent_info
    raw: dict  # bdecoded top-level dict (keys bytes)
    source: str

    @property
    def name(self) -> str:
        return self.info.name()

    @property
    def v1(self) -> str | None:
        ih = self.info.info_hashes()
        return str(ih.v1) if ih.has_v1() else None

    @property
    def v2(self) -> str | None:
        ih = self.info.info_hashes()
        return str(ih.v2) if ih.has_v2() else None

    @property
    def info_hash(self) -> str:
        """The v1 hash when there is one (what trackers and magnets use most), else the v2 hash."""
        return self.v1 or self.v2

    def files(self) -> list[FileEntry]:
        fs = self.info.layout()
        pad = int(fs.flag_pad_file)
        out = []
        for i in range(fs.num_files()):
            full = fs.file_path(i).replace(os.sep, "/")
            rel = full.split("/", 1)[1] if "/" in full else full
            out.append(FileEntry(i, rel, fs.file_size(i), fs.file_offset(i), bool(int(fs.file_flags(i)) & pad)))
        return out

    def payload_files(self) -> list[FileEntry]:
        return [f for f in self.files() if not f.pad]

    def root(self, save_path: str | os.PathLike) -> Path:
        """Where the payload lies: ``save_path/name`` (a file for single-file torrents)."""
        return Path(save_path) / self.name


def parse_torrent(data: bytes, source: str | os.PathLike) -> Torrent:
    source = os.fspath(source)
    try:
        raw = lt.bdecode(data)
    except Exception:
        raw = None
    if not isinstance(raw, dict) or not isinstance(raw.get(b"info"), dict):
        raise TorrentError(source, "not a valid torrent file (bad bencoding or no info dictionary)")
    check_info_paths(raw[b"info"], source)
    try:
        info = lt.torrent_info(data)
    except RuntimeError as e:
        raise TorrentError(source, f"not a valid torrent file: {lt_message(e)}") from None
    return Torrent(info, raw, source)


def lt_message(e: Exception) -> str:
    """libtorrent's error text without its ``[libtorrent:39]`` category suffix."""
    return re.sub(r"\s*\[[a-z_]+:\d+\]$", "", str(e))


def load_torrent(path: str | os.PathLike) -> Torrent:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_TORRENT_BYTES:
            raise TorrentError(p, f"too large for a .torrent file ({size} bytes)")
        data = p.read_bytes()
    except FileNotFoundError:
        raise TorrentError(p, "no such file") from None
    except IsADirectoryError:
        raise TorrentError(p, "is a directory, not a .torrent file") from None
    return parse_torrent(data, p)


def check_info_paths(info: dict, source: str) -> None:
    """Refuse names, paths and symlinks that could escape the download folder, before libtorrent sees them.

    Both the plain and the ``.utf-8`` spelling of a name are checked: clients differ in which they use.
    """

    def text(b) -> str:
        if not isinstance(b, bytes):
            raise TorrentError(source, "not a valid torrent file (a path element is not a string)")
        return b.decode("utf-8", "replace")

    def check_entry(entry: dict, parts: list[str]) -> None:
        if b"l" in (entry.get(b"attr") or b"") or b"symlink path" in entry:
            raise TorrentError(source, f"symlink {'/'.join(parts)!r} in the torrent: links could point anywhere")

    for key in (b"name", b"name.utf-8"):
        if key in info:
            check_components([text(info[key])], source)
    files = info.get(b"files")
    for f in files if isinstance(files, list) else []:
        if not isinstance(f, dict):
            continue
        for key in (b"path", b"path.utf-8"):
            if key in f:
                if not isinstance(f[key], list):
                    raise TorrentError(source, "not a valid torrent file (a file path is not a list)")
                check_components([text(p) for p in f[key]], source)
        check_entry(f, [text(p) for p in f.get(b"path", [])] if isinstance(f.get(b"path"), list) else [])

    def walk(tree: dict, prefix: list[str]) -> None:
        for k, v in tree.items():
            if k == b"":
                if isinstance(v, dict):
                    check_entry(v, prefix)
                continue
            parts = prefix + [text(k)]
            check_components(parts, source)
            if isinstance(v, dict):
                walk(v, parts)

    if isinstance(info.get(b"file tree"), dict):
        walk(info[b"file tree"], [])
