"""Files that Hugging Face mirrors split into ``name-split0`` ... ``name-splitN``, read as one file.

Users rebuilt these with ``cat`` in numeric order, so ``split10`` comes after ``split9`` (not after
``split1`` as a plain sort would put it), and a missing number means the file cannot be rebuilt.
"""
from __future__ import annotations

import bisect
import io
import itertools
import os
import re
from pathlib import Path
from typing import BinaryIO

from weightswarm.core.errors import FormatError, InputError
from weightswarm.core.inputs import open_regular

_PART = re.compile(r"^(?P<base>.+)-split(?P<n>[0-9]+)$")


def split_base(name: str) -> str | None:
    """``"x.pth"`` for a part name like ``"x.pth-split3"``, else None."""
    m = _PART.match(name)
    return m["base"] if m else None


def split_parts(path: str | os.PathLike) -> list[Path]:
    """The parts ``path-split0..N`` of one logical file in numeric order ([] if there are none).

    Raises FormatError for a gap or a doubled number in this group; other groups beside it do not matter.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    names = [e.name for e in sorted(path.parent.iterdir()) if _PART.match(e.name) and e.is_file()]
    return [path.parent / n for n in part_names(path, names)]


def part_names(path: Path, names: list[str]) -> list[str]:
    """Of the file names in path's folder, the parts of path in numeric order (FormatError for a gap)."""
    parts: dict[int, str] = {}
    for name in sorted(names):
        m = _PART.match(name)
        if not m or m["base"] != path.name:
            continue
        n = int(m["n"])
        if n in parts:  # e.g. "-split1" and "-split01"
            raise FormatError(path.parent / name, f"split part number {n} also used by {parts[n]}")
        parts[n] = name
    for i in range(len(parts)):
        if i not in parts:
            raise FormatError(path, f"missing split part {path.name}-split{i}")
    return [parts[i] for i in range(len(parts))]


class SplitReader(io.RawIOBase):
    """The concatenation of parts as one read-only, seekable raw file (for zipfile, torch.load)."""

    def __init__(self, parts: list[str | os.PathLike]):
        super().__init__()
        if not parts:
            raise InputError("<split>", "no split parts given")
        self.parts = [Path(p) for p in parts]
        # Sizes are taken once: a part that changes size while open is reported on read.
        sizes = [p.stat().st_size for p in self.parts]
        self._ends = list(itertools.accumulate(sizes))
        self._starts = [end - n for end, n in zip(self._ends, sizes, strict=True)]
        self.size = self._ends[-1]
        self._pos = 0
        self._index = -1
        self._fh: BinaryIO | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b) -> int:
        """Reads from the one part that holds the current position; callers loop for more."""
        self._checkClosed()
        if self._pos >= self.size or not len(b):
            return 0
        # The last part starting at or before pos; empty parts are skipped because they share a start.
        i = bisect.bisect_right(self._starts, self._pos) - 1
        if i != self._index:
            if self._fh:
                self._fh.close()
            self._fh, self._index = open_regular(self.parts[i]), i
        self._fh.seek(self._pos - self._starts[i])
        want = min(len(b), self._ends[i] - self._pos)
        n = self._fh.readinto(memoryview(b)[:want])
        if not n:
            raise OSError(f"{self.parts[i]}: shorter than when it was opened")
        self._pos += n
        return n

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        super().close()


def open_logical(root: str | os.PathLike, relname: str) -> BinaryIO:
    """A binary file object for root/relname: the real file if present, else its split parts joined.

    Raises InputError if neither exists, FormatError if the parts have a gap.
    """
    path = Path(root) / relname
    if path.is_file():
        return open_regular(path)
    parts = split_parts(path)
    if not parts:
        raise InputError(path, "no such file (and no split parts)")
    return io.BufferedReader(SplitReader(parts))
