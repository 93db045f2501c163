#!/usr/bin/env python3
"""Verification throughput: `weightswarm verify` against the coreutils / b3sum tools it replaces.

Builds a synthetic release (`weightswarm synth`), its v1 and hybrid torrents and a B3SUMS file (setup,
not timed), reads every file once so the page cache holds the payload, then times each command as a
subprocess (wall time, process start included), interleaved round-robin so drifting machine load hits
every row alike. Each weightswarm row is compared with the baseline tools doing the same hashing,
measured in the same run. A report only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, warm

BASELINE_TOOLS = {"sha1sum": "coreutils", "sha256sum": "coreutils", "md5sum": "coreutils", "b3sum": "b3sum"}


def need_tools() -> None:
    missing = [t for t in ["weightswarm", *BASELINE_TOOLS] if shutil.which(t) is None]
    if missing:
        pkgs = sorted({BASELINE_TOOLS.get(t, "weightswarm (pip install -e .)") for t in missing})
        sys.exit(f"missing tools: {', '.join(missing)}; install with: apt-get install {' '.join(pkgs)}")


def sh(cmd: list[str], cwd: Path | None = None) -> float:
    """Run cmd, return its wall time in seconds; exit with its stderr if it fails."""
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return dt


def setup(work: Path, preset: str) -> tuple[Path, bool]:
    """The release (reused when the workdir already has one of this preset), torrents, B3SUMS."""
    rel, stamp = work / "rel", work / "rel.preset"
    made = not (rel.is_dir() and stamp.is_file() and stamp.read_text().strip() == preset)
    if made:
        shutil.rmtree(rel, ignore_errors=True)
        print(f"setup: weightswarm synth {rel} --preset {preset} ...", flush=True)
        print(f"setup: synth took {sh(['weightswarm', 'synth', str(rel), '--preset', preset]):.1f} s")
        stamp.write_text(preset + "\n")
    else:
        print(f"setup: reusing {rel} (preset {preset})")
    for fmt in ("v1", "hybrid"):
        sh(["weightswarm", "create", str(rel), "-o", str(work / f"rel-{fmt}.torrent"), "--format", fmt])
    names = sorted(p.name for p in rel.iterdir() if p.is_file())
    with open(work / "B3SUMS", "w") as out:  # outside rel/, so verify's default checksum search skips it
        subprocess.run(["b3sum", *names], cwd=rel, stdout=out, check=True)
    return rel, made




def rows(work: Path, rel: Path) -> list[tuple[str, list[str], Path | None, tuple[str, ...]]]:
    """(label, command, cwd, baseline labels whose times add up to the same hashing work)."""
    ws, v = ["weightswarm", "verify", str(rel)], "--no-structure"
    tv1, thy = str(work / "rel-v1.torrent"), str(work / "rel-hybrid.torrent")
    files = sorted(p.name for p in rel.iterdir() if p.is_file())
    return [
        ("sha1sum", ["sha1sum", *files], rel, ()),
        ("sha256sum", ["sha256sum", *files], rel, ()),
        ("md5sum -c RELEASE", ["md5sum", "-c", "--quiet", "RELEASE"], rel, ()),
        ("b3sum -c B3SUMS", ["b3sum", "-c", "--quiet", str(work / "B3SUMS")], rel, ()),
        ("weightswarm --version (start-up)", ["weightswarm", "--version"], None, ()),
        ("verify v1 torrent, pieces only", [*ws, "--torrent", tv1, v, "--no-checksums"], None, ("sha1sum",)),
        ("verify hybrid torrent, pieces only", [*ws, "--torrent", thy, v, "--no-checksums"], None,
         ("sha1sum", "sha256sum")),
        ("verify v1 torrent (+RELEASE md5)", [*ws, "--torrent", tv1, v], None, ("sha1sum", "md5sum -c RELEASE")),
        ("verify hybrid torrent (+RELEASE md5)", [*ws, "--torrent", thy, v], None,
         ("sha1sum", "sha256sum", "md5sum -c RELEASE")),
        ("verify --checksums B3SUMS", [*ws, v, "--checksums", str(work / "B3SUMS")], None, ("b3sum -c B3SUMS",)),
        ("verify --checksums RELEASE (md5)", [*ws, v, "--checksums", str(rel / "RELEASE")], None,
         ("md5sum -c RELEASE",)),
        ("create --format v1 (libtorrent)", ["weightswarm", "create", str(rel), "-o", str(work / "t-v1.torrent"),
                                             "--format", "v1"], None, ("sha1sum",)),
        ("create --format hybrid (libtorrent)", ["weightswarm", "create", str(rel), "-o",
                                                 str(work / "t-hybrid.torrent")], None, ("sha1sum", "sha256sum")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1g", help="weightswarm synth preset (default: 1g, ~1 GB)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"), help="default: bench-out/ (git-ignored)")
    ap.add_argument("--keep", action="store_true",
                    help="keep what this run generated (the release above all) for the next run to reuse")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (default: 3)")
    args = ap.parse_args()
    need_tools()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    rel, made = setup(work, args.preset)
    total = warm(rel)
    table = rows(work, rel)
    times: dict[str, list[float]] = {label: [] for label, *_ in table}
    for r in range(args.repeat):
        print(f"round {r + 1}/{args.repeat} ...", flush=True)
        for label, cmd, cwd, _ in table:
            times[label].append(sh(cmd, cwd))
    best = {label: min(ts) for label, ts in times.items()}

    print(f"\npayload {total / 1e9:.3f} GB; best of {args.repeat} (median in brackets), wall time incl. process"
          f" start; load average at end {os.getloadavg()[0]:.2f}\n")
    print("| command | seconds | GB/s | vs baseline (same run) |")
    print("|---|---|---|---|")
    for label, _cmd, _, base in table:
        s, med = best[label], statistics.median(times[label])
        gbs = "-" if "start-up" in label else f"{total / 1e9 / s:.2f}"
        ratio = ""
        if base:
            b = sum(best[x] for x in base)
            ratio = f"{'+'.join(base)} {b:.2f} s: " + (f"{b / s:.2f}x faster" if b >= s else f"{s / b:.2f}x slower")
        print(f"| {label} | {s:.2f} ({med:.2f}) | {gbs} | {ratio} |")
    print("\ncommands:")
    for label, cmd, cwd, _ in table:
        print(f"  {label}: {'(cd ' + str(cwd) + ') ' if cwd else ''}{' '.join(cmd)}")

    if not args.keep:
        made_here = ["rel", "rel.preset"] if made else []
        for name in ["rel-v1.torrent", "rel-hybrid.torrent", "t-v1.torrent", "t-hybrid.torrent", "B3SUMS", *made_here]:
            p = work / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
