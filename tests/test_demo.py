"""The README's first command, end to end on a small release."""
from __future__ import annotations

import json
import subprocess

from tests.support import run_ws


def test_demo_runs_every_stage_and_stops_its_processes(tmp_path):
    work = tmp_path / "demo"
    r = run_ws("demo", "--workdir", work, "--leechers", "2", "--preset", "tiny", "--json", "--keep",
               "--timeout", "120", timeout=240)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["ok"]
    assert [s["name"] for s in summary["stages"]] == [
        "synth release", "torrent + daemon", "fetch x2", "verify", "convert + publish", "serve experts 0,3",
        "smoke test"]
    assert all(s["ok"] for s in summary["stages"])
    original = (work / "data" / "release" / "mixtral-demo" / "consolidated.00.pth").read_bytes()
    for node in ("node1", "node2"):
        assert (work / node / "mixtral-demo" / "consolidated.00.pth").read_bytes() == original
    served = work / "serving-node" / "mixtral-demo-experts"
    assert sorted(p.name for p in (served / "experts").iterdir()) == ["expert-00.safetensors", "expert-03.safetensors"]
    assert "6 absent" in summary["stages"][5]["detail"]
    assert "max |diff| 0.0" in summary["stages"][6]["detail"]
    # Every process the demo started is gone (daemon, fetchers, serving node).
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert left == []


def test_demo_cleans_up_without_keep(tmp_path):
    work = tmp_path / "demo"
    r = run_ws("demo", "--workdir", work, "--leechers", "1", "--preset", "tiny", "--timeout", "120", timeout=240)
    assert r.returncode == 0, r.stderr
    assert "demo: PASS" in r.stdout
    assert not work.exists()
