"""Ctrl-C and SIGTERM: raised as Stop in the main thread, and seen by worker threads through an event.

Hashing threads poll ``check()`` between chunks, so an interrupted verify of 93 GB ends at once
instead of after the last file is hashed.
"""
from __future__ import annotations

import signal
import threading

_STOPPING = threading.Event()


class Stop(Exception):
    """The user asked us to stop (SIGINT/SIGTERM): loops save their state and leave cleanly."""


def install_stop_signals() -> None:
    def handler(signum, frame):
        _STOPPING.set()
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def check() -> None:
    """In worker threads: raise Stop once a stop was requested."""
    if _STOPPING.is_set():
        raise Stop("stopping")
