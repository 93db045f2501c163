"""Faults of the machine, not the input: a full disk and kill -9 (also between two moves into place). Every
command names the file it could not write, leaves nothing under a final name, and the same command completes
once the cause is gone. A tampered record of those moves is refused like any bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.hostile import error_lines_problems
from tests.support import LOOPBACK, WS, run_ws, seeder, tree_bytes


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only) and a function that grows it: the full disk, then the space freed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", disk]).returncode != 0:
        pytest.skip("this machine cannot mount a tmpfs")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)

    yield disk, grow
    subprocess.run(["umount", "-l", disk])


def _full(r) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr)
    assert not error_lines_problems(r.stderr), r.stderr
    assert "no space left on the device" in r.stderr and "Error: /" in r.stderr, r.stderr


def _finals(root: Path) -> list[str]:
    """Files under their final names (work folders start with a dot)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def test_synth_on_a_full_disk_then_after_space_is_freed(small_disk, tiny_release):
    disk, grow = small_disk
    _full(run_ws("synth", disk / "rel", "--preset", "tiny"))
    assert _finals(disk) == []
    grow()
    assert run_ws("synth", disk / "rel", "--preset", "tiny").returncode == 0
    assert tree_bytes(disk / "rel") == tree_bytes(tiny_release)


@pytest.mark.parametrize("command", [["convert"], ["export", "--format", "consolidated"], ["export"]])
def test_convert_and_export_on_a_full_disk_then_after(small_disk, command, tiny_release, converted, tmp_path):
    disk, grow = small_disk
    src = tiny_release if command == ["convert"] else converted
    _full(run_ws(command[0], src, "-o", disk / "out", *command[1:]))
    assert _finals(disk) == []
    grow()
    r = run_ws(command[0], src, "-o", disk / "out", *command[1:])
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    assert run_ws(command[0], src, "-o", clean, *command[1:]).returncode == 0
    assert tree_bytes(disk / "out") == tree_bytes(clean)


def test_fetch_on_a_full_disk_then_after(small_disk, nodes, tiny_release, tiny_torrent):
    disk, grow = small_disk
    s = seeder(nodes, tiny_release, tiny_torrent)
    argv = ["fetch", tiny_torrent, "-o", disk, *LOOPBACK, "--peer", f"127.0.0.1:{s.port}", "--timeout", "30"]
    _full(run_ws(*argv))
    grow()
    r = run_ws(*argv)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(disk / tiny_release.name) == tree_bytes(tiny_release)


def _kill_when(argv, ready, timeout: float = 60) -> bool:
    """Start argv and kill -9 it as soon as ready() holds; False if it ended first."""
    p = subprocess.Popen(WS + [str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None and not ready() and time.monotonic() < deadline:
            try:
                p.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
    return p.returncode == -signal.SIGKILL


def _work_file(work: Path, at_least: int):
    def ready() -> bool:
        return work.is_dir() and any(f.is_file() and f.stat().st_size >= at_least for f in work.rglob("*"))
    return ready


# where a kill lands: the work folder made, its first file begun, a file 256 KiB in
POINTS = {"work-folder": (lambda w: w.is_dir), "first-bytes": (lambda w: _work_file(w, 1)),
          "256KiB": (lambda w: _work_file(w, 256 << 10))}


def _argv(command: str, out: Path, release: Path, converted: Path) -> list:
    return {"synth": ["synth", out, "--preset", "tiny"],
            "convert": ["convert", release, "-o", out],
            "export-consolidated": ["export", converted, "-o", out, "--format", "consolidated"],
            "export-hf": ["export", converted, "-o", out]}[command]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("command", ["synth", "export-consolidated", "export-hf"])
def test_kill_9_then_the_same_command_completes(command, point, tiny_release, converted, tmp_path):
    # A tiny run may end between two polls (the last 256 KiB are written in milliseconds): then again.
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        argv = _argv(command, out, tiny_release, converted)
        work = out / (".synth" if command == "synth" else ".export")
        if _kill_when(argv, POINTS[point](work)):
            break
    else:
        raise AssertionError(f"{command} always finished before it could be killed")
    r = run_ws(*argv)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    assert run_ws(*[clean if a == out else a for a in argv]).returncode == 0
    assert tree_bytes(out) == tree_bytes(clean)
    assert not work.exists()


class _Killed(BaseException):
    """What the process would have got: nothing after this point runs."""


def _killed_while_moving(argv: list[str], out: Path, monkeypatch) -> list:
    """Run argv in this process and 'kill' it after its first result was renamed into OUT: the one moment
    a kill cannot be aimed at from outside. The paths it moved."""
    from weightswarm.cli import main

    real, moved = os.replace, []

    def replace(src, dst):  # a rename out of the hidden work folder to a final name is a move into place
        if not any(part.startswith(".") for part in Path(dst).relative_to(out).parts):
            if moved:
                raise _Killed
            moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        main.main(argv, standalone_mode=False)
    monkeypatch.undo()
    return moved


@pytest.mark.parametrize("command", ["synth", "convert", "export-consolidated", "export-hf"])
def test_killed_while_moving_into_place_the_same_command_completes(command, tiny_release, converted, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "out"
    argv = [str(a) for a in _argv(command, out, tiny_release, converted)]
    moved = _killed_while_moving(argv, out, monkeypatch)
    assert len(moved) == 1 and Path(moved[0]).is_file()  # one result is in place, the others are not
    r = run_ws(*argv)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    assert run_ws(*[clean if a == str(out) else a for a in argv]).returncode == 0
    assert tree_bytes(out) == tree_bytes(clean)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == ([".convert"] if command == "convert" else [])


@pytest.mark.parametrize("plan", ['["../../escaped"]', '{"a": 1}', '[1]'])
def test_a_tampered_list_of_moves_is_refused(plan, tiny_release, converted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = [str(a) for a in _argv("export-hf", out, tiny_release, converted)]
    _killed_while_moving(argv, out, monkeypatch)
    (out / ".export" / "publish.json").write_text(plan)
    before = sorted(tmp_path.rglob("*"))
    r = run_ws(*argv)
    assert r.returncode == 2 and not error_lines_problems(r.stderr), r.stderr
    assert f"Error: {out / '.export' / 'publish.json'}: " in r.stderr, r.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing moved, nothing written
