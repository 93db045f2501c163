"""A `weightswarm daemon` subprocess on loopback for tests, with a small HTTP client for its API."""
from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from weightswarm.errors import SwarmError


class Daemon:
    """Started through the `nodes` fixture (so it is killed at the end of the test, pass or fail)."""

    def __init__(self, nodes, data: Path, state: Path, *extra):
        self.data, self.state = data, state
        self.node = nodes("daemon", "--data", data, "--state", state, "--api", "127.0.0.1:0",
                          "--listen", "127.0.0.1:0", "--no-dht", "--json", *extra)
        ev = self.wait(lambda e: e["event"] == "listening", timeout=60)
        self.api, self.port = ev["api"], ev["port"]
        self.api_port = urlparse(self.api).port
        self.token = (state / "api-token").read_text().strip()

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
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(data), dict(r.headers)
        except ValueError:
            return r.status, data, dict(r.headers)

    def add(self, torrent: bytes | None = None, save_path: str = "", magnet: str | None = None,
            token: str | None = "default", **limits) -> tuple[int, object]:
        fields = {"save_path": save_path} | ({"magnet": magnet} if magnet else {}) | limits
        body, ctype = multipart(fields, {"torrent": torrent} if torrent is not None else {})
        status, out, _ = self.request("POST", "/v1/torrents", body, {"Content-Type": ctype}, token)
        return status, out

    def status(self, id: str) -> dict:
        code, body, _ = self.request("GET", f"/v1/torrents/{id}")
        assert code == 200, body
        return body

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


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, v in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.torrent"\r\n'
                     f'Content-Type: application/x-bittorrent\r\n\r\n'.encode() + v + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def place(release: Path, folder: Path) -> Path:
    """A writable copy of a release inside folder (a save path under the daemon's --data)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(release, folder / release.name))
