"""A selection can be widened in the same folder, and a bad --experts list is refused before anything is fetched."""
from __future__ import annotations

import json

import pytest

from tests.support import LOOPBACK, run_ws, seeder, tree_bytes


def _fetch(torrent, out, seed, *args):
    return run_ws("fetch", torrent, "-o", out, "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK, "--timeout", "30",
                  "--json", *args)


def _events(r) -> dict[str, dict]:
    return {e["event"]: e for e in map(json.loads, r.stdout.splitlines())}


def test_a_partial_fetch_is_completed_by_the_same_command_without_only(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    seed = seeder(nodes, tiny_release, tiny_torrent)
    first = _fetch(tiny_torrent, tmp_path, seed, "--only", "params.json")
    assert first.returncode == 0, first.stdout + first.stderr
    second = _fetch(tiny_torrent, tmp_path, seed)  # resume data from the first run, a wider selection
    assert second.returncode == 0, second.stdout + second.stderr
    ev = _events(second)
    assert ev["verify"]["report"]["ok"]
    params = (tiny_release / "params.json").stat().st_size
    assert ev["finished"]["already_had"] == params  # kept what was verified...
    assert ev["finished"]["new"] == ev["finished"]["wanted"] - params  # ...and fetched only what it adds
    assert tree_bytes(tmp_path / t.name) == tree_bytes(tiny_release)


def test_experts_widened_from_0_3_to_1(nodes, converted, tmp_path):
    torrent = tmp_path / "experts.torrent"
    assert run_ws("create", converted, "-o", torrent).returncode == 0
    seed = seeder(nodes, converted, torrent)
    assert _fetch(torrent, tmp_path / "node", seed, "--experts", "0,3").returncode == 0
    r = _fetch(torrent, tmp_path / "node", seed, "--experts", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    ev = _events(r)
    assert ev["metadata"]["selected"] == ["dense.safetensors", "experts/expert-01.safetensors", "manifest.json",
                                          "params.json", "tokenizer.model"]
    got = tmp_path / "node" / converted.name / "experts"
    assert sorted(p.name for p in got.iterdir()) == ["expert-00.safetensors", "expert-01.safetensors",
                                                     "expert-03.safetensors"]
    expert1 = (converted / "experts" / "expert-01.safetensors").stat().st_size
    assert expert1 <= ev["finished"]["new"] < expert1 + 64 * 1024  # only the added expert came over the wire


@pytest.mark.parametrize("experts, problem", [
    ("9", "no expert 9 here: the valid experts are 0-7"),
    ("0,x", "'x' is not an expert number or range"),
    ("1,1", "expert 1 is listed twice"),
    ("3-1", "range 3-1 runs backwards"),
])
def test_bad_expert_lists_are_refused(nodes, converted, tmp_path, experts, problem):
    torrent = tmp_path / "experts.torrent"
    assert run_ws("create", converted, "-o", torrent).returncode == 0
    r = run_ws("fetch", torrent, "-o", tmp_path / "node", "--experts", experts, *LOOPBACK, "--timeout", "5")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines()[0] == f"Error: --experts {experts}: {problem}"
    assert not (tmp_path / "node").exists()


def test_experts_on_a_release_without_weights_by_tensor_is_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("no weights here\n")
    torrent = tmp_path / "notes.torrent"
    assert run_ws("create", folder, "-o", torrent).returncode == 0
    r = run_ws("fetch", torrent, "-o", tmp_path / "node", "--experts", "0", *LOOPBACK, "--timeout", "5")
    assert r.returncode == 2
    assert "whose tensors can be fetched one by one" in r.stderr.splitlines()[0]
    assert not (tmp_path / "node").exists()
