"""BitTorrent: deterministic torrent creation, sources and the catalog, sessions, fetch, seed and the daemon.

The public names are re-exported lazily (PEP 562): ``import distrib.session`` must not pay for libtorrent
sessions, aiohttp and the daemon when a command needs none of them.
"""
import importlib

_EXPORTS = {
    "distrib.catalog": ("RELEASES", "Release", "lookup"),
    "distrib.create": ("CreateOptions", "auto_piece_size", "create_torrent", "write_torrent"),
    "distrib.daemon": ("Daemon",),
    "distrib.daemon_config": ("DaemonConfig", "load_config"),
    "distrib.fetch": ("FetchOptions", "Fetcher", "FetchResult", "SeedAfter", "fetch_and_verify"),
    "distrib.seed": ("SeedOptions",),
    "distrib.session": ("SessionOptions", "make_session"),
    "distrib.source": ("Source", "resolve"),
    "distrib.torrentfile": ("FileEntry", "Torrent", "load_torrent", "parse_torrent"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'distrib' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
