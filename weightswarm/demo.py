"""`weightswarm demo`: the whole job on a local swarm, with nothing from the internet.

A synthetic release is made, torrented and seeded by a rate-limited seeder process; N fetch processes
download it through the swarm, sharing pieces with each other, and each verifies what it got. Every
process started here is stopped on the way out, also on Ctrl-C or failure.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from weightswarm.errors import InputError, SwarmError, WeightswarmError
from weightswarm.procs import LOOPBACK, WsProcess

@dataclass
class Stage:
    name: str
    seconds: float
    bytes: int
    ok: bool
    detail: str = ""


def run_demo(workdir: Path, leechers: int = 3, preset: str = "small", seed_rate: str = "4m",
             timeout: float = 300, show: Callable[[str], None] = print) -> list[Stage]:
    """Run the stages in order until one fails; returns their results."""
    from distrib.create import write_torrent
    from runner.synth import synthesize

    if leechers < 1:
        raise InputError(str(leechers), "--leechers must be at least 1")
    if not workdir.parent.is_dir():
        raise InputError(workdir.parent, "no such folder")
    workdir.mkdir(exist_ok=True)
    release = workdir / "release" / "mixtral-demo"
    torrent = workdir / "mixtral-demo.torrent"
    deadline = time.monotonic() + timeout
    stages: list[Stage] = []
    procs: list[WsProcess] = []

    def make_release():
        if not (release / "RELEASE").exists():  # a rerun with the same --workdir reuses it
            release.parent.mkdir(exist_ok=True)
            synthesize(release, preset=preset)
        files = [p for p in release.iterdir() if p.is_file()]
        return sum(p.stat().st_size for p in files), f"{len(files)} files ({preset} preset)"

    def make_torrent():
        t = write_torrent(release, torrent)
        return torrent.stat().st_size, f"{t.info.num_pieces()} pieces, info-hash {t.info_hash}"

    def start_seed():
        p = WsProcess("seed", release, "--torrent", torrent, *LOOPBACK, "--json", "--max-upload-rate", seed_rate,
                      name="seeder", stderr_path=workdir / "seeder.log")
        procs.append(p)
        p.wait_for("ready", deadline - time.monotonic())
        return 0, f"127.0.0.1:{p.last['listening']['port']}, upload limited to {seed_rate}/s"

    def swarm():
        seed = procs[0]
        peers = [f"127.0.0.1:{seed.last['listening']['port']}"]
        nodes = []
        for i in range(leechers):
            # Each node knows the seed and the nodes before it; connections go both ways once made.
            args = ["fetch", str(torrent), "-o", str(workdir / f"node{i + 1}"), *LOOPBACK, "--json",
                    "--seed-after", "1h"] + [a for p in peers for a in ("--peer", p)]
            n = WsProcess(*args, name=f"node{i + 1}", stderr_path=workdir / f"node{i + 1}.log")
            procs.append(n)
            nodes.append(n)
            peers.append(f"127.0.0.1:{n.port}")
        last_line = 0.0
        while not all("verify" in n.last for n in nodes):
            for n in nodes:
                if n.proc.poll() is not None and "verify" not in n.last:
                    raise SwarmError(n.name, f"fetch exited with status {n.proc.returncode}")
            if time.monotonic() > deadline:
                raise SwarmError("demo", "the swarm did not finish before the deadline")
            if time.monotonic() - last_line >= 1:
                last_line = time.monotonic()
                show("  " + "  ".join(_node_line(n) for n in nodes) + f"  | seed sent {_mb(_sent(seed))}")
            time.sleep(0.2)
        bad = [n.name for n in nodes if not n.last["verify"]["report"]["ok"]]
        if bad:
            raise SwarmError(", ".join(bad), "verification failed (pieces, RELEASE md5 or structure)")
        got, from_seed = sum(n.last["finished"]["downloaded"] for n in nodes), _sent(seed)
        return got, (f"{leechers} nodes got {_mb(got)}: {_mb(from_seed)} from the seed, "
                     f"{_mb(max(0, got - from_seed))} from each other; each verified pieces, md5, structure")

    def stage(name: str, fn: Callable[[], tuple[int, str]]) -> bool:
        show(f"== {name}")
        t0 = time.monotonic()
        try:
            nbytes, detail, ok = *fn(), True
        except InputError:
            raise
        except (WeightswarmError, OSError) as e:
            nbytes, detail, ok = 0, str(e), False
        stages.append(Stage(name, round(time.monotonic() - t0, 2), nbytes, ok, detail))
        return ok

    try:
        (stage("synth release", make_release) and stage("create torrent", make_torrent)
         and stage("seed", start_seed) and stage(f"fetch x{leechers} + verify", swarm))
    finally:
        for p in reversed(procs):
            p.stop()
    return stages


def _sent(seed: WsProcess) -> int:
    return seed.last.get("status", {}).get("uploaded", 0)


def _node_line(n: WsProcess) -> str:
    p = n.last.get("progress") or {}
    pct = 100 * p.get("done", 0) / p["wanted"] if p.get("wanted") else 0
    return f"{n.name} {pct:5.1f}% {p.get('peers', 0)}p"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def print_summary(stages: list[Stage], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": all(s.ok for s in stages), "stages": [asdict(s) for s in stages]}, indent=2))
        return
    print(f"\n{'stage':24} {'time':>8} {'bytes':>10}  result")
    for s in stages:
        print(f"{s.name:24} {s.seconds:7.2f}s {_mb(s.bytes):>10}  {'PASS' if s.ok else 'FAIL'}  {s.detail}")
    print("demo: PASS" if all(s.ok for s in stages) else "demo: FAIL")
