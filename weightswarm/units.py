"""Byte counts and limits as users type them (``16k``, ``8m``, ``1g``), checked in one place."""
from __future__ import annotations

from weightswarm.errors import InputError

BYTES_SUFFIX = {"k": 1024, "m": 1024**2, "g": 1024**3}
# libtorrent keeps rates and connection counts in C ints: a bigger value raises or silently wraps.
MAX_LIMIT = 2**31 - 1


def parse_bytes(text: str) -> int:
    """``4096``, ``16k``, ``8m``, ``1g`` (binary units); never negative."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        n = int(float(t[:-1]) * BYTES_SUFFIX[t[-1]]) if t and t[-1] in BYTES_SUFFIX else int(t)
    except (ValueError, OverflowError):
        raise InputError(text, "not a byte count (e.g. 65536, 16k, 8m, 1g)") from None
    if n < 0:
        raise InputError(text, "must not be negative")
    return n


def check_limit(name: str, value: int) -> int:
    """A rate (bytes/s) or connection limit libtorrent can hold; 0 means none."""
    if not 0 <= value <= MAX_LIMIT:
        raise InputError(name, f"{value} is out of range: 0 (no limit) to {MAX_LIMIT} (2 GiB/s for a rate)")
    return value


def parse_limit(name: str, text: str) -> int:
    return check_limit(name, parse_bytes(text))
