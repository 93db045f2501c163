"""Reading .torrent files safely: bencode errors, unsafe paths, the v2 piece layers and the file layout,
checked once, where the torrent is parsed, for every command that uses it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from weightswarm.core.errors import InputError, TorrentError
from weightswarm.core.inputs import read_regular
from weightswarm.core.paths import check_components
from weightswarm.verify.pieces import BLOCK, merkle_root, pow2

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
    # pieces root -> the file's piece hashes, each checked against its root; absent for a magnet's metadata
    # (the piece layers travel outside the info dictionary) until libtorrent has them from peers.
    layers: dict[bytes, list[bytes]] = field(default_factory=dict)

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

    def pieces_root(self, f: FileEntry) -> bytes:
        """The v2 merkle root of a file (BEP 52 ``pieces root``)."""
        return self.info.layout().root(f.index).to_bytes()

    def file_pieces(self, f: FileEntry) -> range:
        """The pieces holding a file's bytes (every file starts a piece in v2 and hybrid torrents)."""
        plen = self.info.piece_length()
        return range(f.offset // plen, (f.offset + max(f.size, 1) - 1) // plen + 1) if f.size else range(0)


def _ints_fit(data: bytes) -> bool:
    """Every bencoded integer of data fits in 64 bits. libtorrent decodes a larger one as 0, so a file that
    declares 2**64 + 5 bytes would pass as empty: such a torrent lies and is refused."""
    i, n = 0, len(data)
    while i < n:
        c = data[i:i + 1]
        if c in (b"d", b"l", b"e"):
            i += 1
        elif c == b"i":
            end = data.find(b"e", i)
            if end < 0 or not -(1 << 63) <= int(data[i + 1:end] or b"x", 10) < 1 << 63:
                return False
            i = end + 1
        elif c.isdigit():
            colon = data.find(b":", i, i + 21)
            if colon < 0:
                return False
            i = colon + 1 + int(data[i:colon])
        else:
            return False
    return True


def parse_torrent(data: bytes, source: str | os.PathLike) -> Torrent:
    source = os.fspath(source)
    try:
        raw = lt.bdecode(data)
    except Exception:
        raw = None
    if isinstance(raw, dict):
        try:
            if not _ints_fit(data):
                raise TorrentError(source, "not a valid torrent file: an integer does not fit in 64 bits")
        except ValueError:  # digits that are no number: libtorrent decoded something else than we walk
            raise TorrentError(source, "not a valid torrent file (bad bencoding)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get(b"info"), dict):
        raise TorrentError(source, "not a valid torrent file (bad bencoding or no info dictionary)")
    check_info_paths(raw[b"info"], source)
    try:
        info = lt.torrent_info(data)
    except RuntimeError as e:
        raise TorrentError(source, f"not a valid torrent file: {lt_message(e)}") from None
    t = Torrent(info, raw, source)
    if t.v2:
        t.layers.update(_piece_layers(t, raw.get(b"piece layers")))
    return t


def _piece_layers(t: Torrent, layers) -> dict[bytes, list[bytes]]:
    """BEP 52 piece layers, each one's merkle tree checked against its file's root: a torrent whose
    layers lie is refused here, not found out piece by piece."""
    if layers is None:
        return {}
    if not isinstance(layers, dict) or not all(isinstance(k, bytes) and isinstance(v, bytes)
                                               for k, v in layers.items()):
        raise TorrentError(t.source, "not a valid torrent file: 'piece layers' must map 32-byte roots to "
                                     "strings of piece hashes")
    plen = t.info.piece_length()
    out = {}
    for f in t.payload_files():
        if f.size <= plen:
            continue  # one piece: the root is the piece hash, and BEP 52 gives such files no layer
        root = t.pieces_root(f)
        layer = layers.get(root)
        n = -(-f.size // plen)
        if layer is None:
            raise TorrentError(t.source, f"not a valid torrent file: no piece layer for {f.path}")
        if len(layer) != 32 * n:
            raise TorrentError(t.source, f"not a valid torrent file: the piece layer of {f.path} holds "
                                         f"{len(layer) // 32} hashes, the file has {n} pieces")
        hashes = [layer[i:i + 32] for i in range(0, len(layer), 32)]
        if merkle_root(hashes, pow2(n), merkle_root([], plen // BLOCK)) != root:
            raise TorrentError(t.source, f"not a valid torrent file: the piece layer of {f.path} does not "
                                         "hash to its pieces root")
        out[root] = hashes
    return out


def lt_message(e: Exception) -> str:
    """libtorrent's error text without its ``[libtorrent:39]`` category suffix."""
    return re.sub(r"\s*\[[a-z_]+:\d+\]$", "", str(e))


def load_torrent(path: str | os.PathLike) -> Torrent:
    try:
        data = read_regular(path, MAX_TORRENT_BYTES, ".torrent file")
    except InputError as e:
        raise TorrentError(path, e.problem) from None
    return parse_torrent(data, path)


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
                    if v.get(b"length") == 0 and b"pieces root" in v:  # BEP 52: an empty file has no root
                        raise TorrentError(source, f"not a valid torrent file: {'/'.join(prefix)!r} is empty "
                                                   "but has a pieces root")
                continue
            parts = prefix + [text(k)]
            check_components(parts, source)
            if isinstance(v, dict):
                walk(v, parts)

    if isinstance(info.get(b"file tree"), dict):
        walk(info[b"file tree"], [])
