"""What ``fetch`` accepts as SOURCE: a magnet URI, a .torrent path, a bare info-hash or a catalog name."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from weightswarm.core.errors import InputError, TorrentError
from weightswarm.distrib.catalog import BY_HASH, RELEASES, Release, lookup
from weightswarm.distrib.torrentfile import Torrent, load_torrent, lt_message

_HEX = re.compile(r"^(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")


@dataclass
class Source:
    text: str
    params: lt.add_torrent_params  # ready to add, save_path not yet set
    torrent: Torrent | None  # None until metadata arrives (magnets, bare hashes)
    release: Release | None  # the catalog entry, when the info-hash is a known release

    @property
    def key(self) -> str:
        """The name under which resume state is kept: the v1 info-hash, else the v2 one."""
        if self.torrent:
            return self.torrent.info_hash
        ih = self.params.info_hashes
        return str(ih.v1) if ih.has_v1() else str(ih.v2)


def resolve(text: str) -> Source:
    release = lookup(text)
    if release:
        return _magnet(release.magnet, text, release)
    if text.startswith("magnet:"):
        return _magnet(text, text, None)
    if _HEX.match(text):
        if not int(text, 16):  # libtorrent reads all zeros as "no hash" and would refuse only when adding it
            raise TorrentError(text, "an all-zero info-hash names no torrent")
        ih = (lt.info_hash_t(lt.sha1_hash(bytes.fromhex(text))) if len(text) == 40
              else lt.info_hash_t(lt.sha256_hash(bytes.fromhex(text))))
        atp = lt.add_torrent_params()
        atp.info_hashes = ih
        return Source(text, atp, None, BY_HASH.get(text.lower()))
    path = Path(text)
    if path.exists() or text.endswith(".torrent"):
        torrent = load_torrent(path)
        atp = lt.add_torrent_params()
        atp.ti = torrent.info
        return Source(text, atp, torrent, BY_HASH.get(torrent.v1 or ""))
    names = ", ".join(r.name for r in RELEASES)
    raise InputError(text, "not a magnet URI, .torrent file, info-hash or catalog name",
                     hint=f"catalog names: {names}")


def _magnet(uri: str, text: str, release: Release | None) -> Source:
    try:
        atp = lt.parse_magnet_uri(uri)
    except RuntimeError as e:
        raise TorrentError(text, f"malformed magnet URI: {lt_message(e)}") from None
    ih = atp.info_hashes
    if not (ih.has_v1() or ih.has_v2()):  # also an all-zero hash, which libtorrent reads as none
        raise TorrentError(text, "malformed magnet URI: no info-hash (xt=urn:btih:... or urn:btmh:...)")
    return Source(text, atp, None, release or BY_HASH.get(str(ih.v1) if ih.has_v1() else ""))
