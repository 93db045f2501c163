"""Interop with programs we did not write: aria2c seeding to our fetch, and a real tracker (opentracker)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import LOOPBACK, Tracker, free_port, run_ws, seeder, tree_bytes, wait_listening

pytestmark = pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed (apt-get install aria2)")


def test_fetch_from_aria2c(tiny_release, tmp_path):
    torrent = tmp_path / "v1.torrent"
    assert run_ws("create", tiny_release, "-o", torrent, "--format", "v1").returncode == 0
    # aria2c writes control files beside the data: it seeds a copy.
    seed_dir = tmp_path / "aria2"
    shutil.copytree(tiny_release, seed_dir / tiny_release.name)
    port = free_port()
    aria = subprocess.Popen(
        ["aria2c", f"--dir={seed_dir}", "--check-integrity=true", "--seed-ratio=0.0", f"--listen-port={port}",
         "--interface=127.0.0.1", "--enable-dht=false", "--bt-enable-lpd=false", "--enable-peer-exchange=false",
         "--console-log-level=warn", "--summary-interval=0", str(torrent)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(aria, port)
        r = run_ws("fetch", torrent, "-o", tmp_path / "out", "--peer", f"127.0.0.1:{port}", *LOOPBACK,
                   "--timeout", "30")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verified: OK" in r.stdout
        assert tree_bytes(tmp_path / "out" / tiny_release.name) == tree_bytes(tiny_release)
    finally:
        aria.terminate()
        aria.wait(timeout=10)


@pytest.mark.skipif(shutil.which("opentracker") is None, reason="opentracker is not installed (apt-get install opentracker)")
def test_seeder_and_fetcher_find_each_other_through_a_real_tracker(nodes, tiny_release, tmp_path):
    port = free_port()
    torrent = tmp_path / "tracked.torrent"
    r = run_ws("create", tiny_release, "-o", torrent, "--tracker", f"http://127.0.0.1:{port}/announce")
    assert r.returncode == 0, r.stderr
    with Tracker(tmp_path / "ot", port, torrent):
        seeder(nodes, tiny_release, torrent)
        r = run_ws("fetch", torrent, "-o", tmp_path / "out", *LOOPBACK, "--timeout", "30")  # no --peer
        assert r.returncode == 0, r.stdout + r.stderr
        assert tree_bytes(tmp_path / "out" / tiny_release.name) == tree_bytes(tiny_release)
