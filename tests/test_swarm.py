"""Real swarms on 127.0.0.1: one seeder process and fetch processes, by .torrent and by magnet; the request
queue an origin offers a lone peer and a swarm."""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import libtorrent as lt
import pytest

from tests.support import LOOPBACK, Daemon, place, run_ws, seeder, tree_bytes


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


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the seeder closed the connection"
        data += chunk
    return data


def _advertised_queue(port: int, info_hash: bytes) -> tuple[socket.socket, int]:
    """Connect as a bare BitTorrent peer; the connection and the request queue (reqq) the seeder offers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reserved = bytes([0, 0, 0, 0, 0, 0x10, 0, 0])  # BEP 10: the extension protocol
    sock.sendall(b"\x13BitTorrent protocol" + reserved + info_hash + b"-XX0000-" + os.urandom(12))
    _read(sock, 68)
    while True:  # the seeder's messages: its bitfield, then the extension handshake
        msg = _read(sock, int.from_bytes(_read(sock, 4), "big"))
        if msg[:2] == b"\x14\x00":
            handshake = lt.bdecode(msg[2:])
            return sock, handshake.get(b"reqq", handshake.get("reqq"))


def _origin(kind: str, nodes, release: Path, torrent: Path, tmp_path: Path, *extra) -> int:
    """The peer port of a seed process, or of a daemon serving the torrent."""
    if kind == "seed":
        return seeder(nodes, release, torrent, *extra).port
    from weightswarm.distrib.torrentfile import load_torrent

    name = "-".join(extra).strip("-") or "default"
    data, state = tmp_path / f"data-{name}", tmp_path / f"state-{name}"
    place(release, data / "models")
    d = Daemon(nodes, data, state, *extra)
    r = run_ws("daemon", "--api", d.api[len("http://"):], "--state", state, "add", torrent, "--path", "models")
    assert r.returncode == 0, r.stderr
    d.event("seeding", load_torrent(torrent).info_hash)
    return d.port


@pytest.mark.parametrize("kind", ["seed", "daemon"])
def test_a_lone_peer_may_queue_more_than_one_of_a_swarm(kind, nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.session import LONE_PEER_QUEUE, SWARM_QUEUE
    from weightswarm.distrib.torrentfile import load_torrent

    info_hash = bytes.fromhex(load_torrent(tiny_torrent).v1)
    port = _origin(kind, nodes, tiny_release, tiny_torrent, tmp_path)
    first, reqq = _advertised_queue(port, info_hash)
    assert reqq == LONE_PEER_QUEUE
    second, _ = _advertised_queue(port, info_hash)
    swarm = SWARM_QUEUE

    def probe() -> int:  # a third peer, gone again at once
        sock, reqq = _advertised_queue(port, info_hash)
        sock.close()
        return reqq

    deadline = time.monotonic() + 30
    while probe() != swarm:  # once the origin has seen two peers, a newcomer is one of a swarm
        assert time.monotonic() < deadline, "the origin never shrank the queue it offers"
    first.close()
    second.close()
    while probe() != LONE_PEER_QUEUE:  # alone again
        assert time.monotonic() < deadline, "the origin never offered a lone peer the larger queue again"
    for extra, offered in ((("--max-upload-rate", "1m"), swarm),  # the limiter sets a capped origin's pace
                           (("--no-distinct-pieces",), 2000)):  # libtorrent's own
        port = _origin(kind, nodes, tiny_release, tiny_torrent, tmp_path, *extra)
        sock, reqq = _advertised_queue(port, info_hash)
        sock.close()
        assert reqq == offered, extra
