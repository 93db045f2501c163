"""The seeding daemon as a real subprocess on 127.0.0.1: add, serve, restart, crash, scrub, web seed."""
from __future__ import annotations

import json
import signal

from tests.support import LOOPBACK, Daemon, flip_byte, place, run_ws, tree_bytes


def _fetch(nodes, torrent, out, *args):
    return nodes("fetch", torrent, "-o", out, *LOOPBACK, "--json", "--timeout", "60", "--no-verify", *args)


def test_add_fetch_then_sigterm_restart_resumes_without_recheck(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    data, state = tmp_path / "data", tmp_path / "state"
    place(tiny_release, data / "models")
    d = Daemon(nodes, data, state)
    r = run_ws("daemon", "--api", d.api[len("http://"):], "--state", state, "add", tiny_torrent, "--path", "models")
    assert r.returncode == 0, r.stderr
    assert d.event("checked", t.info_hash)["have"] == t.info.num_pieces()
    d.event("resume_saved", t.info_hash)

    leech = _fetch(nodes, tiny_torrent, tmp_path / "leech", "--peer", f"127.0.0.1:{d.port}")
    assert leech.wait() == 0, leech.stderr
    assert tree_bytes(tmp_path / "leech" / t.name) == tree_bytes(tiny_release)
    assert d.until(lambda: d.status(t.info_hash)["uploaded"] > 0)

    assert d.node.stop(signal.SIGTERM) == 0, d.node.stderr
    assert d.event("stopped")["clean"] is True
    assert (state / "clean-shutdown").exists()

    d2 = Daemon(nodes, data, state)
    assert d2.wait(lambda e: e["event"] == "listening")["previous_shutdown"] == "clean"
    d2.event("seeding", t.info_hash)
    s = d2.status(t.info_hash)
    assert s["start"] == {"mode": "resume", "reason": "resume data matches the files"}
    assert s["rechecks"] == 0 and s["state"] == "seeding" and s["progress"] == 1
    assert not any(e["event"] == "checking" for e in d2.node.events)  # libtorrent never re-hashed it
    assert s["uploaded"] > 0  # the counters came back with the resume data
    listed = run_ws("daemon", "--api", d2.api[len("http://"):], "--state", state, "list", "--json")
    assert [x["id"] for x in json.loads(listed.stdout)] == [t.info_hash]


def test_kill_9_then_restart_rechecks_only_the_torrent_whose_files_changed(nodes, tiny_release, tiny_torrent,
                                                                          tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    data, state = tmp_path / "data", tmp_path / "state"
    place(tiny_release, data / "a")
    b_root = place(tiny_release, data / "b")
    b_torrent = tmp_path / "b.torrent"  # the same files as v1: another info-hash, another torrent
    assert run_ws("create", b_root, "-o", b_torrent, "--format", "v1").returncode == 0
    a, b = load_torrent(tiny_torrent), load_torrent(b_torrent)
    d = Daemon(nodes, data, state)
    assert d.add(tiny_torrent.read_bytes(), "a")[0] == 201
    assert d.add(b_torrent.read_bytes(), "b")[0] == 201
    for t in (a, b):
        d.event("resume_saved", t.info_hash)
    assert d.node.stop(signal.SIGKILL) == -signal.SIGKILL

    flip_byte(b_root / "consolidated.00.pth", 5000)  # changed while the daemon was down
    d2 = Daemon(nodes, data, state)
    assert d2.wait(lambda e: e["event"] == "listening")["previous_shutdown"] == "crash"
    checked_b = d2.event("checked", b.info_hash)
    d2.event("seeding", a.info_hash)
    sa, sb = d2.status(a.info_hash), d2.status(b.info_hash)
    # After a crash size and mtime are not trusted alone: a starts at once, each piece hashed before it is sent.
    assert sa["start"]["mode"] == "verify-on-upload" and sa["rechecks"] == 0 and sa["state"] == "seeding"
    assert sb["start"] == {"mode": "check", "reason": "files changed since the resume data was saved"}
    assert sb["rechecks"] == 1 and checked_b["have"] == b.info.num_pieces() - 1  # the changed piece is dropped
    assert sb["state"] == "downloading"  # it waits for a peer to send the piece again, never serves it
    assert not any(e["event"] == "checking" and e["id"] == a.info_hash for e in d2.node.events)


def test_scrub_finds_a_flipped_byte_takes_the_piece_out_of_service_and_fetches_it_again(
        nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    ih = t.info_hash
    data, state = tmp_path / "data", tmp_path / "state"
    root = place(tiny_release, data)
    # Slow enough (~4 s for 1.2 MB) that the API is surely asked while the scrub runs.
    d = Daemon(nodes, data, state, "--scrub-rate", "256k")
    assert d.add(tiny_torrent.read_bytes())[0] == 201
    d.event("resume_saved", ih)
    flip_byte(root / "consolidated.00.pth", 300_000)

    code, body, _ = d.request("POST", f"/v1/torrents/{ih}/scrub")
    assert code == 202 and body["scrub"] == "queued"
    assert d.request("POST", f"/v1/torrents/{ih}/scrub")[0] == 409  # one at a time
    d.event("scrub_started", ih)
    code, health, _ = d.request("GET", "/healthz", token=None)
    assert code == 200 and health["ok"]
    # Answered, and the status asked next still shows the scrub running: the API is served beside it.
    assert d.status(ih)["scrub"] is not None, "the scrub ended before /healthz answered"

    bad = d.event("bad_piece", ih)
    finished = d.event("scrub_finished", ih)
    assert finished["ok"] is False and finished["bad_pieces"] == [bad["piece"]]
    assert any(f.endswith("consolidated.00.pth") for f in bad["files"])
    checked = d.event("checked", ih, after=bad)  # the re-check drops the piece at once
    assert checked["have"] == t.info.num_pieces() - 1
    s = d.status(ih)
    assert s["bad_pieces"] == [bad["piece"]] and s["last_scrub"]["ok"] is False
    metrics = d.request("GET", "/metrics", token=None)[1].decode()
    assert "weightswarm_scrub_bad_pieces_total 1.0" in metrics
    assert 'weightswarm_scrubs_total{result="corrupt"} 1.0' in metrics
    assert f'weightswarm_bad_pieces{{id="{ih}",name="{t.name}"}} 1.0' in metrics
    code, _, _ = d.request("GET", f"/seed/{ih}/{t.name}/consolidated.00.pth", token=None)
    assert code == 503  # nor over HTTP

    # A leecher that knows only the daemon gets every piece but that one...
    leech = _fetch(nodes, tiny_torrent, tmp_path / "leech", "--peer", f"127.0.0.1:{d.port}")
    leech.wait_event(lambda e: e["event"] == "progress" and e["pieces"] == t.info.num_pieces() - 1)
    # ...until a peer with good data connects to the daemon, which fetches the piece again and serves it.
    good = tmp_path / "good"
    place(tiny_release, good)
    _fetch(nodes, tiny_torrent, good, "--peer", f"127.0.0.1:{d.port}", "--seed-after", "60s")
    assert d.event("repaired", ih)["pieces"] == [bad["piece"]]
    assert leech.wait() == 0, leech.stderr
    assert not any(e["event"] == "hash_failed" for e in leech.events)  # no peer ever sent it the bad piece
    assert tree_bytes(tmp_path / "leech" / t.name) == tree_bytes(tiny_release)
    assert tree_bytes(root) == tree_bytes(tiny_release)  # repaired on the daemon's disk too
    assert d.until(lambda: (s := d.status(ih))["bad_pieces"] == [] and s["state"] == "seeding")


def test_web_seed_alone_completes_a_fetch_and_serves_ranges(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    data = tmp_path / "data"
    place(tiny_release, data / "w")
    d = Daemon(nodes, data, tmp_path / "state", "--scrub-interval", "1s")
    code, s = d.add(tiny_torrent.read_bytes(), "w", upload_rate="1000000", max_connections="20")
    assert code == 201 and s["limits"] == {"upload_rate": 1000000, "max_connections": 20}
    d.event("seeding", t.info_hash)
    leech = _fetch(nodes, tiny_torrent, tmp_path / "leech", "--web-seed", f"{d.api}/seed/{t.v1}/")
    assert leech.wait() == 0, leech.stderr
    assert tree_bytes(tmp_path / "leech" / t.name) == tree_bytes(tiny_release)

    params = (tiny_release / "params.json").read_bytes()
    code, body, headers = d.request("GET", f"/seed/{t.v2}/{t.name}/params.json", headers={"Range": "bytes=5-14"},
                                    token=None)
    assert code == 206 and body == params[5:15]
    assert headers["Content-Range"] == f"bytes 5-14/{len(params)}"
    code, _, headers = d.request("HEAD", f"/seed/{t.v1}/{t.name}/params.json", token=None)
    assert code == 200 and int(headers["Content-Length"]) == len(params)
    scrub = d.event("scrub_finished", t.info_hash)  # --scrub-interval: scrubs come by themselves
    assert scrub["reason"] == "schedule" and scrub["ok"] and scrub["pieces_checked"] == t.info.num_pieces()


def test_magnet_metadata_from_a_peer_then_download_into_data(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    data, state = tmp_path / "data", tmp_path / "state"
    data.mkdir()
    d = Daemon(nodes, data, state)
    code, s = d.add(save_path="incoming", magnet=f"magnet:?xt=urn:btih:{t.v1}&dn={t.name}")
    assert code == 201 and s["start"]["mode"] == "metadata" and s["pieces"]["total"] == 0
    good = tmp_path / "good"
    place(tiny_release, good)
    _fetch(nodes, tiny_torrent, good, "--peer", f"127.0.0.1:{d.port}", "--seed-after", "60s")
    assert d.event("metadata", t.v1)["name"] == t.name
    d.event("seeding", t.v1)
    assert tree_bytes(data / "incoming" / t.name) == tree_bytes(tiny_release)
    assert (state / "torrents" / f"{t.v1}.torrent").exists()  # so a restart needs no peer for the metadata


def test_after_a_crash_no_unverified_byte_is_served(nodes, tiny_release, tiny_torrent, tmp_path):
    """kill -9, then a byte rots keeping the file's size and mtime: neither the web seed nor a peer gets it."""
    import os

    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    ih = t.info_hash
    data, state = tmp_path / "data", tmp_path / "state"
    root = place(tiny_release, data)
    d = Daemon(nodes, data, state)
    assert d.add(tiny_torrent.read_bytes())[0] == 201
    d.event("resume_saved", ih)
    assert d.node.stop(signal.SIGKILL) == -signal.SIGKILL
    path = root / "consolidated.00.pth"
    st = path.stat()
    flip_byte(path, 300_000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the rot keeps the size and the mtime

    d2 = Daemon(nodes, data, state)
    d2.event("seeding", ih)
    assert d2.status(ih)["start"]["mode"] == "verify-on-upload"
    f = next(f for f in t.files() if f.path == "consolidated.00.pth")
    plen = t.info.piece_length()
    piece = (f.offset + 300_000) // plen
    begin = piece * plen - f.offset
    code, _, _ = d2.request("GET", f"/seed/{ih}/{t.name}/consolidated.00.pth",
                            headers={"Range": f"bytes={begin}-{begin + plen - 1}"}, token=None)
    assert code == 503  # hashed before it was sent, found bad, never sent
    bad = d2.event("bad_piece", ih)
    assert bad["piece"] == piece
    assert d2.event("checked", ih, after=bad)["have"] == t.info.num_pieces() - 1  # and taken out of service
    code, body, _ = d2.request("GET", f"/seed/{ih}/{t.name}/params.json", token=None)  # a good piece: served
    assert code == 200 and body == json.loads((tiny_release / "params.json").read_bytes())
    # A peer gets every other piece and never the rotten one.
    leech = _fetch(nodes, tiny_torrent, tmp_path / "leech", "--peer", f"127.0.0.1:{d2.port}")
    leech.wait_event(lambda e: e["event"] == "progress" and e["pieces"] == t.info.num_pieces() - 1)
    assert not any(e["event"] == "hash_failed" for e in leech.events)
