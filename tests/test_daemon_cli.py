"""The daemon's client commands as a user types them: paths inside --data, the ids `list` shows, finding the
daemon from --state alone, recheck after a repair, and a failed start that leaves nothing behind."""
from __future__ import annotations

import shutil
import socket

from tests.support import Daemon, flip_byte, free_port, place, run_ws


def _ws_daemon(state, *args):
    return run_ws("daemon", "--state", state, *args)


def test_client_finds_the_daemon_by_its_state_folder_and_takes_paths_and_short_ids(nodes, tiny_release,
                                                                                 tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    data, state = tmp_path / "data", tmp_path / "state"
    place(tiny_release, data / "models")
    port = free_port()
    node = nodes("daemon", "--data", data, "--state", state, "--api", f"127.0.0.1:{port}", "--listen",
                 "127.0.0.1:0", "--no-dht", "--json")
    node.wait_for("listening")
    # No --api: the client reads the address the daemon recorded in its state folder.
    r = _ws_daemon(state, "add", tiny_torrent, "--path", str(data / "models"))  # absolute, inside --data
    assert r.returncode == 0, r.stderr
    node.wait_event(lambda e: e["event"] == "seeding" and e.get("id") == t.info_hash)
    r = _ws_daemon(state, "list")
    assert r.returncode == 0, r.stderr
    short = r.stdout.split()[0]
    assert len(short) == 16 and t.info_hash.startswith(short)
    assert "1 peer " not in r.stdout and "0 peers" in r.stdout
    r = _ws_daemon(state, "scrub", short)  # every id that is shown is accepted
    assert r.returncode == 0 and f"scrub of {t.info_hash} queued" in r.stdout, r.stderr
    node.wait_event(lambda e: e["event"] == "scrub_finished")
    r = _ws_daemon(state, "add", tiny_torrent, "--path", str(tmp_path))  # outside --data
    assert r.returncode == 2 and "outside the data folder" in r.stderr
    r = _ws_daemon(state, "remove", t.info_hash[:5])
    assert r.returncode == 0 and f"removed {t.info_hash}" in r.stdout, r.stderr


def test_recheck_and_scrub_bring_back_a_repaired_piece(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    ih, n = t.info_hash, t.info.num_pieces()
    data = tmp_path / "data"
    root = place(tiny_release, data)
    d = Daemon(nodes, data, tmp_path / "state")
    assert d.add(tiny_torrent.read_bytes())[0] == 201
    d.event("resume_saved", ih)
    flip_byte(root / "consolidated.00.pth", 300_000)
    assert d.request("POST", f"/v1/torrents/{ih}/scrub")[0] == 202
    bad = d.event("bad_piece", ih)
    d.event("checked", ih, after=bad)
    assert d.until(lambda: d.status(ih)["pieces"]["have"] == n - 1)

    shutil.copy(tiny_release / "consolidated.00.pth", root / "consolidated.00.pth")  # the good file is back
    assert d.until(lambda: not d.status(ih)["state"].startswith("checking"))
    mark = d.node.events[-1]
    r = _ws_daemon(tmp_path / "state", "recheck", ih[:8])
    assert r.returncode == 0 and f"re-check of {ih} started" in r.stdout, r.stderr
    assert d.event("checked", ih, after=mark)["have"] == n
    assert d.until(lambda: d.status(ih)["progress"] == 1 and d.status(ih)["state"] == "seeding")

    # Again, but now a scrub finds the good data where the piece was missing and takes it back itself.
    flip_byte(root / "consolidated.00.pth", 300_000)
    mark = d.node.events[-1]
    assert d.request("POST", f"/v1/torrents/{ih}/scrub")[0] == 202
    bad = d.event("bad_piece", ih, after=mark)
    assert d.event("checked", ih, after=bad)["have"] == n - 1
    d.wait(lambda e: e["event"] == "scrub_finished", after=bad)
    shutil.copy(tiny_release / "consolidated.00.pth", root / "consolidated.00.pth")
    assert d.until(lambda: d.status(ih)["scrub"] is None and not d.status(ih)["state"].startswith("checking"))
    assert d.request("POST", f"/v1/torrents/{ih}/scrub")[0] == 202
    good = d.event("good_data", ih, after=bad)
    assert good["pieces"] == [bad["piece"]]
    assert d.until(lambda: d.status(ih)["progress"] == 1 and d.status(ih)["state"] == "seeding")


def test_a_daemon_that_cannot_start_leaves_no_state_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_ws("daemon", "--data", data, "--state", tmp_path / "new" / "state", "--api",
                   f"127.0.0.1:{busy.getsockname()[1]}", "--listen", "127.0.0.1:0", "--no-dht")
    assert r.returncode == 2, r.stderr
    assert "cannot listen" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
