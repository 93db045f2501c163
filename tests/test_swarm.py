"""Real swarms on 127.0.0.1: one seeder process and fetch processes, by .torrent and by magnet."""
from __future__ import annotations

import signal

from tests.support import LOOPBACK, seeder, tree_bytes


def test_seeder_and_two_concurrent_fetchers_one_by_magnet(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    # A slow seed keeps both fetchers busy at the same time, so they trade pieces with each other.
    seed = seeder(nodes, tiny_release, tiny_torrent, "--max-upload-rate", "300k")
    a = nodes("fetch", tiny_torrent, "-o", tmp_path / "a", "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK,
              "--json", "--seed-after", "60s", "--timeout", "30")
    magnet = f"magnet:?xt=urn:btih:{t.v1}&dn={t.name}"
    b = nodes("fetch", magnet, "-o", tmp_path / "b", "--peer", f"127.0.0.1:{seed.port}",
              "--peer", f"127.0.0.1:{a.port}", *LOOPBACK, "--json", "--timeout", "30")
    assert b.wait() == 0, b.stderr
    a.wait_event(lambda e: e["event"] == "verify")
    for node in (a, b):
        report = node.wait_for("verify")["report"]
        assert report["ok"] and set(report["summary"]) == {"pieces", "checksum", "structure", "params"}
    assert b.last["metadata"]["name"] == t.name  # the metadata came from a peer
    assert a.stop(signal.SIGTERM) == 0, a.stderr  # a clean stop while seeding after the download
    expected = tree_bytes(tiny_release)
    assert tree_bytes(tmp_path / "a" / t.name) == expected
    assert tree_bytes(tmp_path / "b" / t.name) == expected


def test_seeder_stops_cleanly_on_sigterm(nodes, tiny_release, tiny_torrent):
    seed = seeder(nodes, tiny_release, tiny_torrent)
    assert seed.stop(signal.SIGTERM) == 0, seed.stderr
    assert seed.wait_for("stopped", timeout=1)["uploaded"] == 0
