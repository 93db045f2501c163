"""What the daemon keeps under ``--state``: the registry of torrents, their resume data, the API token,
and the clean-shutdown marker.

Layout: ``torrents/<id>.json`` (the registry entry), ``torrents/<id>.torrent`` (metadata, once known),
``torrents/<id>.resume`` (libtorrent resume data bencoded together with the size and mtime of every payload
file at the time it was asked for), ``clean-shutdown`` (present only between a clean stop and the next
start), ``daemon.lock``. Resume data is trusted only while the files still have the recorded sizes and
mtimes: anything else (no record, unreadable, files changed or a scrub found a bad piece) means a re-check.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libtorrent as lt

from weightswarm.core.atomic import atomic_write_bytes, fsync_dir
from weightswarm.core.errors import InputError
from weightswarm.core.locks import lock_exclusive
from weightswarm.distrib.daemon.client import API_FILE

log = logging.getLogger("weightswarm.daemon")
Fingerprint = list  # per payload file: [size, mtime_ns], or None when the file is absent


@dataclass
class Entry:
    """One registered torrent, as persisted."""

    id: str  # v1 info-hash (hex), else the v2 one
    save_path: str  # relative to --data, posix; "" = --data itself
    name: str = ""
    magnet: str | None = None  # how it was added when there was no .torrent
    added: float = field(default_factory=time.time)
    limits: dict = field(default_factory=dict)  # upload_rate, download_rate, max_connections
    last_scrub: dict | None = None


class StateDir:
    """The files under --state; every write is atomic."""

    def __init__(self, root: Path):
        self.root = root
        self.torrents = root / "torrents"
        self.marker = root / "clean-shutdown"
        self.api_file = root / API_FILE
        self._lock = None
        self._created: Path | None = None  # the outermost folder this run created, removed if it fails to start

    def open(self) -> str:
        """Create and lock the folder; returns how the previous run ended: clean, crash or first start."""
        outer = next((p for p in reversed([self.root, *self.root.parents]) if not p.exists()), None)
        self.torrents.mkdir(parents=True, exist_ok=True)
        self._created = outer
        self._lock = lock_exclusive(self.root / "daemon.lock", self.root, "another daemon is using this state folder")
        if self.marker.exists():
            self.marker.unlink()  # from now on a crash leaves no marker behind
            fsync_dir(self.root)
            return "clean"
        return "crash" if any(self.torrents.iterdir()) else "first start"

    def close(self, clean: bool) -> None:
        self.api_file.unlink(missing_ok=True)
        if clean:
            atomic_write_bytes(self.marker, json.dumps({"stopped": time.time()}).encode())
        if self._lock:
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        """After a failed start: remove the folders open() created (nothing of an earlier run is touched)."""
        if self._lock:
            self._lock.close()
            self._lock = None
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)

    def record_api(self, url: str) -> None:
        """Where the API listens, for clients that know only the state folder (ApiClient.for_state)."""
        atomic_write_bytes(self.api_file, json.dumps({"url": url, "pid": os.getpid()}).encode())

    def entries(self) -> list[Entry]:
        """The registered torrents; an unreadable entry is logged and left for a person to look at."""
        out = []
        for p in sorted(self.torrents.glob("*.json")):
            try:
                out.append(Entry(**json.loads(p.read_text())))
            except (ValueError, TypeError) as e:
                log.error("%s: unreadable registry entry, not started: %s", p, e)
        return out

    def register(self, entry: Entry, torrent_data: bytes | None) -> None:
        if torrent_data is not None:
            self.save_torrent(entry.id, torrent_data)
        self.save_entry(entry)

    def save_entry(self, entry: Entry) -> None:
        atomic_write_bytes(self.torrents / f"{entry.id}.json", json.dumps(asdict(entry), indent=1).encode())

    def save_torrent(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.torrents / f"{key}.torrent", data)

    def torrent_bytes(self, key: str) -> bytes | None:
        p = self.torrents / f"{key}.torrent"
        return p.read_bytes() if p.exists() else None

    def remove(self, key: str) -> None:
        for ext in ("json", "torrent", "resume"):
            (self.torrents / f"{key}.{ext}").unlink(missing_ok=True)
        fsync_dir(self.torrents)

    def save_resume(self, key: str, resume: bytes, files: Fingerprint) -> None:
        """``resume``: lt.write_resume_data_buf() of the torrent's params; ``files``: their fingerprint."""
        data = lt.bencode({b"resume": resume, b"files": json.dumps(files).encode()})
        atomic_write_bytes(self.torrents / f"{key}.resume", data)

    def drop_resume(self, key: str) -> None:
        """The data on disk no longer matches it (a scrub found a bad piece): the next start re-checks."""
        (self.torrents / f"{key}.resume").unlink(missing_ok=True)
        fsync_dir(self.torrents)

    def load_resume(self, key: str, files: Fingerprint) -> tuple[lt.add_torrent_params | None, str]:
        """Resume params if they can be trusted for these files, else None and why not."""
        p = self.torrents / f"{key}.resume"
        if not p.exists():
            return None, "no resume data"
        try:
            d = lt.bdecode(p.read_bytes())
            atp = lt.read_resume_data(d[b"resume"])
            recorded = json.loads(d[b"files"])
        except (RuntimeError, TypeError, KeyError, ValueError):
            return None, "resume data unreadable"
        if recorded != files:
            return None, "files changed since the resume data was saved"
        return atp, "resume data matches the files"


def fingerprint(paths: list[Path]) -> Fingerprint:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append([st.st_size, st.st_mtime_ns])
        except OSError:
            out.append(None)
    return out


def read_or_create_token(path: Path) -> str:
    """The API token; a new random one is written with mode 0600 when the file does not exist."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        return token
    if not token:
        raise InputError(path, "the API token file is empty")
    return token
