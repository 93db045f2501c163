"""What every benchmark script shares (run them as `python bench/NAME.py`; this module sits beside them)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def warm(folder: Path) -> int:
    """Read every file of folder once, so timings measure hashing, not the disk; returns the bytes read."""
    total = 0
    for p in sorted(folder.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total


def machine() -> str:
    return (f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python "
            f"{platform.python_version()}, load average at start {os.getloadavg()[0]:.2f}")
