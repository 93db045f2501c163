"""How commands talk to people: JSON lines for machines, one progress line on a terminal, short lines otherwise.

The progress line never wraps: it is cut to the terminal's width, so an 80-column terminal shows one line
that is rewritten in place. Sizes are binary (KiB, MiB, GiB) everywhere.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from weightswarm.core.errors import InputError, VerificationError
from weightswarm.core.units import human, plural
from weightswarm.verify.report import Report

BAR = 20


def bar(done: float, total: float, width: int = BAR) -> str:
    filled = int(width * done / total) if total else 0
    return "\u2501" * filled + "\u2578" * (filled < width) + " " * max(0, width - filled - 1)


def eta(done: float, total: float, rate: float) -> str:
    if not rate or done >= total:
        return "--:--"
    s = int((total - done) / rate)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_line(e: dict, width: int = 80) -> str:
    """A fetch or seed event as one line of at most ``width`` characters."""
    done, wanted = e.get("done", 0), e.get("wanted") or 0
    pct = 100 * done / wanted if wanted else 0.0
    kind = e.get("event", "")
    if e.get("swarm") and not e.get("peers"):  # nobody to fetch from: say what is being tried instead
        text = f"{kind} {pct:5.1f}% waiting: {e['swarm']['text']}"
    else:
        text = (f"{kind} {bar(done, wanted)} {pct:5.1f}% {human(done)}/{human(wanted)} "
                f"{human(e.get('download_rate', 0))}/s {eta(done, wanted, e.get('download_rate', 0))} "
                f"{plural(e.get('peers', 0), 'peer')} up {human(e.get('upload_rate', 0))}/s")
    return text if len(text) <= width else text[:width - 1] + "\u2026"


class Reporter:
    """Receives the events of a command (dicts with an "event" key) and shows them."""

    def __init__(self, json_mode: bool = False):
        self.json = json_mode
        self.out = sys.stdout
        self.tty = not json_mode and self.out.isatty()
        self._line = False  # a progress line is on screen
        self._last = 0.0

    def __call__(self, event: dict) -> None:
        if self.json:
            print(json.dumps(event, default=str), file=self.out, flush=True)
            return
        kind = event.get("event")
        if kind in ("progress", "seeding") and self.tty:
            self._show(progress_line(event, self._width()))
        elif kind in ("progress", "seeding", "status", "checking"):
            self._occasional(event)
        else:
            self.close()
            line = describe(event)
            if line:
                print(line, file=self.out, flush=True)

    def bar(self, description: str, total: int):
        """A byte-count progress line for local work (hashing, verifying); returns an advance(n) callback."""
        if not self.tty:
            return lambda n: None
        start, done = time.monotonic(), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(time.monotonic() - start, 1e-6)
            text = (f"{description} {bar(done, total)} {100 * done / total if total else 0:5.1f}% "
                    f"{human(done)}/{human(total)} {human(rate)}/s {eta(done, total, rate)}")
            self._show(text[:self._width()])
        return advance

    def tracker(self, description: str, size: int | None = None):
        """A bar fed with ``(done, total)`` calls; shown in bytes, scaled to ``size`` when done counts pieces."""
        advance, seen = None, 0

        def update(done: int, total: int) -> None:
            nonlocal advance, seen
            if advance is None:
                advance = self.bar(description, size or total)
            scaled = done * (size or total) // max(total, 1)
            advance(scaled - seen)
            seen = scaled
        return update

    def close(self) -> None:
        if self._line:
            self.out.write("\r\x1b[2K")
            self.out.flush()
            self._line = False

    def _show(self, text: str) -> None:
        if time.monotonic() - self._last < 0.1 and self._line:
            return
        self._last = time.monotonic()
        self.out.write("\r\x1b[2K" + text)
        self.out.flush()
        self._line = True

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns - 1)

    def _occasional(self, e: dict) -> None:
        now = time.monotonic()
        if now - self._last < 5:
            return
        self._last = now
        print(describe(e), file=self.out, flush=True)


def describe(e: dict) -> str:
    kind = e.get("event")
    if kind == "start":
        return f"fetching {e['source']} (info-hash {e['info_hash']}) into {e['output']}, port {e['listen_port']}"
    if kind == "metadata":
        return (f"{e['name']}: {plural(e['files'], 'file')}, {human(e['total_size'])}; "
                f"fetching {plural(len(e['selected']), 'file')}, {human(e['selected_size'])}")
    if kind == "tensor_map":
        return (f"tensor map of {e['layout']}: {e['tensors']} of {e['of']} tensors (the dense ones and experts "
                f"{','.join(map(str, e['experts'])) or 'none'}): fetching {human(e['wanted_size'])} of "
                f"{human(e['total_size'])}")
    if kind == "converted":
        return f"converted into {e['output']}: {plural(e['files'], 'file')}, {plural(e['tensors'], 'tensor')}"
    if kind == "checked":
        return f"already on disk and verified: {human(e['have_bytes'])} of {human(e['wanted_bytes'])}"
    if kind in ("progress", "seeding"):
        if e.get("swarm") and not e.get("peers"):
            return f"{kind}: waiting for peers: {e['swarm']['text']}"
        pct = 100 * e["done"] / e["wanted"] if e.get("wanted") else 0
        return (f"{kind}: {pct:5.1f}% {human(e['done'])}, down {human(e['download_rate'])}/s, "
                f"up {human(e['upload_rate'])}/s, {plural(e['peers'], 'peer')}")
    if kind == "finished":
        return describe_finished(e)
    if kind == "hash_failed":
        return f"piece {e['piece']} failed its hash check and is fetched again"
    if kind == "listening":
        return f"{e['name']} ({e['info_hash']}): listening on port {e['port']}"
    if kind == "checking":
        return f"checking data: {100 * e['progress']:.0f}%"
    if kind == "ready":
        return "data verified; seeding (Ctrl-C to stop)"
    if kind == "status":
        return f"seeding: {plural(e['peers'], 'peer')}, up {human(e['upload_rate'])}/s, {human(e['uploaded'])} uploaded"
    if kind == "stopped":
        return f"stopped after uploading {human(e['uploaded'])}"
    if kind in ("verify", "error"):
        return ""
    return json.dumps(e, default=str)


def describe_finished(e: dict) -> str:
    """The finished event for people: what came, and where the extra bytes went."""
    extra = [f"{human(e[k])} {k}" for k in ("padding", "redundant", "failed") if e.get(k)]
    line = f"downloaded {human(e['new'])} of the selected files in {e['seconds']:.1f} s"
    if e.get("already_had"):
        line += f" ({human(e['already_had'])} was already here)"
    line += f"; payload received {human(e['downloaded'])}"
    if extra:
        line += " = files + " + " + ".join(extra)
    return line + f"; protocol overhead {human(e['protocol'])}"


NAMES = {"pieces": "torrent pieces (SHA-1)", "merkle": "torrent merkle trees (SHA-256)",
         "checksum": "publisher checksums", "structure": "weight file structure", "params": "params.json",
         "manifest": "manifest files (blake3)", "tensor": "manifest tensors (blake3)",
         "provenance": "tensors equal to the source"}
UNITS = {"tensor": "tensor", "provenance": "tensor"}


def print_report(report: Report, pieces: int | None = None, torrent_name: str | None = None) -> None:
    """What was checked, per kind, and every failure with its file; ``pieces``: the torrent's piece count."""
    out = sys.stdout
    for check, counts in report.summary().items():
        status = "ok" if not counts["failed"] else "FAILED"
        unit = UNITS.get(check, "file")
        n = counts["passed"] + counts["failed"] + counts.get("absent", 0)
        text = f"{NAMES.get(check, check):32} {counts['passed']:4} of {plural(n, unit)} ok"
        if check in ("pieces", "merkle") and pieces:
            text += f" ({plural(pieces, 'piece')})"
        if counts.get("absent"):
            absent = [f.path for f in report.findings if f.check == check and f.absent]
            text += f", {counts['absent']} absent ({_few(absent)})"
        print(f"{text}  {status}", file=out)
    for f in report.failures:
        print(f"FAIL {f.check}: {f.path}: {f.detail}", file=out)
    files = [f for f in report.findings if f.check in ("pieces", "merkle")]
    absent = [f for f in files if f.detail == "missing or wrong size"]
    if files and 2 * len(absent) >= len(files):
        print(f"Hint: most of the torrent's files are missing or of another size here: is this its top folder"
              f" (the one named {torrent_name!r}), and is it this folder's torrent?", file=out)
    if not report.findings:
        print("nothing to check", file=out)
    print("verified: OK" if report.ok else "verified: FAILED", file=out, flush=True)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def exit_for(report) -> None:
    """Exit 2 naming the first refused file (unsafe or malformed), 1 if data is wrong, else return."""
    refused = next((f for f in report.failures if f.refused), None)
    if refused:
        raise InputError(Path(report.root) / refused.path, refused.detail)
    if not report.ok:
        sys.exit(VerificationError.exit_code)
