"""A foreground seeder for one torrent: check (or trust) the data, then serve it until stopped."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from weightswarm.core.errors import InputError, VerificationError
from weightswarm.core.interrupt import Stop
from weightswarm.distrib.session import Event, RequestQueue, SessionOptions, make_session, raise_on_error
from weightswarm.distrib.torrentfile import Torrent


@dataclass(frozen=True)
class SeedOptions:
    session: SessionOptions = field(default_factory=SessionOptions)
    assume_verified: bool = False
    report_every: float = 1.0


def _params(torrent: Torrent, path: Path, assume_verified: bool) -> lt.add_torrent_params:
    """PATH is the torrent's top folder (or its single file), whatever it is called on this disk."""
    if not path.exists():
        raise InputError(path, "no such file or folder")
    ti = lt.torrent_info(torrent.info)
    if path.name != torrent.name:
        fs = ti.layout()
        for i in range(fs.num_files()):
            rel = fs.file_path(i).split(os.sep, 1)
            ti.rename_file(i, path.name if len(rel) == 1 else os.path.join(path.name, rel[1]))
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(path.resolve().parent)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    # A seeder never downloads: missing pieces are an error, not something to fetch into the user's folder.
    atp.flags |= lt.torrent_flags.upload_mode
    if assume_verified:
        # Pieces are then hashed lazily, the first time each one is uploaded.
        atp.flags |= lt.torrent_flags.seed_mode
    return atp


def seed(torrent: Torrent, path: str | os.PathLike, opts: SeedOptions, emit: Event) -> None:
    """Serve until SIGINT/SIGTERM; VerificationError if the data does not match the torrent."""
    path = Path(path)
    atp = _params(torrent, path, opts.assume_verified)
    ses = make_session(opts.session)
    h = ses.add_torrent(atp)
    emit({"event": "listening", "port": ses.listen_port(), "info_hash": torrent.info_hash, "name": torrent.name})
    try:
        _wait_checked(ses, h, torrent, path, emit)
        queue = RequestQueue(ses, opts.session)
        queue.update()  # before anyone is told we are ready: the first peer may be the only one
        emit({"event": "ready", "info_hash": torrent.info_hash})
        last = 0.0
        while True:
            ses.wait_for_alert(250)
            for a in ses.pop_alerts():
                raise_on_error(a, path)
            queue.update()
            if time.monotonic() - last >= opts.report_every:
                last = time.monotonic()
                st = h.status()
                peers = [f"{p.ip[0]}:{p.ip[1]}" for p in h.get_peer_info()]
                emit({"event": "status", "peers": len(peers), "peer_list": peers[:10],
                      "upload_rate": st.upload_payload_rate, "uploaded": st.all_time_upload})
    except Stop:
        emit({"event": "stopped", "uploaded": h.status().all_time_upload})
    finally:
        ses.pause()


def _wait_checked(ses: lt.session, h: lt.torrent_handle, torrent: Torrent, path: Path, emit: Event) -> None:
    last, checked = 0.0, False
    while not checked:
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            raise_on_error(a, path)
            checked |= isinstance(a, lt.torrent_checked_alert)
        if time.monotonic() - last >= 0.5 and not checked:
            last = time.monotonic()
            emit({"event": "checking", "progress": round(h.status().progress, 4)})
    st = h.status()
    if not st.is_seeding:
        total = torrent.info.num_pieces()
        raise VerificationError(path, f"data does not match the torrent: {total - st.num_pieces} of {total} "
                                "pieces missing or wrong", hint="`weightswarm verify PATH --torrent T` names them")
