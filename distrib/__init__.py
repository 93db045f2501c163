"""BitTorrent: .torrent files read safely (torrentfile), deterministic creation (create), what a SOURCE
means (source, catalog), libtorrent sessions (session), fetch, seed, and the seeding daemon (daemon/).

torch-free.
"""
