"""Interrupted fetches continue where they stopped: kill -9 (no resume data) and Ctrl-C (resume data)."""
from __future__ import annotations

import signal

from tests.support import LOOPBACK, seeder, tree_bytes


def _half_done(e: dict) -> bool:
    return e["event"] == "progress" and e["wanted"] and 0.25 <= e["done"] / e["wanted"] < 0.85


def _interrupted_then_resumed(nodes, tiny_release, tiny_torrent, out, sig):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    # A slow seeder so the fetch is caught half way.
    seed = seeder(nodes, tiny_release, tiny_torrent, "--max-upload-rate", "200k")
    args = ["fetch", tiny_torrent, "-o", out, "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK, "--json",
            "--timeout", "30"]
    first = nodes(*args)
    first.wait_event(_half_done)
    code = first.stop(sig)
    resume = out / ".weightswarm" / f"{t.info_hash}.resume"
    if sig == signal.SIGINT:
        assert code == 130 and resume.exists()  # a clean stop leaves resume data for the next run
    else:
        assert code == -signal.SIGKILL and not resume.exists()  # a crash leaves none: the next run re-checks
    second = nodes(*args)
    checked = second.wait_event(lambda e: e["event"] in ("checked", "finished"))
    assert second.wait() == 0, second.stderr
    finished = next(e for e in second.events if e["event"] == "finished")
    assert tree_bytes(out / t.name) == tree_bytes(tiny_release)
    return t, checked, finished


def test_kill_9_half_way_then_rerun_downloads_only_the_missing_part(nodes, tiny_release, tiny_torrent, tmp_path):
    t, checked, finished = _interrupted_then_resumed(nodes, tiny_release, tiny_torrent, tmp_path / "out",
                                                     signal.SIGKILL)
    have, wanted = checked["have_bytes"], checked["wanted_bytes"]
    assert 0 < have < wanted  # the pieces on disk were re-hashed and kept
    missing = wanted - have
    assert finished["downloaded"] <= missing * 1.10 + t.info.piece_length(), (finished, missing)


def test_ctrl_c_saves_resume_data_and_rerun_continues(nodes, tiny_release, tiny_torrent, tmp_path):
    t, checked, finished = _interrupted_then_resumed(nodes, tiny_release, tiny_torrent, tmp_path / "out",
                                                     signal.SIGINT)
    have, wanted = checked["have_bytes"], checked["wanted_bytes"]
    assert 0 < have < wanted
    assert finished["downloaded"] <= (wanted - have) * 1.10 + t.info.piece_length()
