"""The daemon's scrub, in process: every torrent format, only the pieces it has, a blake3 manifest, a stop."""
from __future__ import annotations

import shutil
import threading

import pytest

from tests.support import flip_byte
from weightswarm.distrib.create import CreateOptions, write_torrent
from weightswarm.distrib.daemon.scrub import Cancelled, RateLimit, scrub


@pytest.mark.parametrize("fmt", ["v1", "hybrid", "v2"])
def test_scrub_finds_exactly_the_corrupt_piece(release_copy, tmp_path, fmt):
    t = write_torrent(release_copy, tmp_path / "t.torrent", CreateOptions(format=fmt))
    n, unlimited = t.info.num_pieces(), RateLimit(0, threading.Event())
    res = scrub(t, release_copy.parent, [True] * n, unlimited, lambda p: None)
    assert (res.bad_pieces, res.pieces_checked, res.bytes) == ([], n, t.info.total_size())

    flip_byte(release_copy / "consolidated.00.pth", 300_000)
    f = next(f for f in t.files() if f.path == "consolidated.00.pth")
    piece = (f.offset + 300_000) // t.info.piece_length()
    seen = []
    res = scrub(t, release_copy.parent, [True] * n, unlimited, seen.append)
    assert res.bad_pieces == seen == [piece]
    have = [i != piece for i in range(n)]  # a piece the client does not have is not its to judge
    assert scrub(t, release_copy.parent, have, unlimited, seen.append).bad_pieces == []


def test_scrub_checks_files_against_a_blake3_manifest(converted, tmp_path):
    root = shutil.copytree(converted, tmp_path / converted.name)
    flip_byte(root / "dense.safetensors", 1000)  # before the torrent is made: its pieces agree, the manifest not
    t = write_torrent(root, tmp_path / "t.torrent")
    res = scrub(t, root.parent, [True] * t.info.num_pieces(), RateLimit(0, threading.Event()), lambda p: None)
    assert res.bad_pieces == [] and res.manifest_mismatches == ["dense.safetensors"]


def test_a_stop_ends_a_rate_limited_scrub(release_copy, tmp_path):
    t = write_torrent(release_copy, tmp_path / "t.torrent")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        scrub(t, release_copy.parent, [True] * t.info.num_pieces(), RateLimit(1, stop), lambda p: None)
