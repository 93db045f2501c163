"""Shared fixtures: a tiny synthetic release, its torrent, and real weightswarm processes on loopback."""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

WS = [sys.executable, "-m", "weightswarm"]
LOOPBACK = ["--listen", "127.0.0.1:0", "--no-dht"]


def run_ws(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run a weightswarm command to completion."""
    return subprocess.run(WS + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


class Node:
    """A weightswarm process started with --json; its events are read on a thread as they come."""

    def __init__(self, *args, cwd=None):
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen(WS + self.args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.events: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(ev)
            self._q.put(ev)
        self._q.put(None)

    def wait_event(self, pred, timeout: float = 60) -> dict:
        """The first event (from now on) for which pred(event) holds, before the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self._q.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if ev is None:
                raise AssertionError(f"{self.args[0]} exited ({self.proc.wait()}) first: {self.stderr}")
            if pred(ev):
                return ev
        raise AssertionError(f"timed out waiting for an event from {self.args}: {self.events[-3:]}")

    @property
    def port(self) -> int:
        ev = next((e for e in self.events if e["event"] in ("listening", "start")), None) or \
            self.wait_event(lambda e: e["event"] in ("listening", "start"))
        return ev.get("port") or ev["listen_port"]

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def nodes():
    """Start Nodes through this; every one is stopped at the end of the test, pass or fail."""
    started: list[Node] = []

    def start(*args, cwd=None) -> Node:
        n = Node(*args, cwd=cwd)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A tiny synthetic Mixtral release (~1 MB) in its torrent folder, read-only for tests: copy to change."""
    from runner.synth import synthesize

    root = tmp_path_factory.mktemp("release") / "mixtral-tiny"
    synthesize(root, preset="tiny")
    return root


@pytest.fixture(scope="session")
def tiny_torrent(tiny_release, tmp_path_factory) -> Path:
    from distrib.create import write_torrent

    out = tmp_path_factory.mktemp("torrent") / "mixtral-tiny.torrent"
    write_torrent(tiny_release, out)
    return out


@pytest.fixture
def release_copy(tiny_release, tmp_path) -> Path:
    dest = tmp_path / tiny_release.name
    shutil.copytree(tiny_release, dest)
    return dest


def seeder(nodes, release: Path, torrent: Path, *extra) -> Node:
    """A seed process on loopback, returned once its data is checked and it serves."""
    n = nodes("seed", release, "--torrent", torrent, *LOOPBACK, "--json", *extra)
    n.wait_event(lambda e: e["event"] == "ready")
    return n


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        try:
            proc.wait(timeout=0.1)
            raise AssertionError(f"{proc.args[0]} exited: {proc.stderr.read()}")
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"nothing listens on {port}")
