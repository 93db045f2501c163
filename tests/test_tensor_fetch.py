"""Fetching by tensor from a release in its original layout: only the pieces the dense tensors and the chosen
experts need, converted while they arrive, resumable after kill -9, widened later, and from a magnet."""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from tests.hostile import zip_bytes, zip_members
from tests.support import LOOPBACK, run_ws, seeder, tree_bytes

PLEN = 16 * 1024  # the smallest piece: the tiny release's expert tensors are 16 KiB each


@pytest.fixture(scope="module")
def small_pieces(tiny_release, tmp_path_factory):
    torrent = tmp_path_factory.mktemp("tensor-torrent") / "tiny-16k.torrent"
    r = run_ws("create", tiny_release, "-o", torrent, "--piece-size", "16k")
    assert r.returncode == 0, r.stderr
    return torrent


def _fetch(source, out, seed, *args):
    return run_ws("fetch", source, "-o", out, "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK, "--timeout", "30",
                  "--json", *args)


def _events(r) -> dict[str, dict]:
    return {e["event"]: e for e in map(json.loads, r.stdout.splitlines())}


def _needed(release, experts) -> tuple[int, int]:
    """(bytes of the .pth a node serving these experts needs, its tensors' count): the chosen tensors, and
    every byte of the archive that is no tensor (headers, data.pkl, central directory)."""
    from weightswarm.formats.layouts import open_layout
    from weightswarm.formats.perexpert import expert_of_tensor

    layout = open_layout(release)
    chosen = [t for t in layout.tensors.values() if (le := expert_of_tensor(t.name)) is None or le[1] in experts]
    size = (release / "consolidated.00.pth").stat().st_size
    return size - sum(t.nbytes for t in layout.tensors.values()) + sum(t.nbytes for t in chosen), len(chosen)


def _offline(release, out, experts: str):
    r = run_ws("convert", release, "-o", out, "--experts", experts)
    assert r.returncode == 0, r.stderr
    return tree_bytes(out)


def test_experts_0_fetches_the_pieces_it_needs_and_converts_them_as_they_come(
        nodes, tiny_release, small_pieces, tmp_path):
    seed = seeder(nodes, tiny_release, small_pieces)
    r = _fetch(small_pieces, tmp_path / "node", seed, "--experts", "0", "--convert", tmp_path / "conv")
    assert r.returncode == 0, r.stdout + r.stderr
    ev = _events(r)
    assert ev["verify"]["report"]["ok"]
    assert ev["tensor_map"]["experts"] == [0] and ev["converted"]["experts"] == [0]
    pth = tmp_path / "node" / tiny_release.name / "consolidated.00.pth"
    needed, tensors = _needed(tiny_release, (0,))
    bound = needed + 2 * PLEN * tensors
    # The file is sparse: its allocated blocks are what came, and the wire carried no more.
    assert pth.stat().st_size == (tiny_release / "consolidated.00.pth").stat().st_size
    assert pth.stat().st_blocks * 512 <= bound
    assert needed <= ev["finished"]["new"] <= bound + (tiny_release / "tokenizer.model").stat().st_size + PLEN
    assert ev["finished"]["new"] < 0.6 * pth.stat().st_size
    # Byte for byte what convert --experts makes of the whole release, and its manifest holds.
    assert tree_bytes(tmp_path / "conv") == _offline(tiny_release, tmp_path / "offline", "0")
    assert json.loads((tmp_path / "conv" / "manifest.json").read_text())["experts"] == [0]
    v = run_ws("verify", tmp_path / "conv", "--manifest", tmp_path / "conv" / "manifest.json")
    assert v.returncode == 0, v.stdout
    # The partial release checks out for the experts it was fetched for, and not for another one.
    root = tmp_path / "node" / tiny_release.name
    ok = run_ws("verify", root, "--torrent", small_pieces, "--experts", "0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = run_ws("verify", root, "--torrent", small_pieces, "--experts", "1")
    assert other.returncode == 1 and "missing or failed" in other.stdout
    # convert --experts reads a sparse source too: only the chosen tensors' bytes are touched.
    assert _offline(root, tmp_path / "from-sparse", "0") == tree_bytes(tmp_path / "conv")


def test_a_wider_selection_fetches_only_what_it_adds(nodes, tiny_release, small_pieces, tmp_path):
    seed = seeder(nodes, tiny_release, small_pieces)
    assert _fetch(small_pieces, tmp_path / "node", seed, "--experts", "0").returncode == 0
    r = _fetch(small_pieces, tmp_path / "node", seed, "--experts", "0,1")
    assert r.returncode == 0, r.stdout + r.stderr
    ev = _events(r)["finished"]
    only_0, n0 = _needed(tiny_release, (0,))
    both, n01 = _needed(tiny_release, (0, 1))
    assert ev["already_had"] >= only_0
    assert both - only_0 - 2 * PLEN * (n01 - n0) <= ev["new"] <= both - only_0 + 2 * PLEN * (n01 - n0)


def test_a_magnet_maps_the_tensors_once_its_metadata_is_in(nodes, tiny_release, small_pieces, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    seed = seeder(nodes, tiny_release, small_pieces)
    magnet = f"magnet:?xt=urn:btih:{load_torrent(small_pieces).v1}"
    r = _fetch(magnet, tmp_path / "node", seed, "--experts", "1", "--convert", tmp_path / "conv")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_bytes(tmp_path / "conv") == _offline(tiny_release, tmp_path / "offline", "1")


def test_kill_9_while_converting_then_the_same_command_continues(nodes, tiny_release, small_pieces, tmp_path):
    seed = seeder(nodes, tiny_release, small_pieces)
    args = ["fetch", small_pieces, "-o", tmp_path / "node", "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK,
            "--timeout", "30", "--json", "--experts", "0,2", "--convert", tmp_path / "conv"]
    journal = tmp_path / "conv" / ".convert" / "journal.jsonl"
    slow = nodes(*args, "--max-download-rate", "48k")
    slow.wait_event(lambda e: e["event"] == "progress" and journal.is_file() and journal.read_text().count("\n") >= 3)
    slow.stop(signal.SIGKILL)
    before = journal.read_text().splitlines()
    r = run_ws(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    ev = _events(r)
    assert ev["finished"]["already_had"] > 0  # what was verified before the kill is not fetched again
    assert not journal.exists()  # the finished job keeps only its record
    assert tree_bytes(tmp_path / "conv") == _offline(tiny_release, tmp_path / "offline", "0,2")
    written_before = {json.loads(line)["tensor"] for line in before if line.endswith("}")}
    assert written_before and ev["converted"]["tensors"] == _needed(tiny_release, (0, 2))[1]


def test_a_lying_zip_directory_is_refused_before_anything_is_converted(nodes, tiny_release, tmp_path):
    release = tmp_path / "lying" / tiny_release.name
    shutil.copytree(tiny_release, release)
    pth = release / "consolidated.00.pth"
    members = zip_members(pth.read_bytes())
    tensor = next(m.name for m in members if m.name.endswith("/data/1"))
    pth.write_bytes(zip_bytes(members, offsets={tensor: 0}))
    torrent = tmp_path / "lying.torrent"
    assert run_ws("create", release, "-o", torrent, "--piece-size", "16k").returncode == 0
    seed = seeder(nodes, release, torrent)
    r = run_ws("fetch", torrent, "-o", tmp_path / "node", "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK,
               "--timeout", "30", "--experts", "0", "--convert", tmp_path / "conv")
    assert r.returncode == 2, r.stdout + r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error: ") and "consolidated.00.pth: member" in first and "overlaps" in first, first
    assert not (tmp_path / "conv" / "manifest.json").exists()


def test_convert_of_a_per_expert_release_is_refused(nodes, converted, tmp_path):
    torrent = tmp_path / "experts.torrent"
    assert run_ws("create", converted, "-o", torrent).returncode == 0
    r = run_ws("fetch", torrent, "-o", tmp_path / "node", "--convert", tmp_path / "conv", *LOOPBACK, "--timeout", "5")
    assert r.returncode == 2
    assert "is already in the per-expert layout" in r.stderr.splitlines()[0]
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize("layout", ["split-parts", "hf-shards"])
def test_other_layouts_are_fetched_by_tensor_too(nodes, tiny_release, converted, tmp_path, layout):
    release = tmp_path / "release"
    if layout == "split-parts":
        assert run_ws("synth", release, "--preset", "tiny", "--split", "300k").returncode == 0
        assert (release / "consolidated.00.pth-split2").is_file()
    else:
        r = run_ws("export", converted, "-o", release, "--format", "hf", "--shard-size", "400k")
        assert r.returncode == 0, r.stderr
        assert (release / "model.safetensors.index.json").is_file()
    torrent = tmp_path / "release.torrent"
    assert run_ws("create", release, "-o", torrent, "--piece-size", "16k").returncode == 0
    seed = seeder(nodes, release, torrent)
    r = _fetch(torrent, tmp_path / "node", seed, "--experts", "3", "--convert", tmp_path / "conv")
    assert r.returncode == 0, r.stdout + r.stderr
    ev = _events(r)
    assert ev["verify"]["report"]["ok"] and ev["finished"]["new"] < 0.6 * ev["tensor_map"]["total_size"]
    assert tree_bytes(tmp_path / "conv") == _offline(release, tmp_path / "offline", "3")
