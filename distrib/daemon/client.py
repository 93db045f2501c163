"""The one client of the daemon's HTTP API: the CLI's daemon subcommands, the demo, the tests and the
benchmarks all talk to the daemon through it.

Synchronous (http.client): a command makes a few calls and exits; no event loop is needed. A running
daemon records where its API listens in ``STATE/api.json``, so ``ApiClient.for_state(STATE)`` finds a
daemon started with any ``--api``.
"""
from __future__ import annotations

import http.client
import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from weightswarm.core.errors import Conflict, Forbidden, InputError, NotFound

API_FILE = "api.json"  # in the state folder: {"url", "pid"} of the running daemon
TOKEN_FILE = "api-token"
_ERRORS = {403: Forbidden, 404: NotFound, 409: Conflict}


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type; ``files`` maps a field to (file name, bytes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f'Content-Type: application/x-bittorrent\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class ApiClient:
    def __init__(self, url: str, token: str | None, timeout: float = 60):
        self.url = url.rstrip("/")
        u = urlparse(self.url)
        if u.scheme != "http" or not u.hostname:
            raise InputError(url, "not an http:// address of a daemon's API")
        self.host, self.port = u.hostname, u.port or 80
        self.token, self.timeout = token, timeout

    @classmethod
    def for_state(cls, state: str | os.PathLike | None, api: str | None = None,
                  token_file: str | os.PathLike | None = None, timeout: float = 60) -> ApiClient:
        """The client of the daemon that uses STATE: its recorded address unless ``api`` (HOST:PORT) is given;
        its token from STATE/api-token unless ``token_file`` is given."""
        if state is None and (api is None or token_file is None):
            raise InputError("--state", "missing: give the daemon's --state folder (or --api and --token-file)")
        state = Path(state) if state is not None else None
        token_path = Path(token_file) if token_file else state / TOKEN_FILE
        try:
            token = token_path.read_text().strip()
        except OSError:
            raise InputError(token_path, "no API token file",
                             hint="start the daemon first, or give --token-file") from None
        if api is None:
            try:
                api = json.loads((state / API_FILE).read_text())["url"]
            except (OSError, ValueError, KeyError, TypeError):
                raise InputError(state, "no running daemon recorded its API address here",
                                 hint="start it with `weightswarm daemon --state STATE ...`, or give --api HOST:PORT") \
                    from None
        return cls(api if api.startswith("http://") else f"http://{api}", token, timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                auth: bool = True) -> tuple[int, object, dict]:
        """(status, JSON body or bytes, headers); the path is sent exactly as given."""
        h = dict(headers or {})
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
        except OSError as e:
            raise InputError(self.url, f"cannot reach the daemon: {e.strerror or e}",
                             hint="is it running? see `weightswarm daemon --help` for --api and --state") from None
        finally:
            conn.close()
        try:
            return r.status, json.loads(data), dict(r.headers)
        except ValueError:
            return r.status, data, dict(r.headers)

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        """A request whose error status becomes the matching InputError (403 Forbidden, 404 NotFound, ...)."""
        status, out, _ = self.request(method, path, body, headers)
        if status >= 400:
            problem = out.get("error", f"HTTP {status}") if isinstance(out, dict) else f"HTTP {status}"
            hint = "check --token-file: the token is in STATE/api-token" if status == 401 else None
            raise _ERRORS.get(status, InputError)(f"{self.url}{path}", problem, hint)
        return out

    def torrents(self) -> list[dict]:
        return self.call("GET", "/v1/torrents")["torrents"]

    def torrent(self, id: str) -> dict:
        return self.call("GET", f"/v1/torrents/{id}")

    def add(self, torrent: bytes | None = None, magnet: str | None = None, save_path: str = "",
            **limits) -> dict:
        fields = {"save_path": save_path} | ({"magnet": magnet} if magnet else {}) | \
            {k: str(v) for k, v in limits.items() if v is not None}
        body, ctype = multipart(fields, {"torrent": ("t.torrent", torrent)} if torrent is not None else {})
        return self.call("POST", "/v1/torrents", body, {"Content-Type": ctype})

    def remove(self, id: str, delete_data: bool = False) -> dict:
        return self.call("DELETE", f"/v1/torrents/{id}" + ("?delete_data=true" if delete_data else ""))

    def scrub(self, id: str) -> dict:
        return self.call("POST", f"/v1/torrents/{id}/scrub")

    def recheck(self, id: str) -> dict:
        return self.call("POST", f"/v1/torrents/{id}/recheck")

    def health(self) -> dict:
        return self.call("GET", "/healthz")

    def uploaded(self) -> int:
        """Payload bytes the daemon has uploaded, over every torrent."""
        return sum(t.get("uploaded", 0) for t in self.torrents())
