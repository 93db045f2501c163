"""BitTorrent: deterministic torrent creation, sources and the catalog, sessions, fetch and seed."""
from distrib.catalog import RELEASES, Release, lookup
from distrib.create import CreateOptions, auto_piece_size, create_torrent, write_torrent
from distrib.fetch import FetchOptions, Fetcher, FetchResult, SeedAfter
from distrib.seed import SeedOptions, seed
from distrib.session import SessionOptions, make_session
from distrib.source import Source, resolve
from distrib.torrentfile import FileEntry, Torrent, load_torrent, parse_torrent

__all__ = ["RELEASES", "Release", "lookup", "CreateOptions", "auto_piece_size", "create_torrent", "write_torrent",
           "FetchOptions", "Fetcher", "FetchResult", "SeedAfter", "SeedOptions", "seed", "SessionOptions",
           "make_session", "Source", "resolve", "FileEntry", "Torrent", "load_torrent", "parse_torrent"]
