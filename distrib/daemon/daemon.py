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

from weightswarm import __version__
from weightswarm.core.errors import Conflict, InputError, NotFound, TorrentError
from weightswarm.core.units import plural
from weightswarm.distrib.daemon.config import DaemonConfig
from weightswarm.distrib.daemon.scrub import Cancelled, RateLimit, scrub
from weightswarm.distrib.daemon.state import Entry, StateDir, fingerprint, read_or_create_token
from weightswarm.distrib.daemon.torrents import Managed, PathGuard
from weightswarm.distrib.session import RequestQueue, SessionOptions, make_session
from weightswarm.distrib.source import resolve
from weightswarm.distrib.torrentfile import Torrent, check_info_paths, lt_message, parse_torrent
from weightswarm.verify.pieces import check_pieces

log = logging.getLogger("weightswarm.daemon")

ALERTS = (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
          | lt.alert_category.file_progress | lt.alert_category.connect)
RESUME_FLAGS = lt.save_resume_flags_t.flush_disk_cache
TICK = 1.0  # seconds between status refreshes, resume and scrub schedule checks


class Daemon:
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
        self._hashing = ThreadPoolExecutor(2, "verify")  # pieces the web seed is about to send (seed mode)
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
        clean, serving, token_created = False, False, not self.cfg.token_path.exists()
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
            self.state.record_api(self.api_url)
            serving = True
            self.event("listening", port=self.ses.listen_port(), api=self.api_url, pid=os.getpid(),
                       previous_shutdown=self.previous_shutdown, torrents=len(self.torrents))
            ticker = asyncio.create_task(self._tick())
            await self.stopping.wait()
            ticker.cancel()
            await runner.cleanup()
            clean = await self._shutdown()
        except BaseException:
            if not serving:  # it never started: leave nothing behind that this run created
                if token_created:
                    self.cfg.token_path.unlink(missing_ok=True)
                self.state.discard()
            raise
        finally:
            self.state.close(clean)
        self.event("stopped", clean=clean)

    def _open_session(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.cfg
        opts = SessionOptions(listen=c.listen, dht=c.dht, upload_rate=c.max_upload_rate,
                              download_rate=c.max_download_rate, max_connections=c.max_connections,
                              distinct_pieces=c.distinct_pieces)
        self.ses = make_session(opts)
        self.ses.apply_settings({"alert_mask": int(ALERTS), "alert_queue_size": 10000,
                                 "hashing_threads": max(1, os.cpu_count() or 1)})
        self.queue = RequestQueue(self.ses, opts)  # resized whenever a peer connects or leaves
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
        except TimeoutError:
            log.error("resume data not written within %.0f s: those torrents are re-checked at the next start",
                      deadline)
            return False
        finally:
            asyncio.get_running_loop().remove_reader(self._alert_r.fileno())
            self._scrubs.shutdown(wait=False, cancel_futures=True)
            self._hashing.shutdown(wait=False, cancel_futures=True)
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
        lazy = False
        if torrent is not None:
            atp, reason = (None, "new torrent") if fresh else \
                self.state.load_resume(entry.id, fingerprint(self.paths.payload(torrent, entry.save_path)))
            if atp is not None and self.previous_shutdown == "crash":
                # A crash may leave files whose size and mtime match while their bytes do not (a write that
                # never reached the disk, a disk that rots). Complete torrents then start in libtorrent's
                # seed mode, which hashes each piece before its first upload; the web seed does the same
                # (web_seed_pieces). Incomplete ones are checked in full.
                if len(atp.have_pieces) == torrent.info.num_pieces() and all(atp.have_pieces):
                    atp.flags |= lt.torrent_flags.seed_mode
                    lazy, reason = True, "the previous run did not stop cleanly: each piece is hashed before it " \
                                         "is first sent"
                else:
                    atp, reason = None, "the previous run did not stop cleanly: the files are checked"
            start = {"mode": "verify-on-upload" if lazy else "resume" if atp else "check", "reason": reason}
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
        m = Managed(entry, self.ses.add_torrent(atp), torrent, start, lazy=lazy)
        self.torrents[entry.id] = m
        self.event("added", id=entry.id, name=m.name, start=start)
        return m

    def lookup(self, key: str) -> Managed:
        """The torrent a v1 or v2 info-hash names, or any unique prefix of one (as `list` shows them)."""
        key = key.lower()
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise NotFound(key, "no such torrent: an id is a v1 or v2 info-hash in hex, or a prefix of one")
        found = {id(m): m for m in self.torrents.values() if any(h.startswith(key) for h in m.hashes())}
        if not found:
            raise NotFound(key, "no such torrent")
        if len(found) > 1:
            raise Conflict(key, f"prefix of {len(found)} torrents' info-hashes: give more digits")
        return next(iter(found.values()))

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

    def recheck(self, key: str) -> dict:
        """Hash the torrent's files again (libtorrent's full check): pieces that are good on disk again, say
        after a file was restored, come back; bad ones go. Nothing is served from it meanwhile."""
        m = self.lookup(key)
        if m.torrent is None or m.state.startswith("checking"):
            raise Conflict(key, f"cannot re-check while {m.state}")
        self._take_out_of_service(m, "recheck requested")
        return {"id": m.entry.id, "recheck": "started"}

    def _take_out_of_service(self, m: Managed, why: str) -> None:
        """Forget the resume data, then let libtorrent re-check the torrent: it keeps every piece that passes
        and drops the rest (never uploaded again, fetched again from peers)."""
        if not m.recheck_requested:
            m.recheck_requested = True
            # Through the one I/O thread, after any resume write queued before it: a crash now must not
            # resume from the old claim. Resume data arriving later is not written (recheck_requested).
            self._spawn(self._in_io(self.state.drop_resume, m.entry.id))
            m.handle.force_recheck()
            self.event("recheck", id=m.entry.id, reason=why)

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
        if not res.bad_pieces and res.pieces_checked == len(have):
            m.lazy = False  # every piece it has was just hashed
        if res.good_pieces and not res.bad_pieces:  # pieces it lacked are good on disk again: take them back
            self.event("good_data", id=m.entry.id, pieces=res.good_pieces)
            self._take_out_of_service(m, f"{plural(len(res.good_pieces), 'missing piece')} found good on disk")
        result = {"started": started, "finished": time.time(), "reason": reason, **res.report()}
        self.counters["scrubs_ok" if result["ok"] else "scrubs_corrupt"] += 1
        self.counters["scrub_bytes"] += res.bytes
        self.counters["scrub_manifest_mismatches"] += len(res.manifest_mismatches)
        m.entry.last_scrub = result
        await self._in_io(self.state.save_entry, m.entry)
        self.event("scrub_finished", logging.INFO if result["ok"] else logging.ERROR, id=m.entry.id, **result)

    def _bad_piece(self, m: Managed, piece: int) -> None:
        """Take a corrupt piece out of service at once (a re-check drops it; peers send it again)."""
        if m.removed:
            return
        self.counters["scrub_bad_pieces"] += 1
        m.found_bad.add(piece)
        self.event("bad_piece", logging.ERROR, id=m.entry.id, piece=piece, files=m.files_of_piece(piece))
        self._take_out_of_service(m, f"piece {piece} is corrupt")

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

    async def verify_for_upload(self, m: Managed, pieces: range) -> bool:
        """Before the web seed sends pieces of a torrent in seed mode: hash those not hashed yet (in a worker
        thread); a bad one is taken out of service like a scrub's find. True if all are good."""
        todo = [p for p in pieces if p not in m.verified]
        if not todo:
            return True
        res = await asyncio.get_running_loop().run_in_executor(
            self._hashing, lambda: check_pieces(m.torrent.root(self.paths.save_dir(m.entry.save_path)), m.torrent,
                                                todo, workers=1))
        m.verified.update(set(todo) - set(res.bad))
        for p in res.bad:
            self._bad_piece(m, p)
        return not res.bad

    async def _in_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # ---- alerts: every handler runs on the event loop, woken through set_alert_fd

    def _on_alert_fd(self) -> None:
        try:
            while self._alert_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        alerts = self.ses.pop_alerts()
        for a in alerts:
            try:
                self._on_alert(a)
            except Exception:  # one bad alert must not take the daemon down
                log.exception("handling %s", type(a).__name__)
        # A peer came or went: size the queue now, before more peers shake hands (the ticks are a second apart).
        if any(isinstance(a, (lt.peer_connect_alert, lt.peer_disconnected_alert)) for a in alerts):
            self.queue.update()

    def _on_alert(self, a) -> None:
        if isinstance(a, lt.state_update_alert):
            for st in a.status:
                m = self._managed(st.handle)
                if m:
                    m.status_cache = st
            return
        if isinstance(a, lt.save_resume_data_failed_alert):
            m = self._managed(a.handle)
            if m and self._resume_pending.pop(m.entry.id, None) is not None:
                self.counters["resume_failures"] += 1
                log.warning("resume data of %s not saved: %s", m.entry.id, a.message())
            self._resume_done.set()
            return
        if not isinstance(a, lt.torrent_alert):
            if isinstance(a, lt.listen_failed_alert):
                log.error("%s", a.message())
            return
        m = self._managed(a.handle)
        if m is None:
            return
        if isinstance(a, lt.save_resume_data_alert):
            self._resume_written(m, a.params)
        elif isinstance(a, lt.state_changed_alert):
            m.state = a.state.name
            if a.state == lt.torrent_status.checking_files:
                m.checks += 1
                self.event("checking", id=m.entry.id)
            elif a.state == lt.torrent_status.seeding:
                self.event("seeding", id=m.entry.id)
        elif isinstance(a, lt.torrent_checked_alert):
            st = m.handle.status()
            m.status_cache, m.recheck_requested = st, False
            if m.checks:  # a full check hashed every piece it kept
                m.lazy = False
            self.event("checked", id=m.entry.id, have=st.num_pieces, total=m.torrent.info.num_pieces()
                       if m.torrent else 0, rechecks=m.checks)
            self._save_resume(m)
        elif isinstance(a, lt.torrent_finished_alert):
            repaired = sorted(p for p in m.found_bad if m.handle.have_piece(p))
            if repaired:
                m.found_bad.difference_update(repaired)
                self.event("repaired", id=m.entry.id, pieces=repaired)
            self._save_resume(m)
        elif isinstance(a, lt.hash_failed_alert):
            m.hash_failures += 1
            self.counters["hash_failures"] += 1
            self.event("hash_failed", logging.WARNING, id=m.entry.id, piece=int(a.piece_index))
        elif isinstance(a, lt.metadata_received_alert):
            self._metadata_received(m)
        elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
            m.error = a.message()
            self.event("torrent_error", logging.ERROR, id=m.entry.id, message=m.error)

    def _managed(self, handle) -> Managed | None:
        ih = handle.info_hashes()
        for h in (str(ih.v1) if ih.has_v1() else None, str(ih.v2) if ih.has_v2() else None):
            if h in self.torrents:
                return self.torrents[h]
        return None

    def _resume_written(self, m: Managed, params) -> None:
        files = self._resume_pending.pop(m.entry.id, None)
        self._resume_done.set()
        if files is None or m.removed or m.recheck_requested:
            # Asked for by libtorrent itself, removed since, or claiming a piece a scrub found bad.
            return
        # Encoded now: an alert's contents are only valid until the next pop_alerts().
        self._spawn(self._write_resume(m, lt.write_resume_data_buf(params), files))

    async def _write_resume(self, m: Managed, resume: bytes, files: list) -> None:
        def write() -> bool:
            # Decided in the I/O thread, which runs remove() and drop_resume() in order: this task may have
            # been spawned before the torrent was removed or taken out of service, and must not bring the
            # file back after them.
            if m.removed or m.recheck_requested:
                return False
            self.state.save_resume(m.entry.id, resume, files)
            return True

        try:
            if not await self._in_io(write):
                return
        except Exception as e:
            self.counters["resume_failures"] += 1
            log.error("writing resume data of %s: %s", m.entry.id, e)
            return
        m.resume_saved = time.time()
        self.event("resume_saved", logging.DEBUG, id=m.entry.id)

    def _metadata_received(self, m: Managed) -> None:
        """A magnet's metadata: refuse paths that escape --data before a byte is written."""
        info = m.handle.torrent_file().info_section()
        data = lt.bencode({b"info": lt.bdecode(info)})
        try:
            check_info_paths(lt.bdecode(info), m.entry.id)
            torrent = parse_torrent(data, m.entry.id)
            self.paths.payload(torrent, m.entry.save_path)
        except InputError as e:
            self.event("torrent_error", logging.ERROR, id=m.entry.id, message=f"refused metadata: {e.problem}")
            del self.torrents[m.entry.id]
            m.removed = True
            self.ses.remove_torrent(m.handle)
            self._spawn(self._in_io(self.state.remove, m.entry.id))
            return
        m.torrent = torrent
        m.entry.name = torrent.name
        # On the one I/O thread, in order: fsyncs must not stall the event loop (and the API).
        self._spawn(self._in_io(self.state.save_torrent, m.entry.id, data))
        self._spawn(self._in_io(self.state.save_entry, m.entry))
        m.handle.unset_flags(lt.torrent_flags.upload_mode)
        self.event("metadata", id=m.entry.id, name=torrent.name)

    # ---- reports

    def health(self) -> dict:
        states = Counter(m.state for m in self.torrents.values())
        return {"ok": True, "uptime": round(time.time() - self.started, 3), "torrents": len(self.torrents),
                "states": dict(states), "listen_port": self.ses.listen_port(), "previous_shutdown":
                self.previous_shutdown, "version": __version__}
