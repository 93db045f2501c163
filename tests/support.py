"""Helpers the tests share: weightswarm commands as subprocesses, other programs run and always stopped (opentracker),
a daemon on loopback, file helpers."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from weightswarm.core.errors import SwarmError
from weightswarm.distrib.daemon.client import ApiClient
from weightswarm.distrib.torrentfile import load_torrent
from weightswarm.procs import LOOPBACK, WS, WsProcess

__all__ = ["LOOPBACK", "WS", "WsProcess", "run_ws", "seeder", "flip_byte", "tree_bytes", "free_port",
           "wait_listening", "stop", "Program", "Tracker", "Daemon", "place"]


def run_ws(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    """Run a weightswarm command to completion."""
    return subprocess.run(WS + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


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
            raise AssertionError(f"{proc.args[0]} exited: {proc.stderr.read() if proc.stderr else ''}")
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # a clean exit flushes the clients' write caches before the bytes are compared
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Program:
    """A program run in its own folder with its output in ``log``; as a context manager it is always stopped."""

    binary: str

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True)
        self.port = free_port()  # where it accepts peers (a tracker: announces)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def started(self) -> None:
        """Return once it serves (raise if it does not)."""

    def __enter__(self):
        self._log = open(self.work / "log", "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.work, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        try:
            self.started()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        self._log.close()

    def log(self) -> str:
        return (self.work / "log").read_text(errors="replace")[-3000:]


class Tracker(Program):
    """opentracker on loopback, serving the torrents' info-hashes only."""

    binary = "opentracker"

    def __init__(self, work: Path, port: int, *torrents: Path):
        super().__init__(work)
        self.port = port  # already named in the torrents
        # opentracker serves only whitelisted hashes: the v1 hash and the v2 hash's first 40 hex digits.
        hashes = [h for t in map(load_torrent, torrents) for h in (t.v1, t.v2 and t.v2[:40]) if h]
        (work / "whitelist.txt").write_text("".join(f"{h}\n" for h in hashes))

    def command(self) -> list[str]:
        return ["opentracker", "-i", "127.0.0.1", "-p", str(self.port), "-P", str(self.port), "-d", str(self.work),
                "-w", "whitelist.txt"]

    def started(self) -> None:
        wait_listening(self.proc, self.port)


class Daemon:
    """A `weightswarm daemon` subprocess on loopback and its API client. Started through the `nodes`
    fixture, so it is killed at the end of the test, pass or fail."""

    def __init__(self, nodes, data: Path, state: Path, *extra):
        self.data, self.state = data, state
        self.node = nodes("daemon", "--data", data, "--state", state, "--api", "127.0.0.1:0",
                          "--listen", "127.0.0.1:0", "--no-dht", "--json", *extra)
        ev = self.wait(lambda e: e["event"] == "listening", timeout=60)
        self.api, self.port = ev["api"], ev["port"]
        self.client = ApiClient.for_state(state)

    def wait(self, pred, timeout: float = 60, after: dict | None = None) -> dict:
        """The first event since the daemon started (or since the event ``after``) for which pred holds."""
        deadline = time.monotonic() + timeout
        seen = next(i + 1 for i, e in enumerate(self.node.events) if e is after) if after else 0
        while True:
            for e in self.node.events[seen:]:
                if pred(e):
                    return e
            seen = len(self.node.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise SwarmError("daemon", f"timed out waiting for an event; last: {self.node.events[-3:]}; "
                                 f"log: {self.node.stderr[-3000:]}")
            try:
                self.node.wait_event(lambda e: True, timeout=left)
            except SwarmError:
                if time.monotonic() >= deadline or self.node.proc.poll() is not None:
                    raise

    def event(self, kind: str, id: str | None = None, timeout: float = 60, after: dict | None = None) -> dict:
        return self.wait(lambda e: e["event"] == kind and (id is None or e.get("id") == id), timeout, after)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: str | None = "default") -> tuple[int, object, dict]:
        """(status, JSON body or bytes, headers); the path is sent exactly as given."""
        if token in (None, "default"):
            return self.client.request(method, path, body, headers, auth=token is not None)
        return ApiClient(self.api, token).request(method, path, body, headers)

    def add(self, torrent: bytes | None = None, save_path: str = "", magnet: str | None = None,
            token: str | None = "default", **limits) -> tuple[int, object]:
        from weightswarm.distrib.daemon.client import multipart

        fields = {"save_path": save_path} | ({"magnet": magnet} if magnet else {}) | limits
        body, ctype = multipart(fields, {"torrent": ("t.torrent", torrent)} if torrent is not None else {})
        status, out, _ = self.request("POST", "/v1/torrents", body, {"Content-Type": ctype}, token)
        return status, out

    def status(self, id: str) -> dict:
        return self.client.torrent(id)

    def until(self, fn, timeout: float = 30):
        """Poll the API until fn() returns something true (the status is refreshed once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            got = fn()
            if got or time.monotonic() > deadline:
                return got
            try:  # waiting on the process doubles as the poll interval and notices a crash
                self.node.proc.wait(timeout=0.2)
                raise AssertionError(f"the daemon exited: {self.node.stderr[-2000:]}")
            except subprocess.TimeoutExpired:
                pass


def place(release: Path, folder: Path) -> Path:
    """A writable copy of a release inside folder (a save path under the daemon's --data)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(release, folder / release.name))
