"""How the daemon reacts to libtorrent's alerts: state changes, checks, resume data, hash failures, metadata.

A mixin of ``distrib.daemon.Daemon``: every method runs on its event loop, woken through ``set_alert_fd``.
"""
from __future__ import annotations

import logging
import time

import libtorrent as lt

from weightswarm.core.errors import InputError
from weightswarm.distrib.daemon.torrents import Managed
from weightswarm.distrib.torrentfile import check_info_paths, parse_torrent

log = logging.getLogger("weightswarm.daemon")


class AlertHandling:
    """Alert handlers of the Daemon (which provides ses, torrents, state, paths, counters, event, ...)."""

    def _on_alert_fd(self) -> None:
        try:
            while self._alert_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        for a in self.ses.pop_alerts():
            try:
                self._on_alert(a)
            except Exception:  # one bad alert must not take the daemon down
                log.exception("handling %s", type(a).__name__)

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
        try:
            await self._in_io(self.state.save_resume, m.entry.id, resume, files)
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
