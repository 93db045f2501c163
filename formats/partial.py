"""A release folder only partly on disk (a download in progress), read only where it is there.

A partial download knows every file's size from its torrent and which byte ranges have arrived and passed
their piece hashes. Readers given a Partial read only those ranges: a read that touches any other byte
raises Absent naming the ranges it needs, so the caller can fetch them and try again. Sizes come from the
Partial, never from the disk, where a file not begun yet may be missing or short.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from weightswarm.core.errors import FormatError
from weightswarm.core.inputs import open_regular
from weightswarm.formats.splitfile import part_names

Range = tuple[str, int, int]  # a file's path relative to the root (posix), and bytes [lo, hi) of it


class Absent(Exception):
    """The bytes a reader needs are not on disk yet: fetch ``ranges`` and read again. Not a fault of the input."""

    def __init__(self, ranges: list[Range]):
        super().__init__(", ".join(f"{rel}[{lo}:{hi}]" for rel, lo, hi in ranges))
        self.ranges = ranges


@dataclass(frozen=True)
class Partial:
    root: Path
    sizes: Mapping[str, int]  # every file of the release, by relative path
    present: Callable[[str, int, int], bool]  # are bytes [lo, hi) of this file there and verified?

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def is_file(self, path: Path) -> bool:
        return self.rel(path) in self.sizes

    def parts(self, path: Path) -> list[tuple[str, int]]:
        """The logical file ``path`` as (relative path, size) pieces: itself, or its split parts; [] if neither."""
        rel = self.rel(path)
        if rel in self.sizes:
            return [(rel, self.sizes[rel])]
        folder = rel.rpartition("/")[0]
        names = [r.rpartition("/")[2] for r in self.sizes if r.rpartition("/")[0] == folder]
        return [(r, self.sizes[r]) for r in (f"{folder}/{n}".lstrip("/") for n in part_names(Path(path), names))]

    def size(self, path: Path) -> int:
        return sum(n for _, n in self.parts(path))

    def ranges(self, path: Path, lo: int, hi: int) -> list[Range]:
        """Bytes [lo, hi) of the logical file path, as ranges of the files that hold them."""
        out, start = [], 0
        for rel, n in self.parts(path):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                out.append((rel, a - start, b - start))
            start += n
        return out

    def need(self, path: Path, lo: int, hi: int) -> None:
        """Raise Absent unless bytes [lo, hi) of the logical file path are all there."""
        ranges = self.ranges(path, lo, hi)
        if not all(self.present(*r) for r in ranges):
            raise Absent(ranges)

    def open(self, path: Path) -> PartialFile:
        parts = self.parts(path)
        if not parts:
            raise FormatError(path, "no such file in the release (and no split parts)")
        return PartialFile(self, Path(path))


class PartialFile(io.RawIOBase):
    """A logical file of a Partial, read-only and seekable; a read of bytes not there raises Absent."""

    def __init__(self, partial: Partial, path: Path):
        super().__init__()
        self.partial, self.path = partial, path
        self.size = partial.size(path)
        self._pos = 0
        self._fds: dict[str, int] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        hi = min(self.size, self._pos + len(view))
        if hi <= self._pos:
            return 0
        self.partial.need(self.path, self._pos, hi)
        got = 0
        for rel, lo, end in self.partial.ranges(self.path, self._pos, hi):
            while lo < end:
                k = os.preadv(self._fd(rel), [view[got:got + end - lo]], lo)
                if not k:
                    raise OSError(f"{rel}: shorter than the torrent says")
                lo, got = lo + k, got + k
        self._pos += got
        return got

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            with open_regular(self.partial.root / rel) as f:
                self._fds[rel] = os.dup(f.fileno())
        return self._fds[rel]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        super().close()
