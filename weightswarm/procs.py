"""weightswarm commands run as subprocesses with ``--json``: the demo's nodes, and the tests'."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from weightswarm.core.errors import SwarmError

WS = [sys.executable, "-m", "weightswarm"]
LOOPBACK = ["--listen", "127.0.0.1:0", "--no-dht"]  # an isolated node: loopback only, no DHT or LSD


class WsProcess:
    """A running weightswarm command whose JSON events are read on a thread as they come."""

    def __init__(self, *args, name: str | None = None, stderr_path: str | os.PathLike | None = None, cwd=None,
                 prefix: list[str] | None = None):
        """``prefix``: what runs the command line (default ``python -m weightswarm``)."""
        self.args = [str(a) for a in args]
        self.name = name or self.args[0]
        self._err_file = open(stderr_path, "w") if stderr_path else None
        try:
            self.proc = subprocess.Popen([*(prefix or WS), *self.args], cwd=cwd, stdout=subprocess.PIPE,
                                         stderr=self._err_file or subprocess.PIPE, text=True)
        except OSError:
            if self._err_file:
                self._err_file.close()
            raise
        self.events: list[dict] = []
        self.last: dict[str, dict] = {}  # the newest event of each kind
        self._q: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        if not self._err_file:
            threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(ev, dict) or "event" not in ev:
                continue
            self.events.append(ev)
            self.last[ev["event"]] = ev
            self._q.put(ev)
        self._q.put(None)

    def wait_event(self, pred, timeout: float = 60) -> dict:
        """The first event from now on for which pred(event) holds; SwarmError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self._q.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if ev is None:
                self._q.put(None)  # every later wait must see the end too
                raise SwarmError(self.name, f"exited with status {self.proc.wait()} first: {self.stderr[-2000:]}")
            if pred(ev):
                return ev
        raise SwarmError(self.name, f"timed out waiting for an event; last: {self.events[-3:]}")

    def wait_for(self, kind: str, timeout: float = 60) -> dict:
        """The newest event of this kind, waiting for one if none came yet."""
        return self.last.get(kind) or self.wait_event(lambda e: e["event"] == kind, timeout)

    @property
    def port(self) -> int:
        """The port it listens on: a seeder's `listening` event, a fetcher's `start` event."""
        ev = next((e for e in self.events if e["event"] in ("listening", "start")), None) or \
            self.wait_event(lambda e: e["event"] in ("listening", "start"))
        return ev.get("port") or ev["listen_port"]

    @property
    def stderr(self) -> str:
        if self._err_file:
            self._err_file.flush()
            with open(self._err_file.name) as f:
                return f.read()
        return "".join(self._stderr)

    def wait(self, timeout: float = 120) -> int:
        """Its exit status; SwarmError if it runs past the timeout (it is left running: stop() ends it)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SwarmError(self.name, f"still running after {timeout:.0f} s") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal it and wait; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._err_file:
            self._err_file.close()
        return self.proc.returncode
