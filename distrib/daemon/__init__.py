"""The seeding daemon: one Daemon (daemon) over a libtorrent session, its configuration (config), what it
keeps under --state (state), its torrents and their paths (torrents), integrity scrubs (scrub), the aiohttp
API and web seed (api), and the one client of that API (client).
"""
