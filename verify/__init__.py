"""Independent checks of a folder: torrent pieces (pieces), publishers' checksum files (checksums), the
structure of weight files (structure), blake3 manifests and provenance (manifest), all of them in order
(folder), and their findings (report). ``join`` rebuilds a file from split parts, checking its sum.

torch-free, and independent of any BitTorrent client's state.
"""
