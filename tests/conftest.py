"""Shared fixtures: a tiny synthetic release, its torrent, and real weightswarm processes on loopback."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.support import WsProcess, run_ws


@pytest.fixture
def nodes():
    """Start Nodes through this; every one is stopped at the end of the test, pass or fail."""
    started: list[WsProcess] = []

    def start(*args, cwd=None, prefix=None) -> WsProcess:
        n = WsProcess(*args, cwd=cwd, prefix=prefix)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A tiny synthetic Mixtral release (~1 MB) in its torrent folder, read-only for tests: copy to change."""
    from weightswarm.convert.synth import synthesize

    root = tmp_path_factory.mktemp("release") / "mixtral-tiny"
    synthesize(root, preset="tiny")
    return root


@pytest.fixture(scope="session")
def tiny_torrent(tiny_release, tmp_path_factory) -> Path:
    from weightswarm.distrib.create import write_torrent

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
