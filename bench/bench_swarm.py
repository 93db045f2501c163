"""One release from one origin to N hosts on shaped links: the swarm against plain HTTP and aria2c.

    sudo python bench/bench_swarm.py [--preset medium] [--ns 2,4,8,16] [--rate 100] [--plot bench/swarm.png]

Each N gets a fresh testbed (weightswarm.testbed): a tracker host, the origin and N fetcher hosts, every link
shaped to --rate Mbit/s both ways. R is the origin link's goodput (95.6% of the line rate: TCP/IP and
Ethernet headers), S the payload, so S/R is the least time any method can take and N x S/R what the origin
needs to send it to everyone itself. Runs, each timed from the common start to the last host's completion:
the swarm with weightswarm's default (distinct pieces) and with --no-distinct-pieces; curl from
`python -m http.server` on the origin; aria2c fetchers from the weightswarm origin. Then, on loopback with no
shaping, an origin capped at --loopback-cap serving --loopback-n fetchers, and one uncapped fetch by
weightswarm against aria2c from the same seeder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from weightswarm.core.units import parse_bytes
from weightswarm.distrib.torrentfile import load_torrent
from weightswarm.procs import WS
from weightswarm.testbed import (
    PEER_PORT,
    TRACKER_PORT,
    Fetcher,
    Host,
    Testbed,
    fetch_all,
    run_swarm,
    start_tracker,
    unavailable,
    wait_port,
)

GOODPUT = 0.956  # of a tbf line rate, measured with one TCP stream (shared/NETNS.md)
HTTP_PORT = 8000


def cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return sum(v) - v[3] - v[4], sum(v)


def busy_since(mark: tuple[int, int]) -> float:
    busy, total = cpu_busy()
    return (busy - mark[0]) / max(1, total - mark[1])


def pause(p: subprocess.Popen) -> None:
    """A 50 ms poll interval that returns at once when p exits."""
    try:
        p.wait(timeout=0.05)
    except subprocess.TimeoutExpired:
        pass
    if p.poll() is not None:
        time.sleep(0.05)


def wait_all(procs: list[subprocess.Popen], t0: float, timeout: float) -> list[float]:
    """Seconds from t0 to each process's exit (they must all exit 0)."""
    done: dict[int, float] = {}
    deadline = t0 + timeout
    while len(done) < len(procs):
        for i, p in enumerate(procs):
            if i not in done and p.poll() is not None:
                if p.returncode:
                    raise SystemExit(f"{p.args}: exit {p.returncode}")
                done[i] = time.monotonic() - t0
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {len(procs) - len(done)} of {len(procs)} still running")
        pause(procs[0])
    return [done[i] for i in range(len(procs))]


def http_run(bed: Testbed, release: Path, files: list[Path], fetchers: list[str], work: Path) -> float:
    origin = bed["origin"]
    server = origin.popen([sys.executable, "-m", "http.server", HTTP_PORT, "--bind", origin.addr,
                           "--directory", release.parent], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(origin, HTTP_PORT, server)
    t0 = time.monotonic()
    procs = []
    for f in fetchers:
        urls = []
        for p in files:
            rel = p.relative_to(release.parent).as_posix()
            urls += [f"http://{origin.addr}:{HTTP_PORT}/{rel}", "-o", str(work / f"http-{f}" / rel)]
        procs.append(bed[f].popen(["curl", "-sS", "--fail", "--create-dirs", *urls]))
    times = wait_all(procs, t0, 1800)
    server.kill()
    return max(times)


def aria2c_run(bed: Testbed, release: Path, torrent: Path, fetchers: list[str], work: Path, payload: int) -> dict:
    origin = bed["origin"]
    seeder = origin.ws("seed", release, "--torrent", torrent, "--listen", f"{origin.addr}:{PEER_PORT}", "--no-dht",
                       "--json", stderr_path=work / "aria-origin.log")
    seeder.wait_event(lambda e: e["event"] == "ready", timeout=300)
    t0 = time.monotonic()
    procs = []
    for f in fetchers:
        out = work / f"aria-{f}"
        out.mkdir(parents=True)
        hook = out / "done.sh"
        hook.write_text(f"#!/bin/sh\ntouch {out / 'done'}\n")
        hook.chmod(0o755)
        procs.append(bed[f].popen(
            ["aria2c", f"--dir={out}", "--seed-time=60", f"--listen-port={PEER_PORT}", "--enable-dht=false",
             "--bt-enable-lpd=false", f"--on-bt-download-complete={hook}", "--console-log-level=error",
             "--summary-interval=0", "--file-allocation=none", "--bt-hash-check-seed=false", torrent],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    done: dict[str, float] = {}
    while len(done) < len(fetchers):
        for f in fetchers:
            if f not in done and (work / f"aria-{f}" / "done").exists():
                done[f] = time.monotonic() - t0
        if time.monotonic() - t0 > 1800 or any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("aria2c fetchers did not finish")
        pause(seeder.proc)
    mark = len(seeder.events)
    while len(later := [e for e in seeder.events[mark:] if e["event"] == "status"]) < 2:
        seeder.wait_event(lambda e: e["event"] == "status", timeout=10)
    seeder.stop()
    for p in procs:
        p.kill()
        p.wait()
    return {"last": max(done.values()), "origin": later[-1]["uploaded"] / payload}


def shaped(args, release: Path, files: list[Path], payload: int, root: Path) -> list[dict]:
    rows = []
    sr = payload / (args.rate * 1e6 / 8 * GOODPUT)
    for n in args.ns:
        fetchers = [f"f{i}" for i in range(n)]
        names = ["tracker", "origin", *fetchers]
        row: dict = {"n": n, "payload": payload, "S/R": round(sr, 2)}
        with Testbed(names, rate_mbit=args.rate) as bed:
            torrent = root / "release.torrent"
            if not torrent.exists():
                subprocess.run([*WS, "create", release, "-o", torrent, "--format", "v1", "--tracker",
                                f"http://{bed['tracker'].addr}:{TRACKER_PORT}/announce"], check=True,
                               capture_output=True)
            t = load_torrent(torrent)
            start_tracker(bed["tracker"], root / f"ot-{n}", [t.v1])
            origin = bed["origin"]
            for label, extra in (("swarm", []), ("stock", ["--no-distinct-pieces"])):
                work = root / f"{label}-{n}"
                work.mkdir()
                mark = cpu_busy()
                seed_cmd = ["seed", release, "--torrent", torrent, "--listen", f"{origin.addr}:{PEER_PORT}",
                            "--no-dht", *extra]
                r = run_swarm(origin, seed_cmd, {f: (bed[f], f"{bed[f].addr}:{PEER_PORT}") for f in fetchers},
                              torrent, extra, work, payload, timeout=900)
                row[label] = {"last": round(r.last, 2), "x": round(r.last / sr, 3),
                              "origin": round(r.origin_uploaded / payload, 3),
                              "wire": round(r.origin_wire / payload, 3), "cpu": round(busy_since(mark), 2),
                              "times": sorted(round(t, 1) for t in r.finished.values())}
                shutil.rmtree(work)
            if shutil.which("curl"):
                work = root / f"http-{n}"
                work.mkdir()
                last = http_run(bed, release, files, fetchers, work)
                row["http"] = {"last": round(last, 2), "x": round(last / sr, 3), "origin": n}
                shutil.rmtree(work)
            if shutil.which("aria2c"):
                work = root / f"aria-{n}"
                work.mkdir()
                a = aria2c_run(bed, release, torrent, fetchers, work, payload)
                row["aria2c"] = {"last": round(a["last"], 2), "x": round(a["last"] / sr, 3),
                                 "origin": round(a["origin"], 3)}
                shutil.rmtree(work)
            assert not bed.delay_note
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def tracked_torrent(bed: Testbed, folder: Path, out: Path, *fmt: str) -> Path:
    subprocess.run([*WS, "create", folder, "-o", out, *fmt, "--force", "--tracker",
                    f"http://{bed['tracker'].addr}:{TRACKER_PORT}/announce"], check=True, capture_output=True)
    return out


def whitelist(torrents: list[Path]) -> list[str]:
    hashes = []
    for p in torrents:
        t = load_torrent(p)
        hashes += [h for h in (t.v1, t.v2[:40] if t.v2 else None) if h]
    return hashes


def daemon_run(args, root: Path, n: int) -> dict:
    """The daemon as the origin of two releases at once, n/2 fetchers each; origin bytes from its link."""
    fetchers = [f"f{i}" for i in range(n)]
    data = root / "daemon-data"
    releases = []
    for k in range(2):
        rel = data / f"r{k}" / f"mixtral-synth-{k}"
        rel.parent.mkdir(parents=True)
        subprocess.run([*WS, "synth", rel, "--preset", args.preset, "--seed", str(k)], check=True,
                       capture_output=True)
        releases.append(rel)
    payload = sum(p.stat().st_size for r in releases for p in r.rglob("*") if p.is_file())
    sr = payload / (args.rate * 1e6 / 8 * GOODPUT)
    with Testbed(["tracker", "origin", *fetchers], rate_mbit=args.rate) as bed:
        torrents = [tracked_torrent(bed, r, root / f"d{k}.torrent", "--format", "v1") for k, r in enumerate(releases)]
        start_tracker(bed["tracker"], root / "ot-daemon", whitelist(torrents))
        origin = bed["origin"]
        state = root / "daemon-state"
        d = origin.ws("daemon", "--data", data, "--state", state, "--api", "127.0.0.1:0", "--listen",
                      f"{origin.addr}:{PEER_PORT}", "--no-dht", "--json", stderr_path=root / "daemon.log")
        d.wait_event(lambda e: e["event"] == "listening", timeout=60)
        for k, t in enumerate(torrents):
            r = subprocess.run([*origin.prefix, *WS, "daemon", "--state", state, "add", t, "--path", f"r{k}"],
                               capture_output=True, text=True, timeout=60)
            if r.returncode:
                raise SystemExit(f"daemon add: {r.stderr}")
        for _ in torrents:
            d.wait_event(lambda e: e["event"] == "seeding", timeout=300)
        wire0 = origin.tx_bytes()
        work = root / "daemon-work"
        work.mkdir()
        done = fetch_all({f: Fetcher(bed[f], f"{bed[f].addr}:{PEER_PORT}", torrents[i % 2])
                          for i, f in enumerate(fetchers)}, work, timeout=900)
        wire = origin.tx_bytes() - wire0
    shutil.rmtree(data)
    row = {"n": n, "torrents": 2, "payload": payload, "S/R": round(sr, 2), "last": round(max(done.values()), 2),
           "x": round(max(done.values()) / sr, 3), "origin_wire": round(wire / payload, 3),
           "times": sorted(round(t, 1) for t in done.values())}
    print(json.dumps({"daemon": row}), flush=True)
    return row


def experts_run(args, release: Path, root: Path, n: int) -> dict:
    """Expert-parallel fan-out: node i fetches the dense file and expert i mod 8 of the per-expert torrent."""
    per_expert = root / "per-expert" / "mixtral-experts"
    per_expert.parent.mkdir()
    subprocess.run([*WS, "convert", release, "-o", per_expert], check=True, capture_output=True)
    sizes = {p.name: p.stat().st_size for p in per_expert.rglob("*") if p.is_file()}
    experts = sorted(k for k in sizes if k.startswith("expert"))
    dense = sum(v for k, v in sizes.items() if not k.startswith("expert"))
    chosen = {i % len(experts) for i in range(n)}
    union = dense + sum(sizes[experts[e]] for e in chosen)
    rate = args.rate * 1e6 / 8 * GOODPUT
    ideal = max(union, dense + max(sizes[e] for e in experts)) / rate
    fetchers = [f"f{i}" for i in range(n)]
    with Testbed(["tracker", "origin", *fetchers], rate_mbit=args.rate) as bed:
        torrent = tracked_torrent(bed, per_expert, root / "experts.torrent")  # hybrid: files start on pieces
        start_tracker(bed["tracker"], root / "ot-experts", whitelist([torrent]))
        origin = bed["origin"]
        work = root / "experts-work"
        work.mkdir()
        seeder = origin.ws("seed", per_expert, "--torrent", torrent, "--listen", f"{origin.addr}:{PEER_PORT}",
                           "--no-dht", "--json", stderr_path=root / "experts-origin.log")
        seeder.wait_event(lambda e: e["event"] == "ready", timeout=300)
        wire0 = origin.tx_bytes()
        done = fetch_all({f: Fetcher(bed[f], f"{bed[f].addr}:{PEER_PORT}", torrent,
                                     ("--experts", str(i % len(experts)))) for i, f in enumerate(fetchers)},
                         work, timeout=900)
        wire = origin.tx_bytes() - wire0
    row = {"n": n, "experts": len(experts), "node_bytes": dense + sizes[experts[0]], "union": union,
           "ideal_s": round(ideal, 2), "last": round(max(done.values()), 2), "x": round(max(done.values()) / ideal, 3),
           "origin_wire": round(wire / union, 3)}
    print(json.dumps({"experts": row}), flush=True)
    return row


def loopback(args, release: Path, payload: int, root: Path) -> dict:
    """Everything on one host's 127.0.0.1 (its own namespace), the origin capped by --max-upload-rate."""
    cap = parse_bytes(args.loopback_cap)
    sr = payload / cap
    with Testbed(["box"], rate_mbit=0) as bed:
        box: Host = bed["box"]
        torrent = root / "loopback.torrent"
        subprocess.run([*WS, "create", release, "-o", torrent, "--format", "v1", "--force", "--tracker",
                        f"http://127.0.0.1:{TRACKER_PORT}/announce"], check=True, capture_output=True)
        box.addr = "127.0.0.1"  # every process of this run talks over the namespace's own loopback
        start_tracker(box, root / "ot-lo", [load_torrent(torrent).v1])
        row: dict = {"n": args.loopback_n, "cap": cap, "payload": payload, "S/R": round(sr, 2)}
        for label, extra in (("swarm", []), ("stock", ["--no-distinct-pieces"])):
            work = root / f"lo-{label}"
            work.mkdir()
            seed_cmd = ["seed", release, "--torrent", torrent, "--listen", f"127.0.0.1:{PEER_PORT}", "--no-dht",
                        "--max-upload-rate", args.loopback_cap, *extra]
            fetchers = {f"f{i}": (box, f"127.0.0.1:{PEER_PORT + 1 + i}") for i in range(args.loopback_n)}
            r = run_swarm(box, seed_cmd, fetchers, torrent, extra, work, payload, timeout=900)
            row[label] = {"last": round(r.last, 2), "x": round(r.last / sr, 3),
                          "origin": round(r.origin_uploaded / payload, 3)}
            shutil.rmtree(work)
        row["one_to_one"] = one_to_one(box, release, torrent, root)
    print(json.dumps(row), flush=True)
    return row


def one_to_one(box: Host, release: Path, torrent: Path, root: Path) -> dict:
    """Uncapped, one seeder, one fetcher: weightswarm fetch against aria2c, best of three each (aria2c has
    no way to be handed a peer: both also find the seeder through the tracker)."""
    seeder = box.ws("seed", release, "--torrent", torrent, "--listen", "127.0.0.1:7000", "--no-dht", "--json")
    seeder.wait_event(lambda e: e["event"] == "ready", timeout=300)
    out: dict = {}
    for tool in ("weightswarm", "aria2c"):
        if tool == "aria2c" and not shutil.which("aria2c"):
            continue
        best = float("inf")
        for k in range(3):
            dest = root / f"one-{tool}-{k}"
            if tool == "weightswarm":
                cmd = [*WS, "fetch", torrent, "-o", dest, "--peer", "127.0.0.1:7000", "--listen", "127.0.0.1:7001",
                       "--no-dht", "--no-verify"]
            else:
                cmd = ["aria2c", f"--dir={dest}", "--seed-time=0", "--enable-dht=false", "--bt-enable-lpd=false",
                       "--listen-port=7001", "--file-allocation=none", "--console-log-level=error",
                       "--summary-interval=0",
                       torrent]
            t0 = time.monotonic()
            box.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=600)
            best = min(best, time.monotonic() - t0)
            shutil.rmtree(dest, ignore_errors=True)
        out[tool] = round(best, 2)
    seeder.stop()
    if "aria2c" in out:
        out["ratio"] = round(out["aria2c"] / out["weightswarm"], 2)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ns = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    sr = rows[0]["S/R"]
    a.plot(ns, [sr] * len(ns), "k--", label="S/R (least possible)")
    a.plot(ns, [1.3 * sr] * len(ns), "k:", label="1.3 x S/R (goal)")
    for key, style, label in (("swarm", "o-", "weightswarm (default)"), ("stock", "s-", "--no-distinct-pieces"),
                              ("aria2c", "^-", "aria2c fetchers"), ("http", "x-", "HTTP (curl, http.server)")):
        if all(key in r for r in rows):
            a.plot(ns, [r[key]["last"] for r in rows], style, label=label)
    a.set(xlabel="fetcher hosts N", ylabel="last host done (s)", xscale="log", yscale="log",
          title=f"{rows[0]['payload'] / 1e6:.0f} MB to N hosts, 100 Mbit/s links")
    a.set_xticks(ns, [str(n) for n in ns])
    a.xaxis.set_minor_formatter(NullFormatter())
    a.legend(fontsize=8)
    for key, style, label in (("swarm", "o-", "weightswarm (default)"), ("stock", "s-", "--no-distinct-pieces"),
                              ("aria2c", "^-", "aria2c fetchers")):
        if all(key in r for r in rows):
            b.plot(ns, [r[key]["origin"] for r in rows], style, label=label)
    b.axhline(1.1, color="k", ls=":", label="1.1 x (goal)")
    b.axhline(1.0, color="k", ls="--", label="the payload once")
    b.set(xlabel="fetcher hosts N", ylabel="origin upload / payload", xscale="log", title="what the origin sent")
    b.set_xticks(ns, [str(n) for n in ns])
    b.xaxis.set_minor_formatter(NullFormatter())
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ns = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--ns", default="2,4,8,16", type=ns)
    ap.add_argument("--rate", default=100.0, type=float, help="link rate, Mbit/s")
    ap.add_argument("--loopback-n", default=6, type=int)
    ap.add_argument("--loopback-cap", default="16m")
    ap.add_argument("--skip-loopback", action="store_true")
    ap.add_argument("--daemon", default="8", type=ns, help="N for the daemon run with two torrents ('' skips)")
    ap.add_argument("--experts", default="8", type=ns, help="N for the expert fan-out ('' skips)")
    ap.add_argument("--plot", default="bench/swarm.png")
    ap.add_argument("--work", default=None, help="scratch folder [default: a temporary one]")
    args = ap.parse_args()
    if reason := unavailable():
        raise SystemExit(f"cannot run: {reason}")
    print(machine())
    root = Path(tempfile.mkdtemp(prefix="ws-swarm-", dir=args.work))
    try:
        release = root / "release" / "mixtral-synth"
        release.parent.mkdir()
        subprocess.run([*WS, "synth", release, "--preset", args.preset], check=True, capture_output=True)
        files = sorted(p for p in release.rglob("*") if p.is_file())
        payload = sum(p.stat().st_size for p in files)
        rows = shaped(args, release, files, payload, root)
        if args.plot and rows:
            plot(rows, Path(args.plot))
            print(f"plot: {args.plot}")
        if not args.skip_loopback:
            loopback(args, release, payload, root)
        for n in args.daemon:
            daemon_run(args, root, n)
        for n in args.experts:
            experts_run(args, release, root, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
