#!/usr/bin/env python3
"""Fetching some experts straight from a release in its original layout, and converting while downloading.

On a synthetic release (`weightswarm synth --preset 1g`, reused when the workdir has one) seeded on loopback by
`weightswarm seed`:
- bytes: `fetch --experts` of 1, 2 and 4 experts, the payload received and the .pth's allocated blocks, against
  the ideal (the chosen tensors plus every byte of the archive that is no tensor) + two pieces per tensor
  and against the whole file;
- time: `fetch` (of the whole release, and of experts 0-3), then `convert` of it, against `fetch --convert` (one
  command doing both), uncapped and with the download capped (`--max-download-rate`), into fresh folders.
Writes a PNG of bytes against experts. A report only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import machine

LOOPBACK = ["--listen", "127.0.0.1:0", "--no-dht"]


def ws(*args, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["weightswarm", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode:
        sys.exit(f"failed ({p.returncode}): weightswarm {' '.join(map(str, args))}\n{p.stderr[-3000:]}")
    return p


def events(p: subprocess.CompletedProcess) -> dict[str, dict]:
    return {e["event"]: e for e in map(json.loads, p.stdout.splitlines())}


def ideal(release: Path, experts: tuple[int, ...]) -> tuple[int, int]:
    """(bytes of the .pth a node serving experts needs, the number of its tensors)."""
    from weightswarm.formats.layouts import open_layout
    from weightswarm.formats.perexpert import expert_of_tensor

    layout = open_layout(release)
    chosen = [t for t in layout.tensors.values() if (le := expert_of_tensor(t.name)) is None or le[1] in experts]
    size = (release / "consolidated.00.pth").stat().st_size
    return size - sum(t.nbytes for t in layout.tensors.values()) + sum(t.nbytes for t in chosen), len(chosen)


def start_seed(release: Path, torrent: Path, port: int) -> subprocess.Popen:
    seed = subprocess.Popen(["weightswarm", "seed", release, "--torrent", torrent, "--listen", f"127.0.0.1:{port}",
                             "--no-dht", "--json"], stdout=subprocess.PIPE, text=True)
    for line in seed.stdout:  # ready once it has checked its data
        if json.loads(line)["event"] == "ready":
            return seed
    sys.exit("the seed did not start")


def fetch(torrent: Path, out: Path, port: int, *extra) -> tuple[float, dict[str, dict]]:
    t = time.perf_counter()
    p = ws("fetch", torrent, "-o", out, "--peer", f"127.0.0.1:{port}", *LOOPBACK, "--timeout", "60", "--json",
           "--no-verify", *extra)
    return time.perf_counter() - t, events(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--preset", default="1g")
    ap.add_argument("--cap", default="100m", help="the capped download rate of the timing runs")
    ap.add_argument("--plot", type=Path, default=Path("bench/experts.png"))
    ap.add_argument("--port", type=int, default=7931)
    a = ap.parse_args()
    print(machine())
    rel = a.workdir / f"experts-{a.preset}" / "mixtral-synth"
    if not (rel / "params.json").exists():
        rel.parent.mkdir(parents=True, exist_ok=True)
        ws("synth", rel, "--preset", a.preset)
    torrent = rel.parent / "release.torrent"
    if not torrent.exists():
        ws("create", rel, "-o", torrent)
    from weightswarm.distrib.torrentfile import load_torrent

    plen = load_torrent(torrent).info.piece_length()
    size = (rel / "consolidated.00.pth").stat().st_size
    scratch = a.workdir / "experts-scratch"
    seed = start_seed(rel, torrent, a.port)
    rows = []
    try:
        print(f"\nrelease {size / 1e9:.2f} GB (.pth), piece {plen >> 10} KiB")
        print("| experts | ideal MB | ideal + 2 pieces/tensor MB | received MB | allocated MB | received / ideal "
              "| whole file / received | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        for k in (1, 2, 4):
            shutil.rmtree(scratch, ignore_errors=True)
            experts = tuple(range(k))
            need, tensors = ideal(rel, experts)
            secs, ev = fetch(torrent, scratch, a.port, "--experts", ",".join(map(str, experts)))
            got = ev["finished"]["downloaded"]
            alloc = (scratch / rel.name / "consolidated.00.pth").stat().st_blocks * 512
            rows.append((k, need, need + 2 * plen * tensors, got, alloc))
            print(f"| {k} | {need / 1e6:.1f} | {(need + 2 * plen * tensors) / 1e6:.1f} | {got / 1e6:.1f} | "
                  f"{alloc / 1e6:.1f} | {got / need:.3f} | {size / got:.2f}x | {secs:.2f} |")
        print("\n| selection | download | fetch s | convert s | fetch then convert s | fetch --convert s | "
              "fetch --convert / fetch |")
        print("|---|---|---|---|---|---|---|")
        for sel in ([], ["--experts", "0-3"]):
            for cap in (None, a.cap):
                limit = [*sel, "--max-download-rate", cap] if cap else sel
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                t_fetch, _ = fetch(torrent, scratch / "a", a.port, *limit)
                t = time.perf_counter()
                ws("convert", scratch / "a" / rel.name, "-o", scratch / "a-conv", *sel)
                t_conv = time.perf_counter() - t
                t_both, _ = fetch(torrent, scratch / "b", a.port, *limit, "--convert", scratch / "b-conv")
                diff = ["diff", "-r", "-x", ".convert", scratch / "a-conv", scratch / "b-conv"]
                same = subprocess.run(diff).returncode == 0
                print(f"| {sel[1] if sel else 'all'} | {cap + '/s' if cap else 'uncapped'} | {t_fetch:.2f} | "
                      f"{t_conv:.2f} | {t_fetch + t_conv:.2f} | {t_both:.2f} | "
                      f"{t_both / t_fetch:.2f}x{'' if same else ' (OUTPUT DIFFERS)'} |")
    finally:
        seed.terminate()
        seed.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    plot(rows, size, a.plot)


def plot(rows, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [size / 1e6] * len(ks), "k--", label="whole .pth")
    ax.plot(ks, [r[2] / 1e6 for r in rows], ":", color="gray", label="ideal + 2 pieces per tensor")
    ax.plot(ks, [r[1] / 1e6 for r in rows], "o-", label="ideal (chosen tensors + archive metadata)")
    ax.plot(ks, [r[3] / 1e6 for r in rows], "s-", label="received (fetch --experts)")
    ax.set_xlabel("experts fetched (of 8)")
    ax.set_ylabel("MB")
    ax.set_xticks(ks)
    ax.set_ylim(0, size / 1e6 * 1.1)
    ax.legend(fontsize=8)
    ax.set_title("fetch --experts on the original layout (synthetic 1 GB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
