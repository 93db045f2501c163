"""libtorrent sessions configured for weightswarm, and the small helpers every command needs."""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import libtorrent as lt

from weightswarm import __version__
from weightswarm.core.errors import InputError, OptionError
from weightswarm.core.inputs import os_problem

Event = Callable[[dict], None]  # receives one JSON-able event dict of a running command

ALERTS = (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
          | lt.alert_category.file_progress | lt.alert_category.connect)


@dataclass(frozen=True)
class SessionOptions:
    listen: str = "0.0.0.0:6881"
    dht: bool = True
    upload_rate: int = 0  # bytes/s, 0 = unlimited
    download_rate: int = 0
    max_connections: int = 200
    distinct_pieces: bool = True  # serve and request so that an origin sends each piece about once (below)


# A capped origin with libtorrent's stock settings sent 1.4-1.8x the payload to a swarm, because fetchers
# booked pieces at it seconds ahead and pieces booked by two fetchers were sent twice. With these, on
# 100 Mbit/s links, it sends about 1.1x (BENCHMARKS.md, "The swarm at scale").
DISTINCT_PIECES = {
    # What a peer may have queued with us, in 16 KiB blocks (libtorrent: 2000, i.e. 31 MiB): with 128 KiB
    # booked per fetcher, two fetchers rarely book the same piece before one of them announces it. A session
    # serving a whole copy, usually the origin, allows less (RequestQueue below).
    "max_allowed_in_request_queue": 8,
    # How far ahead we request, in seconds of a peer's rate (libtorrent: 3).
    "request_queue_time": 1,
    # libtorrent books runs of up to 8 MiB of contiguous pieces at a fast peer; those runs are what two
    # fetchers then booked at the origin at once.
    "whole_pieces_threshold": 0,
    # Below 4 pieces libtorrent picks at random and finishes partial pieces first, from any peer: a fetcher
    # that began a piece from another fetcher then took the rest of it from the origin too.
    "initial_picker_threshold": 0,
}
# What a peer may queue with us while it is the only one connected. The queue above makes an uncapped
# one-to-one transfer wait on round trips (264 MB in 64 KiB pieces on loopback: 2.0-3.0 s with 16 blocks,
# 1.1-1.3 s with 32, 1.0-1.3 s with 64); a lone peer has nobody to book the same piece. libtorrent tells each
# peer the limit once, in its handshake, so the first peer of a swarm keeps it (past the current limit its
# requests are rejected).
LONE_PEER_QUEUE = 32
# What each peer of a swarm may queue with a session serving a whole copy, and how many it serves at once
# (libtorrent: 8). A fetcher that books fewer pieces ahead at the origin books fewer that another fetcher
# books too, while 16 peers x 4 blocks keep as much in flight on the origin's link as 8 x 8 did: 16
# fetchers took 1.07-1.08x the payload with 8 x 8 and 1.05x with 16 x 4 (BENCHMARKS.md). The queue is
# fixed because libtorrent tells it each peer in its handshake: shrinking it as a swarm grew left the
# peers that had come first with deeper queues and gained nothing (1.09x). Below 4 blocks, one 64 KiB
# piece, a fetcher would wait a round trip inside each piece.
SWARM_QUEUE = 4
SERVE_SLOTS = 16


class RequestQueue:
    """What peers may queue with a serving session: LONE_PEER_QUEUE alone, SWARM_QUEUE once more are connected.

    The limit reaches the peers that connect afterwards (libtorrent's handshake carries it as ``reqq``);
    requests past the current one are rejected and go back to the peer's picker. For the sessions that
    serve a whole copy: seed, the daemon, fetch once it seeds. No deeper queue for a lone peer under a
    session upload cap: the limiter sets the pace there, and the first peer's deeper queue only cost bytes
    (the demo's daemon, capped at 4 MiB/s for 3 nodes, sent 1.10-1.11x the payload with it, 1.07x without)."""

    def __init__(self, ses: lt.session, opts: SessionOptions):
        self.ses = ses
        self.size = 0
        self.lone = SWARM_QUEUE if opts.upload_rate else LONE_PEER_QUEUE
        # Stock settings keep libtorrent's own queue and slots; under a cap the queue is one size: nothing to count.
        self.counting = opts.distinct_pieces and self.lone != SWARM_QUEUE
        if opts.distinct_pieces:
            ses.apply_settings({"unchoke_slots_limit": SERVE_SLOTS})
            self._set(self.lone)

    def update(self) -> None:
        """Size the queue for the peers connected now, over all of the session's torrents."""
        if not self.counting:
            return
        peers = sum(h.status(0).num_peers for h in self.ses.get_torrents())
        self._set(self.lone if peers <= 1 else SWARM_QUEUE)

    def _set(self, size: int) -> None:
        if size != self.size:
            self.size = size
            self.ses.apply_settings({"max_allowed_in_request_queue": size})


def parse_endpoint(text: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OptionError(option, text, "not a valid address (expected HOST:PORT)")
    return host, int(port)


def make_session(opts: SessionOptions) -> lt.session:
    host, port = parse_endpoint(opts.listen)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    loopback_only = _is_loopback(host)
    settings = {
        "listen_interfaces": listen,
        "user_agent": f"weightswarm/{__version__}",
        "alert_mask": int(ALERTS),
        "enable_dht": opts.dht and not loopback_only,
        "enable_lsd": opts.dht and not loopback_only,
        # Port mapping talks to the LAN's router: never by surprise.
        "enable_upnp": False,
        "enable_natpmp": False,
        # Dialling uTP first made loopback and LAN transfers crawl (6-14 MB/s); incoming uTP is still served.
        "enable_outgoing_utp": False,
        "tick_interval": 100,
        # On exit, tell trackers we left (so they stop handing us out) but never hang on a dead one.
        "stop_tracker_timeout": 2,
        # Several of our own nodes on one host share an IP; needed for trackers on loopback.
        "allow_multiple_connections_per_ip": True,
        "upload_rate_limit": opts.upload_rate,
        "download_rate_limit": opts.download_rate,
        "connections_limit": opts.max_connections,
        "recv_socket_buffer_size": 4 * 1024 * 1024,
        "send_socket_buffer_size": 4 * 1024 * 1024,
    }
    if opts.distinct_pieces:
        settings |= DISTINCT_PIECES
    try:
        ses = lt.session(settings)
    except RuntimeError as e:
        raise InputError(opts.listen, f"cannot start a session: {e}") from None
    _check_listening(ses, opts.listen)
    if opts.upload_rate or opts.download_rate:
        _limit_local_peers(ses)
    return ses


def _check_listening(ses: lt.session, listen: str, deadline: float = 5.0) -> None:
    """A session that could not bind would run on, silently serving nobody: refuse it instead."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        ses.wait_for_alert(100)
        for a in ses.pop_alerts():
            if isinstance(a, lt.listen_succeeded_alert):
                return
            if isinstance(a, lt.listen_failed_alert):
                raise InputError(listen, f"cannot listen: {a.message()}")
    raise InputError(listen, "cannot listen: no socket was opened")


def raise_on_error(alert, path: str | os.PathLike) -> None:
    """Torrent and file errors end a command: the data or the disk needs a person (exit 2, naming the file)."""
    if isinstance(alert, lt.file_error_alert):
        e = alert.error
        system = e.category().name() in ("system", "generic")
        full = system and e.value() in (errno.ENOSPC, errno.EDQUOT)
        problem = os_problem(OSError(e.value(), e.message())) if system else e.message().lower()
        raise InputError(alert.filename() or path, f"cannot {lt_operation(alert)}: {problem}",
                         hint="free some space, then run the same command again: it continues" if full else None)
    if isinstance(alert, lt.torrent_error_alert):
        raise InputError(path, f"torrent error: {alert.error.message()}")


def lt_operation(alert) -> str:
    """'write', 'read', 'open' ... from a file_error_alert's message ('... (write) error: ...')."""
    m = re.search(r"\((\w+)\)", alert.message())
    return m[1] if m else "access the file"


def _limit_local_peers(ses: lt.session) -> None:
    """libtorrent exempts LAN and loopback peers from rate limits; a limit the user set applies to all."""
    f = lt.ip_filter()
    everyone = 1 << lt.session.global_peer_class_id
    f.add_rule("0.0.0.0", "255.255.255.255", everyone)
    f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", everyone)
    ses.set_peer_class_filter(f)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def add_peers(handle: lt.torrent_handle, peers: list[tuple[str, int]]) -> None:
    for host, port in peers:
        handle.connect_peer((host, port))


def state_dir(output: str | os.PathLike) -> str:
    return os.path.join(output, ".weightswarm")
