#!/usr/bin/env python3
"""Daemon time-to-seeding: a clean restart (resume data) against a full re-hash, for a multi-GB release.

Setup (not timed): a synthetic release under ``WORKDIR/daemon-data/rel`` (hard links to an existing
``WORKDIR/rel-PRESET`` of the same preset when there is one, else ``weightswarm synth``), its hybrid torrent,
one read of every file so the page cache holds it. Then, per round, interleaved:

- *add (full check)*: POST the torrent to a running daemon; time until its ``seeding`` event.
- *restart after SIGTERM*: the daemon stopped cleanly; time from starting the process to ``seeding``
  (and, for reference, to its ``listening`` event: interpreter, imports, session and API up).
- *restart, resume data lost*: the same after deleting the torrent's resume file: libtorrent re-hashes it.
- *scrub, unlimited rate*: POST a scrub; the ``seconds`` of its ``scrub_finished`` event (our own re-hash,
  one thread, while the daemon keeps serving), and the latency of ``GET /healthz`` requests sent one after
  another for as long as it runs.

A report only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import http.client
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from common import machine, warm

from weightswarm.procs import WsProcess


def setup(work: Path, preset: str) -> tuple[Path, Path, Path]:
    data = work / "daemon-data"
    rel, stamp = data / "rel", data / "rel.preset"
    if not (stamp.is_file() and stamp.read_text().strip() == preset):
        subprocess.run(["rm", "-rf", str(rel)], check=True)
        data.mkdir(parents=True, exist_ok=True)
        shared = work / f"rel-{preset}"
        if (work / f"rel-{preset}.preset").is_file() and shared.is_dir():
            rel.mkdir()
            for p in shared.iterdir():  # hard links: no second copy of GBs on disk
                os.link(p, rel / p.name)
            print(f"setup: hard-linked {shared} into {rel}")
        else:
            print(f"setup: weightswarm synth {rel} --preset {preset} ...", flush=True)
            subprocess.run(["weightswarm", "synth", str(rel), "--preset", preset], check=True,
                           stdout=subprocess.DEVNULL)
        stamp.write_text(preset + "\n")
    torrent = work / "daemon.torrent"
    subprocess.run(["weightswarm", "create", str(rel), "-o", str(torrent)], check=True, stdout=subprocess.DEVNULL)
    return data, rel, torrent




class Daemon:
    def __init__(self, data: Path, state: Path):
        self.t0 = time.perf_counter()
        self.node = WsProcess("daemon", "--data", data, "--state", state, "--api", "127.0.0.1:0",
                              "--listen", "127.0.0.1:0", "--no-dht", "--json", "--log-level", "warning",
                              "--scrub-rate", "0")
        ev = self.wait("listening")
        self.listening = time.perf_counter()
        self.port = urlparse(ev["api"]).port
        self.token = (state / "api-token").read_text().strip()

    def wait(self, kind: str, timeout: float = 600) -> dict:
        """The first event of this kind, even one that came while waiting for another."""
        return next((e for e in self.node.events if e["event"] == kind), None) or \
            self.node.wait_event(lambda e: e["event"] == kind, timeout)

    def post(self, path: str, body: bytes = b"", ctype: str = "application/octet-stream") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body, {"Authorization": f"Bearer {self.token}", "Content-Type": ctype})
        status = conn.getresponse().status
        conn.close()
        return status

    def get_latency(self, path: str) -> float:
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        assert conn.getresponse().status == 200
        conn.close()
        return time.perf_counter() - t

    def add(self, torrent: Path) -> None:
        b = uuid.uuid4().hex
        body = (f'--{b}\r\nContent-Disposition: form-data; name="torrent"; filename="t.torrent"\r\n\r\n'.encode()
                + torrent.read_bytes() + f"\r\n--{b}--\r\n".encode())
        assert self.post("/v1/torrents", body, f"multipart/form-data; boundary={b}") == 201

    def stop(self) -> None:
        assert self.node.stop(signal.SIGTERM, timeout=120) == 0, self.node.stderr


def one_round(data: Path, state: Path, torrent: Path, info_hash: str) -> dict[str, float]:
    out = {}
    subprocess.run(["rm", "-rf", str(state)], check=True)
    d = Daemon(data, state)
    t = time.perf_counter()
    d.add(torrent)
    d.wait("seeding")
    out["add: full check by libtorrent"] = time.perf_counter() - t
    d.wait("resume_saved")
    assert d.post(f"/v1/torrents/{info_hash}/scrub") == 202
    d.wait("scrub_started")
    latencies = [d.get_latency("/healthz")]
    while not any(e["event"] == "scrub_finished" for e in d.node.events):
        latencies.append(d.get_latency("/healthz"))
    out["scrub, unlimited rate (one thread)"] = d.wait("scrub_finished")["seconds"]
    out["GET /healthz during that scrub: median latency"] = statistics.median(latencies)
    out["GET /healthz during that scrub: worst latency"] = max(latencies)
    d.stop()

    for label, drop in (("restart after SIGTERM (resume data)", False), ("restart, resume data lost", True)):
        if drop:
            (state / "torrents" / f"{info_hash}.resume").unlink()
        d = Daemon(data, state)
        d.wait("seeding")
        out[f"{label}: process start to seeding"] = time.perf_counter() - d.t0
        out[f"{label}: process start to API up"] = d.listening - d.t0
        d.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="4g")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir.resolve()
    data, rel, torrent = setup(work, args.preset)
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(torrent)
    size = warm(rel)
    print(f"release: {rel} ({size / 1e9:.2f} GB, {t.info.num_pieces()} pieces of {t.info.piece_length() >> 20} MiB, "
          f"hybrid); page cache warmed")
    print(machine())
    rounds = [one_round(data, work / "daemon-state", torrent, t.info_hash) for _ in range(args.repeat)]
    print(f"\n| measurement ({size / 1e9:.2f} GB) | best of {args.repeat} | median |\n|---|---|---|")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        if "latency" in key:
            print(f"| {key} | {1000 * min(values):.1f} ms | {1000 * statistics.median(values):.1f} ms |")
        else:
            print(f"| {key} | {min(values):.2f} s | {statistics.median(values):.2f} s |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
