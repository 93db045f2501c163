#!/usr/bin/env python3
"""`weightswarm verify DIR --manifest M` against `b3sum -c` of the same files, process start-up included.

Both check every file's blake3 against a list: b3sum against a B3SUMS file, weightswarm against a
manifest of the files (`weightswarm manifest DIR -o M`, no tensors). The release is a synthetic one
(`weightswarm synth --preset 4g` by default, reused when the workdir has it). Warm (default): every file is
read once first, so both hash from the page cache; `--cold` (root): the page cache is dropped before each
command, so both read the disk, as a first check after a download does. The commands run interleaved
round-robin. Prints the ratio of the best times and the start-up of `weightswarm --version` alone. A report
only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, warm


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], cwd: Path, cold: bool) -> float:
    if cold:
        drop_caches()
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="4g")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each command (root)")
    ap.add_argument("--links", type=int, default=0, metavar="N",
                    help="add N hard links of the checkpoint: N+1 times the bytes to hash, one copy in the cache")
    a = ap.parse_args()
    rel = a.workdir / f"rel-{a.preset}"
    ws = [sys.executable, "-m", "weightswarm"]
    if not (rel / "RELEASE").exists():
        a.workdir.mkdir(exist_ok=True)
        subprocess.run([*ws, "synth", str(rel), "--preset", a.preset], check=True, capture_output=True)
    for p in rel.glob("link-*.pth"):
        p.unlink()
    for i in range(a.links):
        os.link(rel / "consolidated.00.pth", rel / f"link-{i}.pth")
    files = sorted(p.name for p in rel.iterdir() if p.is_file())
    manifest, sums = a.workdir / f"rel-{a.preset}.manifest.json", a.workdir / f"rel-{a.preset}.B3SUMS"
    subprocess.run([*ws, "manifest", str(rel), "-o", str(manifest)], check=True, capture_output=True)
    sums.write_text(subprocess.run(["b3sum", *files], cwd=rel, check=True, capture_output=True, text=True).stdout)
    total = warm(rel)  # hard links are read once per name, as both tools do
    rows = {"b3sum -c B3SUMS": ["b3sum", "-c", "--quiet", str(sums.resolve())],
            "weightswarm verify --manifest": [*ws, "verify", str(rel.resolve()), "--manifest", str(manifest.resolve()),
                                              "--no-structure", "--no-checksums"],
            "weightswarm --version (start-up)": [*ws, "--version"]}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(a.repeat):
        for label, cmd in rows.items():
            times[label].append(timed(cmd, rel, a.cold))
    print(machine())
    cache = "read from disk (page cache dropped before each)" if a.cold else "from the page cache"
    print(f"\n{total / 1e9:.2f} GB in {len(files)} files, {cache}; best of {a.repeat} (median), wall time incl. "
          "process start\n")
    print("| command | seconds | GB/s | speed vs b3sum -c |")
    print("|---|---|---|---|")
    base = min(times["b3sum -c B3SUMS"])
    for label, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        gbs = "-" if "start-up" in label else f"{total / 1e9 / best:.2f}"
        vs = "" if label.startswith(("b3sum", "weightswarm --version")) else f"{base / best:.2f}x"
        print(f"| {label} | {best:.2f} ({med:.2f}) | {gbs} | {vs} |")


if __name__ == "__main__":
    main()
