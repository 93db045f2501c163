"""Expert-selective distribution: a node fetches the dense file and two experts, nothing of the others."""
from __future__ import annotations

import json

from tests.support import LOOPBACK, run_ws, seeder


def test_fetch_two_experts_from_a_converted_release(nodes, converted, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    torrent = tmp_path / "experts.torrent"
    assert run_ws("create", converted, "-o", torrent).returncode == 0
    t = load_torrent(torrent)
    sizes = {f.path: f.size for f in t.payload_files()}
    seed = seeder(nodes, converted, torrent)
    f = nodes("fetch", torrent, "-o", tmp_path / "node", "--experts", "0,3", "--peer", f"127.0.0.1:{seed.port}",
              *LOOPBACK, "--json", "--timeout", "30")
    assert f.wait() == 0, f.stderr
    wanted = ["dense.safetensors", "experts/expert-00.safetensors", "experts/expert-03.safetensors",
              "manifest.json", "params.json", "tokenizer.model"]
    assert f.last["metadata"]["selected"] == sorted(wanted)
    got = tmp_path / "node" / t.name
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == wanted
    # Every file starts on a piece boundary (hybrid torrent): no byte of the other experts was downloaded.
    # The only slack: a file's last 16 KiB block goes whole over the wire, pad bytes included.
    fin = f.last["finished"]
    need = sum(sizes[p] for p in wanted)
    assert need <= fin["downloaded"] < need + len(wanted) * 16 * 1024
    # The figures add up: what came over the wire is the files, the padding of their last blocks,
    # redundant and failed blocks; protocol overhead is counted apart.
    assert fin["new"] == need == f.last["metadata"]["selected_size"]
    assert fin["downloaded"] == fin["new"] + fin["padding"] + fin["redundant"] + fin["failed"]
    assert fin["protocol"] > 0 and sum(fin["sources"].values()) <= fin["downloaded"]

    r = run_ws("verify", got, "--manifest", got / "manifest.json", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["manifest"] == {"passed": 5, "failed": 0, "absent": 6}
    assert summary["tensor"]["failed"] == 0
