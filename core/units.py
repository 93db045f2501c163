"""Byte counts, rates and durations as users type them and as we show them, in one place.

Sizes are binary (IEC) everywhere: ``16k`` is 16 KiB, ``8m`` is 8 MiB, and output says KiB, MiB, GiB.
"""
from __future__ import annotations

import math

from weightswarm.core.errors import OptionError

BYTES_SUFFIX = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_IEC = ("B", "KiB", "MiB", "GiB", "TiB")
# libtorrent keeps rates and connection counts in C ints: a bigger value raises or silently wraps.
MAX_LIMIT = 2**31 - 1
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_bytes(text: str, option: str = "size") -> int:
    """``4096``, ``16k``, ``8m``, ``1g``, ``2GiB`` (binary units); never negative."""
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        n = float(t[:-1]) * BYTES_SUFFIX[t[-1]] if t and t[-1] in BYTES_SUFFIX else float(t)
        if not math.isfinite(n) or n != int(n):
            raise ValueError
        n = int(n)
    except (ValueError, OverflowError):
        raise OptionError(option, text, "not a byte count (e.g. 65536, 16k, 8m, 1g)") from None
    if n < 0:
        raise OptionError(option, text, "must not be negative")
    return n


def check_limit(option: str, value: int) -> int:
    """A rate (bytes/s) or connection limit libtorrent can hold; 0 means none."""
    if not 0 <= value <= MAX_LIMIT:
        raise OptionError(option, value, f"out of range: 0 (no limit) to {MAX_LIMIT} (2 GiB/s for a rate)")
    return value


def parse_limit(option: str, text: str) -> int:
    return check_limit(option, parse_bytes(text, option))


def parse_duration(text: str, option: str = "duration") -> float:
    """``90`` (seconds), ``30s``, ``10m``, ``2h``, ``7d``; finite and never negative."""
    t = str(text).strip().lower()
    scale = SECONDS.get(t[-1:])
    try:
        n = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise OptionError(option, text, "not a duration (e.g. 90, 30s, 10m, 2h, 7d)") from None
    if not 0 <= n < math.inf:
        raise OptionError(option, text, "must be a finite, non-negative duration")
    return n


def human(n: float) -> str:
    """A byte count for people: ``512 B``, ``26.3 MiB``."""
    for unit in _IEC[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {_IEC[-1]}"


def size_text(n: int) -> str:
    """A byte count as an option takes it: ``64MiB`` when exact, else the plain number."""
    for unit, scale in reversed(list(zip(_IEC[1:], BYTES_SUFFIX.values(), strict=True))):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def duration_text(seconds: float) -> str:
    """A duration as an option takes it: ``7d``, ``5m``, ``90s``; ``0`` stays ``0``."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % SECONDS[unit] == 0:
            return f"{int(seconds // SECONDS[unit])}{unit}"
    return f"{seconds:g}s" if seconds else "0"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 peer``, ``2 peers``, ``1 bad piece``."""
    return f"{n} {word if n == 1 else many or word + 's'}"
