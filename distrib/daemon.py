"""The seeding daemon: every registered torrent in one libtorrent session, driven by an asyncio loop.

Alerts reach the loop through ``set_alert_fd`` (a socketpair watched by ``loop.add_reader``); hashing runs
in worker threads and file writes in an I/O pool, so the loop only ever does short work and the API stays
responsive. Resume data is saved after every check or completion, periodically and on shutdown; a torrent
is resumed from it only when its files still have the recorded sizes and mtimes (see daemon_state).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import libtorrent as lt

from distrib.daemon_alerts import AlertHandling
from distrib.daemon_config import DaemonConfig
from distrib.daemon_state import Entry, StateDir, fingerprint, read_or_create_token
from distrib.daemon_torrents import Conflict, Managed, NotFound, PathGuard
from distrib.scrub import Cancelled, RateLimit, scrub
from distrib.session import SessionOptions, make_session
from distrib.source import resolve
from distrib.torrentfile import Torrent, lt_message, parse_torrent
from weightswarm import __version__
from weightswarm.errors import InputError, TorrentError

log = logging.getLogger("weightswarm.daemon")

ALERTS = (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
          | lt.alert_category.file_progress)
RESUME_FLAGS = lt.save_resume_flags_t.flush_disk_cache
TICK = 1.0  # seconds between status refreshes, resume and scrub schedule checks


class Daemon(AlertHandling):
    """Owns the session, the registry and the workers; the API calls its coroutines."""

    def __init__(self, cfg: DaemonConfig, emit=None):
        cfg.require_dirs()
        self.cfg = cfg
        self.paths = PathGuard(cfg.data)
        self.state = StateDir(cfg.state)
        self.emit = emit or (lambda event: None)
        self.torrents: dict[str, Managed] = {}
        self.counters: Counter = Counter()
        self.stopping = asyncio.Event()
        self.previous_shutdown = ""
        self.started = time.time()
        self.api_url = ""
        self.token = ""
        self._cancel = threading.Event()  # tells scrub threads to stop
        self._scrubs = ThreadPoolExecutor(1, "scrub")  # one scrub at a time: they share the disk
        self._io = ThreadPoolExecutor(1, "state-io")  # one thread: state writes happen in the order asked
        self._resume_pending: dict[str, list] = {}  # id -> file fingerprint taken when the save was asked for
        self._resume_done = asyncio.Event()
        self._reserved: set[str] = set()
        self._tasks: set[asyncio.Future] = set()  # scrubs and resume writes: the loop keeps only weak references

    # ---- life cycle

    async def run(self, start_api) -> None:
        """Serve until SIGTERM/SIGINT; ``start_api(daemon)`` returns (runner, url)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.previous_shutdown = self.state.open()
        clean = False
        try:
            self.token = read_or_create_token(self.cfg.token_path)
            self._open_session(loop)
            if self.previous_shutdown == "crash":
                log.warning("the previous run did not stop cleanly: resume data is checked against the files")
            for entry in self.state.entries():
                try:
                    self._start(entry, fresh=False)
                except Exception as e:  # one broken entry must not stop the others (nor the daemon, in a loop)
                    self.event("torrent_error", logging.ERROR, id=entry.id, message=f"not started: {e}")
            runner, self.api_url = await start_api(self)
            self.event("listening", port=self.ses.listen_port(), api=self.api_url, pid=os.getpid(),
                       previous_shutdown=self.previous_shutdown, torrents=len(self.torrents))
            ticker = asyncio.create_task(self._tick())
            await self.stopping.wait()
            ticker.cancel()
            await runner.cleanup()
            clean = await self._shutdown()
        finally:
            self.state.close(clean)
        self.event("stopped", clean=clean)

    def _open_session(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.cfg
        self.ses = make_session(SessionOptions(listen=c.listen, dht=c.dht, upload_rate=c.max_upload_rate,
                                               download_rate=c.max_download_rate, max_connections=c.max_connections))
        self.ses.apply_settings({"alert_mask": int(ALERTS), "alert_queue_size": 10000,
                                 "hashing_threads": max(1, os.cpu_count() or 1)})
        # libtorrent writes a byte to this socket whenever alerts are waiting: the loop wakes without polling.
        self._alert_r, self._alert_w = socket.socketpair()
        for sock in (self._alert_r, self._alert_w):
            sock.setblocking(False)
        self.ses.set_alert_fd(self._alert_w.fileno())
        loop.add_reader(self._alert_r.fileno(), self._on_alert_fd)

    async def _shutdown(self, deadline: float = 30.0) -> bool:
        """Stop scrubs, pause, save every torrent's resume data; True if all of it was written."""
        failures = self.counters["resume_failures"]
        self._cancel.set()
        self.ses.pause()
        for m in self.torrents.values():
            self._save_resume(m)
        try:
            await asyncio.wait_for(self._all_resume_written(), deadline)
        except asyncio.TimeoutError:
            log.error("resume data not written within %.0f s: those torrents are re-checked at the next start",
                      deadline)
            return False
        finally:
            asyncio.get_running_loop().remove_reader(self._alert_r.fileno())
            self._scrubs.shutdown(wait=False, cancel_futures=True)
        return self.counters["resume_failures"] == failures

    async def _all_resume_written(self) -> None:
        while self._resume_pending:
            self._resume_done.clear()
            await self._resume_done.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # the writes, and scrubs winding down

    async def _tick(self) -> None:
        """Once a second: refresh statuses; now and then: resume data, scheduled scrubs."""
        last_resume = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            try:
                self.ses.post_torrent_updates()
                self._on_alert_fd()  # a wake-up byte can be coalesced with an earlier one; never miss alerts
                if time.monotonic() - last_resume >= self.cfg.resume_interval:
                    last_resume = time.monotonic()
                    for m in self.torrents.values():
                        if m.handle.need_save_resume_data():
                            self._save_resume(m)
                for m in list(self.torrents.values()):
                    if self.cfg.scrub_interval and m.scrub_due(self.cfg.scrub_interval):
                        self.request_scrub(m.entry.id, reason="schedule")
            except Exception:  # the periodic work must go on whatever one round ran into
                log.exception("periodic work")

    def event(self, kind: str, level: int = logging.INFO, **fields) -> None:
        """Log one event and hand it to the --json output."""
        log.log(level, "%s %s", kind, json.dumps(fields, default=str))
        self.emit({"event": kind, **fields})

    # ---- torrents

    def _start(self, entry: Entry, fresh: bool, torrent: Torrent | None = None) -> Managed:
        """Add a registered torrent to the session, from resume data only when it matches the files."""
        data = self.state.torrent_bytes(entry.id) if torrent is None else None
        if data is not None:
            torrent = parse_torrent(data, self.state.torrents / f"{entry.id}.torrent")
        save = self.paths.save_dir(entry.save_path)
        if torrent is not None:
            atp, reason = (None, "new torrent") if fresh else \
                self.state.load_resume(entry.id, fingerprint(self.paths.payload(torrent, entry.save_path)))
            start = {"mode": "resume" if atp else "check", "reason": reason}
            atp = atp or lt.add_torrent_params()
            atp.ti = torrent.info
        elif entry.magnet:
            atp = lt.parse_magnet_uri(entry.magnet)
            # Nothing is written until the metadata's paths have been checked (metadata_received).
            atp.flags |= lt.torrent_flags.upload_mode
            start = {"mode": "metadata", "reason": "waiting for metadata from peers"}
        else:
            raise InputError(entry.id, "registry entry without a .torrent file or a magnet")
        atp.save_path = str(save)
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        limits = entry.limits
        atp.upload_limit = limits.get("upload_rate", self.cfg.torrent_max_upload_rate) or -1
        atp.download_limit = limits.get("download_rate", self.cfg.torrent_max_download_rate) or -1
        atp.max_connections = limits.get("max_connections", self.cfg.torrent_max_connections) or -1
        m = Managed(entry, self.ses.add_torrent(atp), torrent, start)
        self.torrents[entry.id] = m
        self.event("added", id=entry.id, name=m.name, start=start)
        return m

    def lookup(self, key: str) -> Managed:
        key = key.lower()
        m = self.torrents.get(key) or next((m for m in self.torrents.values() if key in m.hashes()), None)
        if m is None:
            raise NotFound(key, "no such torrent")
        return m

    async def add(self, torrent_data: bytes | None, magnet: str | None, save_path: str, limits: dict) -> dict:
        """Register a torrent (.torrent bytes or a magnet) whose data lies, or is to go, in DATA/save_path."""
        save_rel = self.paths.confine_save_path(save_path)
        torrent = None
        if torrent_data is not None:
            torrent = parse_torrent(torrent_data, "torrent")
            self.paths.payload(torrent, save_rel)  # refuses files that would lie outside --data
            key, name, hashes = torrent.info_hash, torrent.name, {torrent.v1, torrent.v2} - {None}
        elif (magnet or "").startswith("magnet:"):
            source = resolve(magnet)  # only magnets: resolve() would also read paths on this machine
            key, name, hashes = source.key, source.params.name, {source.key}
        else:
            raise InputError("torrent", "give a .torrent file (field 'torrent') or a magnet URI (field 'magnet')")
        if hashes & (self._reserved | {h for m in self.torrents.values() for h in m.hashes()}):
            raise Conflict(key, "this torrent is already registered")
        entry = Entry(id=key, save_path=save_rel, name=name, magnet=None if torrent else magnet, limits=limits)
        self._reserved.add(key)
        try:
            await self._in_io(self.state.register, entry, torrent_data)
            try:
                m = self._start(entry, fresh=True, torrent=torrent)
            except (RuntimeError, OverflowError) as e:  # libtorrent refused it after all: leave nothing registered
                await self._in_io(self.state.remove, key)
                raise TorrentError("torrent", f"cannot add it: {lt_message(e)}") from None
        finally:
            self._reserved.discard(key)
        return m.status()

    async def remove(self, key: str, delete_data: bool) -> dict:
        m = self.lookup(key)
        del self.torrents[m.entry.id]
        m.removed = True
        self._resume_pending.pop(m.entry.id, None)
        self.ses.remove_torrent(m.handle, lt.session.delete_files if delete_data and m.torrent else 0)
        await self._in_io(self.state.remove, m.entry.id)
        self.event("removed", id=m.entry.id, data_deleted=bool(delete_data and m.torrent))
        return {"id": m.entry.id, "removed": True, "data_deleted": bool(delete_data and m.torrent)}

    def request_scrub(self, key: str, reason: str = "request") -> dict:
        """Queue a scrub (one runs at a time); 409 while one of this torrent is queued or running."""
        m = self.lookup(key)
        if m.scrubbing is not None:
            raise Conflict(key, "a scrub of this torrent is already queued or running")
        if m.torrent is None or m.state.startswith("checking"):
            raise Conflict(key, f"cannot scrub while {m.state}")
        m.scrubbing = {"queued": time.time(), "reason": reason, "done": 0, "total": 0}
        self._spawn(self._scrub(m, reason))
        return {"id": m.entry.id, "scrub": "queued"}

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _scrub(self, m: Managed, reason: str) -> None:
        """Re-read and re-hash the pieces the torrent has, rate-limited, in the scrub thread."""
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            m.scrubbing.update(done=done, total=total)  # read by the API; a dict update is atomic under the GIL

        def on_bad(piece: int) -> None:
            loop.call_soon_threadsafe(self._bad_piece, m, piece)

        started = time.time()
        have = list(m.handle.status().pieces)  # now, not when the scrub was queued: pieces may have gone since
        self.event("scrub_started", id=m.entry.id, reason=reason, pieces=sum(have))
        try:
            res = await loop.run_in_executor(self._scrubs, scrub, m.torrent, self.paths.save_dir(m.entry.save_path),
                                             have, RateLimit(self.cfg.scrub_rate, self._cancel), on_bad, progress)
        except Cancelled:
            return
        except Exception as e:
            self.counters["scrubs_error"] += 1
            self.event("scrub_failed", logging.ERROR, id=m.entry.id, message=str(e))
            if not m.removed:  # recorded, so the schedule waits a full interval instead of retrying at once
                m.entry.last_scrub = {"started": started, "finished": time.time(), "reason": reason, "ok": False,
                                      "error": str(e)}
                await self._in_io(self.state.save_entry, m.entry)
            return
        finally:
            m.scrubbing = None
        if m.removed:  # removed while it ran (maybe with its data): nothing to count or report
            return
        result = {"started": started, "finished": time.time(), "reason": reason, **res.report()}
        self.counters["scrubs_ok" if result["ok"] else "scrubs_corrupt"] += 1
        self.counters["scrub_bytes"] += res.bytes
        self.counters["scrub_manifest_mismatches"] += len(res.manifest_mismatches)
        m.entry.last_scrub = result
        await self._in_io(self.state.save_entry, m.entry)
        self.event("scrub_finished", logging.INFO if result["ok"] else logging.ERROR, id=m.entry.id, **result)

    def _bad_piece(self, m: Managed, piece: int) -> None:
        """Take a corrupt piece out of service at once: forget the resume data, then let libtorrent re-check
        the torrent, which drops every bad piece (never uploaded again) and fetches it again from peers."""
        if m.removed:
            return
        self.counters["scrub_bad_pieces"] += 1
        m.found_bad.add(piece)
        self.event("bad_piece", logging.ERROR, id=m.entry.id, piece=piece, files=m.files_of_piece(piece))
        if not m.recheck_requested:
            m.recheck_requested = True
            # Through the one I/O thread, after any resume write queued before it: a crash now must not
            # resume from the old claim. Resume data arriving later is not written (recheck_requested).
            self._spawn(self._in_io(self.state.drop_resume, m.entry.id))
            m.handle.force_recheck()

    def _save_resume(self, m: Managed) -> None:
        if m.torrent is None or not m.handle.is_valid():
            return
        try:
            # Taken before libtorrent snapshots its state: any later write changes an mtime.
            files = fingerprint(self.paths.payload(m.torrent, m.entry.save_path))
        except InputError as e:  # a file became a symlink out of --data: no resume data, a re-check next time
            log.error("resume data of %s not saved: %s", m.entry.id, e)
            return
        self._resume_pending[m.entry.id] = files
        m.handle.save_resume_data(RESUME_FLAGS)

    async def _in_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # ---- reports

    def health(self) -> dict:
        states = Counter(m.state for m in self.torrents.values())
        return {"ok": True, "uptime": round(time.time() - self.started, 3), "torrents": len(self.torrents),
                "states": dict(states), "listen_port": self.ses.listen_port(), "previous_shutdown":
                self.previous_shutdown, "version": __version__}
