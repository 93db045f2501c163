"""Shared fixtures: a tiny synthetic release, its torrent, and real weightswarm processes on loopback."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from weightswarm.procs import LOOPBACK, WS, WsProcess



def run_ws(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run a weightswarm command to completion."""
    return subprocess.run(WS + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def nodes():
    """Start Nodes through this; every one is stopped at the end of the test, pass or fail."""
    started: list[WsProcess] = []

    def start(*args, cwd=None) -> WsProcess:
        n = WsProcess(*args, cwd=cwd)
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


@pytest.fixture(scope="session")
def converted(tiny_release, tmp_path_factory):
    """The tiny release in the per-expert layout (read-only for tests: copy to change)."""
    out = tmp_path_factory.mktemp("converted") / "mixtral-tiny-experts"
    r = run_ws("convert", tiny_release, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def release_copy(tiny_release, tmp_path) -> Path:
    dest = tmp_path / tiny_release.name
    shutil.copytree(tiny_release, dest)
    return dest


def seeder(nodes, release: Path, torrent: Path, *extra) -> WsProcess:
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
