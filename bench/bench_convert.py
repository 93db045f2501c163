#!/usr/bin/env python3
"""Conversion memory and time, and manifest hashing against b3sum.

For each synthetic release (`weightswarm synth --preset 1g` and `4g`; reused when the workdir already has
one): reads every file once (page cache), then times `cp -r` (and `cp -r` + `sync` of the copies, since
convert fsyncs what it writes) against `weightswarm convert`, each under `/usr/bin/time -v` for its peak RSS,
deleting the output between runs; and times `weightswarm manifest` (with and without --tensors) against
`b3sum` of the same files, interleaved round-robin. On the 1g release it also times the provenance check
`verify OUT --manifest --source SRC`. Peak RSS is compared with the interpreter's own (python importing
weightswarm.cli, weightswarm.convert.convert and torch) and with the largest tensor. A report only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, warm

TIME = "/usr/bin/time"
SIZE = {"1g": 1.05e9, "4g": 4.2e9}  # checkpoint bytes of each preset (runner/synth.py)
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
INPROC = ("import sys, time; from weightswarm.verify.manifest import build_manifest; t = time.perf_counter(); "
          "build_manifest(sys.argv[1]); print(time.perf_counter() - t)")


def need_tools() -> None:
    missing = [t for t in ("weightswarm", "b3sum", "cp", "sync") if shutil.which(t) is None]
    missing += [] if os.access(TIME, os.X_OK) else ["/usr/bin/time (apt-get install time)"]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)}")


def run(cmd: list[str], cwd: Path | None = None) -> tuple[float, int, str]:
    """Run cmd under /usr/bin/time -v: (wall seconds, peak RSS bytes, stdout); exit if it fails."""
    t = time.perf_counter()
    p = subprocess.run([TIME, "-v", *cmd], cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return dt, int(rss[1]) * 1024 if rss else 0, p.stdout


def rm(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def release(work: Path, preset: str) -> tuple[Path | None, bool]:
    """The release of this preset (bench-out/rel from bench_verify.py, or rel-PRESET); None if no room."""
    for rel in (work / "rel", work / f"rel-{preset}"):
        stamp = rel.with_name(rel.name + ".preset")
        if rel.is_dir() and stamp.is_file() and stamp.read_text().strip() == preset:
            print(f"setup: reusing {rel} (preset {preset})")
            return rel, False
    rel = work / f"rel-{preset}"
    need, free = 3 * SIZE.get(preset, 0) + 1e9, shutil.disk_usage(work).free
    if free < need:
        print(f"SKIPPED preset {preset}: {free / 1e9:.1f} GB free in {work}, needs ~{need / 1e9:.0f} GB "
              "(source + copy + output)")
        return None, False
    rm(rel)
    print(f"setup: weightswarm synth {rel} --preset {preset} ...", flush=True)
    t = time.perf_counter()
    subprocess.run(["weightswarm", "synth", str(rel), "--preset", preset], check=True, stdout=subprocess.DEVNULL)
    print(f"setup: synth took {time.perf_counter() - t:.1f} s")
    rel.with_name(rel.name + ".preset").write_text(preset + "\n")
    return rel, True




def largest_tensor(manifest: Path) -> tuple[str, int]:
    m = json.loads(manifest.read_text())
    return max(((t["name"], math.prod(t["shape"]) * ITEMSIZE[t["dtype"]]) for t in m["tensors"]),
               key=lambda x: x[1])


def bench_convert(work: Path, rel: Path, repeat: int, keep_out: bool) -> dict:
    """cp -r, cp -r + sync, convert: best wall time and the highest peak RSS of `repeat` runs each."""
    dst, out = work / "cp-out", work / "convert-out"
    files = [p.name for p in rel.iterdir() if p.is_file()]
    res: dict[str, list[tuple[float, int]]] = {"cp": [], "cp+sync": [], "convert": []}
    for r in range(repeat):
        print(f"  round {r + 1}/{repeat} ...", flush=True)
        for label in res:
            rm(dst, out)
            subprocess.run(["sync"])  # earlier runs' dirty pages are not charged to this one
            if label == "convert":
                res[label].append(run(["weightswarm", "convert", str(rel), "-o", str(out)])[:2])
                continue
            t = time.perf_counter()
            subprocess.run(["cp", "-r", str(rel), str(dst)], check=True)
            if label == "cp+sync":  # convert fsyncs each file it writes
                subprocess.run(["sync", *(str(dst / f) for f in files)], check=True)
            res[label].append((time.perf_counter() - t, 0))
    name, nbytes = largest_tensor(out / "manifest.json")
    rm(dst, *([] if keep_out else [out]))
    return {"best": {k: min(t for t, _ in v) for k, v in res.items()}, "rss": max(m for _, m in res["convert"]),
            "rss_all": [m for _, m in res["convert"]], "largest": (name, nbytes), "out": out}


def bench_hash(work: Path, rel: Path, out: Path | None, repeat: int) -> list[tuple[str, list[tuple[float, int]]]]:
    files = sorted(p.name for p in rel.iterdir() if p.is_file())
    m = str(work / "M.json")
    rows = [("b3sum", ["b3sum", *files], rel),
            ("weightswarm --version (start-up)", ["weightswarm", "--version"], None),
            ("weightswarm manifest", ["weightswarm", "manifest", str(rel), "-o", m], None),
            ("weightswarm manifest --tensors", ["weightswarm", "manifest", str(rel), "-o", m, "--tensors"], None),
            ("build_manifest in process (hashing only)", [sys.executable, "-c", INPROC, str(rel)], None)]
    if out is not None:
        rows.append(("verify OUT --manifest --source SRC", ["weightswarm", "verify", str(out), "--manifest",
                     str(out / "manifest.json"), "--source", str(rel), "--no-structure"], None))
    times: dict[str, list[tuple[float, int]]] = {label: [] for label, *_ in rows}
    for _ in range(repeat):
        for label, cmd, cwd in rows:
            dt, rss, stdout = run(cmd, cwd)
            times[label].append((float(stdout) if label.startswith("build_manifest") else dt, rss))
    rm(work / "M.json")
    print("  commands: " + "\n            ".join(f"{label}: {'(cd ' + str(cwd) + ') ' if cwd else ''}{' '.join(c)}"
                                                 for label, c, cwd in rows))
    return [(label, times[label]) for label, *_ in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="1g,4g", help="synth presets, smallest first (default: 1g,4g)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"), help="default: bench-out/ (git-ignored)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each hashing command (default: 3)")
    ap.add_argument("--convert-repeat", type=int, default=2, help="runs of cp and convert (default: 2)")
    ap.add_argument("--keep", action="store_true", help="keep the releases this run made (default: delete "
                                                        "all but the smallest)")
    args = ap.parse_args()
    need_tools()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    _, base, _ = run([sys.executable, "-c", "import weightswarm.cli, weightswarm.convert.convert, torch"])
    print(f"interpreter baseline (python -c 'import weightswarm.cli, weightswarm.convert.convert, torch'): "
          f"peak RSS {base / 1e6:.0f} MB")
    conv, hashing, made = {}, {}, []
    for i, preset in enumerate(args.presets.split(",")):
        rel, new = release(work, preset)
        if rel is None:
            continue
        made += [rel] if new and i else []
        total = warm(rel)
        print(f"preset {preset}: {total / 1e9:.3f} GB, page cache warm; cp -r / convert ...", flush=True)
        conv[preset] = (total, bench_convert(work, rel, args.convert_repeat, keep_out=(preset == "1g")))
        print(f"preset {preset}: hashing ...", flush=True)
        warm(rel)
        out = conv[preset][1]["out"] if preset == "1g" else None
        hashing[preset] = (total, bench_hash(work, rel, out, args.repeat))
        rm(*([out] if out else []))

    print(f"\nload average at end {os.getloadavg()[0]:.2f}; interpreter baseline RSS {base / 1e6:.0f} MB\n")
    print("| preset | checkpoint GB | largest tensor MB | cp -r s | cp -r + sync s | convert s | convert / cp -r "
          "| convert / cp+sync | convert peak RSS MB | RSS - interpreter MB | (RSS - interpreter) / largest tensor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, (total, r) in conv.items():
        b, lt = r["best"], r["largest"][1]
        print(f"| {preset} | {total / 1e9:.2f} | {lt / 1e6:.1f} | {b['cp']:.2f} | {b['cp+sync']:.2f} | "
              f"{b['convert']:.2f} | {b['convert'] / b['cp']:.1f}x | {b['convert'] / b['cp+sync']:.1f}x | "
              f"{r['rss'] / 1e6:.0f} | {(r['rss'] - base) / 1e6:.0f} | {(r['rss'] - base) / lt:.0f}x |")
    for preset, (total, r) in conv.items():
        print(f"  {preset}: largest tensor {r['largest'][0]}; convert RSS of each run (MB): "
              f"{', '.join(f'{m / 1e6:.0f}' for m in r['rss_all'])}; RSS - interpreter = "
              f"{(r['rss'] - base) / total:.2f}x the checkpoint")
    print(f"\nhashing: best of {args.repeat} (median in brackets), wall time incl. process start\n")
    print("| preset | command | seconds | GB/s | peak RSS MB | throughput vs b3sum |")
    print("|---|---|---|---|---|---|")
    for preset, (total, rows) in hashing.items():
        b3 = min(t for t, _ in rows[0][1])
        for label, runs in rows:
            s, med, rss = min(t for t, _ in runs), statistics.median(t for t, _ in runs), max(m for _, m in runs)
            startup = "start-up" in label
            gbs = "-" if startup else f"{total / 1e9 / s:.2f}"
            vs = "" if startup or label == "b3sum" or label.startswith("verify") else f"{b3 / s:.2f}x"
            print(f"| {preset} | {label} | {s:.2f} ({med:.2f}) | {gbs} | {rss / 1e6:.0f} | {vs} |")
    for rel in made if not args.keep else []:
        rm(rel, rel.with_name(rel.name + ".preset"))


if __name__ == "__main__":
    main()
