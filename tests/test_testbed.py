"""A swarm of separate hosts on shaped links (network namespaces; root only), and the testbed's clean-up."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import run_ws, tree_bytes
from weightswarm.testbed import PEER_PORT, TRACKER_PORT, Testbed, run_swarm, start_tracker, unavailable, wait_port

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=f"no testbed here: {unavailable()}"),
    pytest.mark.skipif(shutil.which("opentracker") is None, reason="opentracker is not installed"),
]


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    """~27 MB: at 100 Mbit/s a few seconds of the origin's link, so the fetchers must trade pieces."""
    out = tmp_path_factory.mktemp("small") / "mixtral-small"
    assert run_ws("synth", out, "--preset", "small").returncode == 0
    return out


def test_four_hosts_on_100_mbit_links_each_get_the_release_and_the_origin_sends_it_about_once(
        small_release, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    fetchers = [f"f{i}" for i in range(4)]
    with Testbed(["tracker", "origin", *fetchers], rate_mbit=100) as bed:
        torrent = tmp_path / "small.torrent"
        r = run_ws("create", small_release, "-o", torrent, "--format", "v1", "--tracker",
                   f"http://{bed['tracker'].addr}:{TRACKER_PORT}/announce")
        assert r.returncode == 0, r.stderr
        start_tracker(bed["tracker"], tmp_path / "ot", [load_torrent(torrent).v1])
        origin = bed["origin"]
        payload = sum(len(b) for b in tree_bytes(small_release).values())
        run = run_swarm(origin, ["seed", small_release, "--torrent", torrent, "--listen",
                                 f"{origin.addr}:{PEER_PORT}", "--no-dht"],
                        {f: (bed[f], f"{bed[f].addr}:{PEER_PORT}") for f in fetchers}, torrent, [], tmp_path,
                        payload, timeout=120)
        assert sorted(run.finished) == fetchers
        for f in fetchers:
            assert tree_bytes(tmp_path / f / small_release.name) == tree_bytes(small_release), f
        # Measured 1.05x; stock libtorrent settings sent 1.5x here. The bound leaves room for a busy CI machine.
        assert run.origin_uploaded <= 1.35 * payload, run
        # The link carried about the payload the origin reports. Headers add ~4%, but libtorrent counts a
        # block as uploaded once it is in the socket, and what is still there when the fetchers stop never
        # leaves (once the link carried 0.998x the report, in 16 KiB pieces).
        assert run.origin_wire >= 0.98 * run.origin_uploaded, run
        names = [h.netns for h in bed.hosts.values()]
    assert not bed.leftovers()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_a_failure_inside_the_testbed_still_removes_its_hosts_and_processes(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), Testbed(["a", "b"], rate_mbit=10) as bed:
        a = bed["a"]
        listener = a.popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                            f"s.bind(('{a.addr}', 9000)); s.listen(); time.sleep(600)"])
        wait_port(a, 9000, listener)
        # b reaches a over the bridge, and a's link is shaped.
        probe = subprocess.run([*bed["b"].prefix, sys.executable, "-c", "import socket; "
                                f"socket.create_connection(('{a.addr}', 9000), timeout=10)"],
                               capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr
        qdisc = subprocess.run([*bed["a"].prefix, "tc", "qdisc", "show", "dev", "eth0"], capture_output=True,
                               text=True).stdout
        assert "tbf" in qdisc and "10Mbit" in qdisc
        raise RuntimeError("boom")
    assert listener.poll() is not None
    assert not bed.leftovers()
