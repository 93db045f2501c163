"""`weightswarm demo`: the whole job on a local swarm, with nothing from the internet.

A synthetic release in the Mixtral torrent layout is torrented and seeded by the daemon (rate-limited, so
the fetchers must share); N fetch processes download it through the swarm and verify it; one copy is
converted to the per-expert layout, published through the daemon, and a serving node fetches only two
experts; the assembled model is then checked against the original checkpoint. Every process started
here is stopped on the way out, also on Ctrl-C or failure.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from weightswarm.core.errors import InputError, SwarmError, VerificationError, WeightswarmError
from weightswarm.core.interrupt import Stop
from weightswarm.core.units import human
from weightswarm.procs import LOOPBACK, WsProcess

SERVED_EXPERTS = "0,3"


@dataclass
class Stage:
    name: str
    seconds: float
    bytes: int
    ok: bool
    detail: str = ""
    exit_code: int = 0  # of the error that ended it: 1 wrong data, 2 bad input, 3 swarm, 130 interrupted


class Demo:
    def __init__(self, workdir: Path, leechers: int, preset: str, seed_rate: str, timeout: float,
                 show: Callable[[str], None]):
        self.work, self.leechers, self.preset, self.seed_rate, self.show = workdir, leechers, preset, seed_rate, show
        self.data = workdir / "data"  # the daemon's root: everything it serves lies below
        self.release = self.data / "release" / "mixtral-demo"
        self.experts = self.data / "experts" / "mixtral-demo-experts"
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.procs: list[WsProcess] = []
        self.stages: list[Stage] = []
        self.daemon: WsProcess | None = None
        self.api = None  # the daemon's ApiClient
        self.nodes: list[WsProcess] = []

    def run(self) -> list[Stage]:
        try:
            (self.stage("synth release", self.synth) and self.stage("torrent + daemon", self.start_daemon)
             and self.stage(f"fetch x{self.leechers}", self.swarm) and self.stage("verify", self.verify)
             and self.stage("convert + publish", self.convert)
             and self.stage(f"serve experts {SERVED_EXPERTS}", self.serve)
             and self.stage("smoke test", self.smoke))
        finally:
            for p in reversed(self.procs):
                p.stop()
        return self.stages

    def stage(self, name: str, fn: Callable[[], tuple[int, str]]) -> bool:
        t0 = time.monotonic()
        try:  # the heading too: a Ctrl-C right after it is still this stage's
            self.show(f"== {name}")
            nbytes, detail = fn()
            ok, code = True, 0
        except InputError:
            raise
        except (Stop, KeyboardInterrupt):
            nbytes, detail, ok, code = 0, "interrupted (Ctrl-C)", False, 130
        except WeightswarmError as e:
            nbytes, detail, ok, code = 0, str(e), False, e.exit_code
        except Exception as e:  # whatever broke, the stage fails and the summary is still printed
            nbytes, detail, ok, code = 0, f"{type(e).__name__}: {e}", False, 1
        self.stages.append(Stage(name, round(time.monotonic() - t0, 2), nbytes, ok, detail, code))
        return ok

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SwarmError("demo", f"did not finish within --timeout {self.timeout:g} s",
                             hint="a slower machine needs a longer --timeout")
        return left

    # ---- stages: each returns (bytes, detail) or raises

    def synth(self) -> tuple[int, str]:
        from weightswarm.convert.synth import synthesize

        if not (self.release / "RELEASE").exists():  # a rerun with the same --workdir reuses it
            self.release.parent.mkdir(parents=True, exist_ok=True)
            synthesize(self.release, preset=self.preset)
        files = [p for p in self.release.iterdir() if p.is_file()]
        return sum(p.stat().st_size for p in files), f"{len(files)} files in the Mixtral layout ({self.preset} preset)"

    def start_daemon(self) -> tuple[int, str]:
        from weightswarm.distrib.daemon.client import ApiClient

        shutil.rmtree(self.work / "state", ignore_errors=True)  # a rerun with --keep registers afresh
        self.daemon = WsProcess("daemon", "--data", self.data, "--state", self.work / "state", "--api", "127.0.0.1:0",
                                *LOOPBACK, "--json", "--max-upload-rate", self.seed_rate, "--scrub-interval", "0",
                                name="daemon", stderr_path=self.work / "daemon.log")
        self.procs.append(self.daemon)
        self.daemon.wait_for("listening", self.left())
        self.api = ApiClient.for_state(self.work / "state", timeout=min(30.0, self.left()))
        t = self.publish(self.release, self.work / "mixtral-demo.torrent", "release")
        return 0, (f"{t.info.num_pieces()} pieces, info-hash {t.info_hash}; daemon on 127.0.0.1:"
                   f"{self.daemon.port}, upload limited to {self.seed_rate}/s")

    def publish(self, folder: Path, torrent: Path, save_path: str):
        """Make FOLDER's torrent and register it with the daemon; returns once the daemon seeds it."""
        from weightswarm.distrib.create import write_torrent

        t = write_torrent(folder, torrent, force=True)
        self.api.add(torrent.read_bytes(), save_path=save_path)
        self.daemon.wait_event(lambda e: e["event"] == "seeding" and e.get("id") in (t.v1, t.v2), self.left())
        return t

    def swarm(self) -> tuple[int, str]:
        peers = [f"127.0.0.1:{self.daemon.port}"]
        for i in range(self.leechers):
            # Each node knows the daemon and the nodes before it; connections go both ways once made.
            n = WsProcess("fetch", self.work / "mixtral-demo.torrent", "-o", self.work / f"node{i + 1}", *LOOPBACK,
                          "--json", "--seed-after", "1h", *[a for p in peers for a in ("--peer", p)],
                          name=f"node{i + 1}", stderr_path=self.work / f"node{i + 1}.log")
            self.procs.append(n)
            self.nodes.append(n)
            peers.append(f"127.0.0.1:{n.port}")
        last_line = 0.0
        while not all("verify" in n.last for n in self.nodes):
            for n in self.nodes:
                if n.proc.poll() is not None and "verify" not in n.last:
                    raise SwarmError(n.name, f"fetch exited with status {n.proc.returncode}")
            self.left()
            if time.monotonic() - last_line >= 1:
                last_line = time.monotonic()
                self.show("  " + "  ".join(_node_line(n) for n in self.nodes) +
                          f"  | daemon sent {human(self.api.uploaded())}")
            try:  # a 0.2 s pause that notices at once if the first node ends
                self.nodes[0].proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        daemon = f"127.0.0.1:{self.daemon.port}"  # the nodes dial it, so they know it by its listen port
        payload = sum(p.stat().st_size for p in self.release.iterdir() if p.is_file())
        sent = 0  # counted where it arrived: the daemon's own counter lags its last second of sending
        for n in self.nodes:
            fin = n.last["finished"]
            from_daemon = fin["sources"].get(daemon, 0)
            sent += from_daemon
            extra = fin["downloaded"] - fin["new"]
            self.show(f"  {n.name}: {human(fin['new'])} of files + {human(extra)} of block padding and redundant "
                      f"blocks: {human(from_daemon)} from the daemon, "
                      f"{human(max(0, fin['downloaded'] - from_daemon))} from other nodes")
        got = sum(n.last["finished"]["downloaded"] for n in self.nodes)
        return got, (f"{self.leechers} nodes received {human(got)} for a {human(payload)} release; the daemon "
                     f"sent {human(sent)} ({sent / payload:.2f}x the payload), the nodes each other the rest")

    def verify(self) -> tuple[int, str]:
        reports = [n.last["verify"]["report"] for n in self.nodes]
        bad = [n.name for n, r in zip(self.nodes, reports, strict=True) if not r["ok"]]
        if bad:
            raise VerificationError(", ".join(bad), "verification failed (pieces, RELEASE md5 or structure)")
        checks = ", ".join(f"{k} {v['passed']}" for k, v in reports[0]["summary"].items())
        return 0, f"every node: {checks} passed"

    def convert(self) -> tuple[int, str]:
        from weightswarm.convert.convert import convert

        self.experts.parent.mkdir(parents=True, exist_ok=True)
        convert(self.work / "node1" / "mixtral-demo", self.experts)  # a rerun of a finished job is a no-op
        t = self.publish(self.experts, self.work / "mixtral-demo-experts.torrent", "experts")
        size = sum(f.size for f in t.payload_files())
        return size, f"{len(t.payload_files())} files (dense + one per expert), published by the daemon"

    def serve(self) -> tuple[int, str]:
        from weightswarm.verify.manifest import verify_manifest

        out = self.work / "serving-node"
        n = WsProcess("fetch", self.work / "mixtral-demo-experts.torrent", "-o", out, "--experts", SERVED_EXPERTS,
                      "--peer", f"127.0.0.1:{self.daemon.port}", *LOOPBACK, "--json", name="serving node",
                      stderr_path=self.work / "serving-node.log")
        self.procs.append(n)
        code = n.wait(self.left())
        if code:
            raise SwarmError("serving node", f"fetch exited with status {code}")
        root = out / "mixtral-demo-experts"
        findings = verify_manifest(root, root / "manifest.json")
        files = [f for f in findings if f.check == "manifest"]
        if not all(f.ok for f in findings):
            raise VerificationError(root, "manifest check failed")
        have = sum(1 for f in files if not f.absent)
        return n.last["finished"]["downloaded"], (f"{have} files verified against the manifest, "
                                                  f"{len(files) - have} absent (the other experts)")

    def smoke(self) -> tuple[int, str]:
        from weightswarm.runner.smoke import smoke
        from weightswarm.runner.tokenizer import printable

        r = smoke(self.experts, prompt="The weights of the swarm", max_new_tokens=8, reference=self.release,
                  dtype="float32")
        if not r["passed"]:
            raise VerificationError(self.experts, "smoke test failed: " + json.dumps(r["checks"]))
        return 0, (f"per-expert model = original checkpoint (max |diff| {r['max_abs_diff']}, "
                   f"{r['checks']['reference']['comparison']}); greedy: {printable(r.get('text', ''))}")


def run_demo(workdir: Path, leechers: int = 3, preset: str = "small", seed_rate: str = "4m",
             timeout: float = 300, show: Callable[[str], None] = print) -> list[Stage]:
    """Run the stages in order until one fails; returns their results."""
    if not workdir.parent.is_dir():
        raise InputError(workdir.parent, "no such folder")
    workdir.mkdir(exist_ok=True)
    return Demo(workdir, leechers, preset, seed_rate, timeout, show).run()


def _node_line(n: WsProcess) -> str:
    p = n.last.get("progress") or {}
    pct = 100 * p.get("done", 0) / p["wanted"] if p.get("wanted") else 0
    return f"{n.name} {pct:5.1f}% {p.get('peers', 0)}p"


def print_summary(stages: list[Stage], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": all(s.ok for s in stages), "stages": [asdict(s) for s in stages]}, indent=2))
        return
    print(f"\n{'stage':24} {'time':>8} {'bytes':>10}  result")
    for s in stages:
        print(f"{s.name:24} {s.seconds:7.2f}s {human(s.bytes):>10}  {'PASS' if s.ok else 'FAIL'}  {s.detail}")
    print("demo: PASS" if all(s.ok for s in stages) else "demo: FAIL")
