"""How commands talk to people: JSON lines for machines, a progress bar on a terminal, short lines otherwise."""
from __future__ import annotations

import json
import sys
import time

from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from verify.report import Report


def human(n: float) -> str:
    """Binary units, like the ones options take (``--max-upload-rate 4m`` shows as 4.0 MiB/s)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    """Receives the events of a command (dicts with an "event" key) and shows them."""

    def __init__(self, json_mode: bool = False):
        self.json = json_mode
        self.out = sys.stdout
        self.tty = not json_mode and self.out.isatty()
        self.progress: Progress | None = None
        self.task = None
        self._last_line = 0.0

    def __call__(self, event: dict) -> None:
        if self.json:
            print(json.dumps(event, default=str), file=self.out, flush=True)
            return
        kind = event.get("event")
        if kind in ("progress", "seeding") and self.tty:
            self._bar(event)
        elif kind in ("progress", "seeding", "status", "checking"):
            self._occasional(event)
        else:
            self._stop_bar()
            line = _describe(event)
            if line:
                print(line, file=self.out, flush=True)

    def bar(self, description: str, total: int):
        """A plain byte-count progress bar for local work (hashing, verifying); returns an advance(n) callback."""
        if not self.tty:
            return lambda n: None
        self._stop_bar()
        self.progress = _progress_bar()
        self.progress.start()
        self.task = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(self.task, n)

    def tracker(self, description: str, size: int | None = None):
        """A bar fed with ``(done, total)`` calls; shown in bytes, scaled to ``size`` when done counts pieces."""
        if not self.tty:
            return lambda done, total: None

        def update(done: int, total: int) -> None:
            if self.progress is None:
                self.bar(description, size or total)
            self.progress.update(self.task, completed=done * (size or total) // max(total, 1))
        return update

    def close(self) -> None:
        self._stop_bar()

    def _bar(self, e: dict) -> None:
        if self.progress is None:
            self.progress = _progress_bar(TextColumn("{task.fields[info]}"))
            self.progress.start()
            self.task = self.progress.add_task("fetch", total=e.get("wanted") or None, info="")
        pieces = f"{e.get('pieces', 0)}/{e.get('pieces_total', 0)} pieces"
        self.progress.update(self.task, completed=e.get("done", 0), total=e.get("wanted") or None,
                             description=e.get("event"), info=f"{e.get('peers', 0)} peers, {pieces}, "
                                                              f"up {human(e.get('upload_rate', 0))}/s")

    def _occasional(self, e: dict) -> None:
        now = time.monotonic()
        if now - self._last_line < 5:
            return
        self._last_line = now
        print(_describe(e), file=self.out, flush=True)

    def _stop_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _progress_bar(*extra) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), *extra, transient=True)


def _describe(e: dict) -> str:
    kind = e.get("event")
    if kind == "start":
        return f"fetching {e['source']} (info-hash {e['info_hash']}) into {e['output']}, port {e['listen_port']}"
    if kind == "metadata":
        return (f"{e['name']}: {e['files']} files, {human(e['total_size'])}; "
                f"fetching {len(e['selected'])} files, {human(e['selected_size'])}")
    if kind == "checked":
        return f"already on disk and verified: {human(e['have_bytes'])} of {human(e['wanted_bytes'])}"
    if kind in ("progress", "seeding"):
        pct = 100 * e["done"] / e["wanted"] if e.get("wanted") else 0
        return (f"{kind}: {pct:5.1f}% {human(e['done'])}, down {human(e['download_rate'])}/s, "
                f"up {human(e['upload_rate'])}/s, {e['peers']} peers")
    if kind == "finished":
        return f"downloaded {human(e['downloaded'])} in {e['seconds']:.1f} s"
    if kind == "hash_failed":
        return f"piece {e['piece']} failed its hash check and is fetched again"
    if kind == "listening":
        return f"{e['name']} ({e['info_hash']}): listening on port {e['port']}"
    if kind == "checking":
        return f"checking data: {100 * e['progress']:.0f}%"
    if kind == "ready":
        return "data verified; seeding (Ctrl-C to stop)"
    if kind == "status":
        return (f"seeding: {e['peers']} peers, up {human(e['upload_rate'])}/s, "
                f"{human(e['uploaded'])} uploaded")
    if kind == "stopped":
        return f"stopped after uploading {human(e['uploaded'])}"
    if kind == "verify":
        return ""
    return json.dumps(e, default=str)


def print_report(report: Report) -> None:
    """What was checked, per kind, and every failure with its file."""
    out = sys.stdout
    names = {"pieces": "torrent pieces (SHA-1)", "merkle": "torrent merkle roots (SHA-256)",
             "checksum": "publisher checksums", "structure": "weight file structure", "params": "params.json",
             "manifest": "manifest files (blake3)", "tensor": "manifest tensors (blake3)",
             "provenance": "tensors equal to the source"}
    for check, counts in report.summary().items():
        status = "ok" if not counts["failed"] else "FAILED"
        absent = f" {counts['absent']:4} absent" if counts.get("absent") else ""
        print(f"{names.get(check, check):32} {counts['passed']:4} passed {counts['failed']:4} failed{absent}  "
              f"{status}", file=out)
    for f in report.failures:
        print(f"FAIL {f.check}: {f.path}: {f.detail}", file=out)
    if not report.findings:
        print("nothing to check", file=out)
    print("verified: OK" if report.ok else "verified: FAILED", file=out, flush=True)
