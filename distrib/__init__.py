"""BitTorrent: deterministic torrent creation, sources and the catalog, sessions, fetch, seed and the daemon."""
from distrib.catalog import RELEASES, Release, lookup
from distrib.create import CreateOptions, auto_piece_size, create_torrent, write_torrent
from distrib.daemon import Daemon
from distrib.daemon_config import DaemonConfig, load_config
from distrib.fetch import FetchOptions, Fetcher, FetchResult, SeedAfter
from distrib.seed import SeedOptions, seed
from distrib.session import SessionOptions, make_session
from distrib.source import Source, resolve
from distrib.torrentfile import FileEntry, Torrent, load_torrent, parse_torrent

__all__ = ["RELEASES", "Release", "lookup", "CreateOptions", "auto_piece_size", "create_torrent", "write_torrent",
           "Daemon", "DaemonConfig", "load_config", "FetchOptions", "Fetcher", "FetchResult", "SeedAfter", "SeedOptions", "seed", "SessionOptions",
           "make_session", "Source", "resolve", "FileEntry", "Torrent", "load_torrent", "parse_torrent"]
