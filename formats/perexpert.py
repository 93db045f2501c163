"""The per-expert layout's file names (FORMAT.md), and which of its files a node serving some experts needs.

One place for the naming: the converter writes these names, the loader and ``fetch --experts`` read them.
"""
from __future__ import annotations

import re

from weightswarm.core.errors import OptionError

GRANULARITIES = ("expert", "layer-expert")
DENSE = "dense.safetensors"
MANIFEST = "manifest.json"
# What every node needs besides its experts' files.
SHARED = (DENSE, "params.json", "tokenizer.model", MANIFEST)
_EXPERT_TENSOR = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.w[123]\.weight$")
_EXPERT_FILE = re.compile(r"^experts/(?:layer-(\d{2,})/)?expert-(\d{2,})\.safetensors$")


def expert_of_tensor(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a canonical expert weight's name, None for a dense tensor."""
    m = _EXPERT_TENSOR.match(name)
    return (int(m[1]), int(m[2])) if m else None


def output_file(name: str, granularity: str = "expert") -> str:
    """The file of the per-expert layout a canonical tensor goes to."""
    le = expert_of_tensor(name)
    if le is None:
        return DENSE
    layer, expert = le
    if granularity == "layer-expert":
        return f"experts/layer-{layer:02d}/expert-{expert:02d}.safetensors"
    return f"experts/expert-{expert:02d}.safetensors"


def expert_of_file(path: str) -> int | None:
    """The expert whose weights a per-expert layout's file holds, None for any other file."""
    m = _EXPERT_FILE.match(path)
    return int(m[2]) if m else None


def parse_experts(text: str, option: str = "--experts") -> tuple[int, ...]:
    """``0,3`` or ``0-3,6`` -> sorted expert numbers; malformed lists and repeats are refused."""
    out: set[int] = set()
    for item in str(text).split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", item)
        if not m:
            raise OptionError(option, text, f"{item!r:.20} is not an expert number or range",
                              hint="give expert numbers from 0, e.g. 0,3 or 0-3")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise OptionError(option, text, f"range {item} runs backwards")
        for e in range(lo, hi + 1):
            if e in out:
                raise OptionError(option, text, f"expert {e} is listed twice")
            out.add(e)
    return tuple(sorted(out))


def check_experts(experts: tuple[int, ...], available: list[int], option: str = "--experts") -> None:
    """Every chosen expert exists among the available ones."""
    missing = [e for e in experts if e not in available]
    if missing:
        have = _ranges(available) if available else "none"
        raise OptionError(option, ",".join(map(str, experts)), f"no expert {missing[0]} here: the valid experts "
                          f"are {have}")


def select_files(paths: list[str], experts: tuple[int, ...]) -> list[str]:
    """Of a per-expert layout's files, those a node serving ``experts`` needs (the shared ones and theirs)."""
    return [p for p in paths if p in SHARED or expert_of_file(p) in experts]


def _ranges(ids: list[int]) -> str:
    ids = sorted(set(ids))
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))
