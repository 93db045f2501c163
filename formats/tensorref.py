"""Where one tensor's raw bytes lie: a byte range of a file (or of a file split into parts).

Readers build a TensorRef only after checking that its range lies inside the file, so reading one never
allocates more than the file holds.
"""
from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, replace
from pathlib import Path

from weightswarm.core.errors import FormatError
from weightswarm.core.inputs import open_regular
from weightswarm.formats.splitfile import SplitReader, split_parts

# Files whose tensors have byte ranges: torch.save zips (formats.torchzip) and safetensors (formats.safetensors).
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
MAX_DIMS = 64  # torch allows 64; more is an attack on the arithmetic (sizes are products of the dims)


@dataclass(frozen=True)
class TensorRef:
    """A tensor's raw little-endian C-order bytes: ``nbytes`` at ``offset`` of the logical file ``path``."""

    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    path: Path  # the logical file; may exist only as split parts (path-split0..N)
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    def rows(self, start: int, stop: int, name: str | None = None) -> TensorRef:
        """Rows [start, stop) along dim 0, as a ref of their own."""
        if not self.shape or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"{self.name}: rows [{start}, {stop}) outside shape {list(self.shape)}")
        return replace(self, name=name or self.name, shape=(stop - start, *self.shape[1:]),
                       offset=self.offset + start * self.row_bytes, nbytes=(stop - start) * self.row_bytes)

    def view(self):
        """The bytes without a copy: a read-only map of just this range of a real file (its pages come from
        the page cache), or read() for split parts. Unmapped once the last reference goes."""
        if not self.nbytes or not self.path.is_file():
            return self.read()
        with open_regular(self.path) as f:
            if os.fstat(f.fileno()).st_size < self.offset + self.nbytes:
                raise FormatError(self.path, f"{self.name}: truncated: needs {self.nbytes} bytes at offset "
                                             f"{self.offset}, the file is shorter")
            start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
            m = mmap.mmap(f.fileno(), self.offset + self.nbytes - start, access=mmap.ACCESS_READ, offset=start)
        return memoryview(m)[self.offset - start:]

    def copy_into(self, fd: int, at: int) -> None:
        """Write the bytes at offset ``at`` of fd: in the kernel (copy_file_range, no pass through user
        memory) where the filesystems allow, else from view()."""
        if self.path.is_file():
            with open_regular(self.path) as f:
                if os.fstat(f.fileno()).st_size < self.offset + self.nbytes:
                    raise FormatError(self.path, f"{self.name}: truncated: needs {self.nbytes} bytes at offset "
                                                 f"{self.offset}, the file is shorter")
                done = 0
                try:
                    while done < self.nbytes:
                        k = os.copy_file_range(f.fileno(), fd, self.nbytes - done, self.offset + done, at + done)
                        if not k:
                            raise FormatError(self.path, f"{self.name}: the file shrank while being read")
                        done += k
                    return
                except OSError as e:
                    if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
        view = memoryview(self.view()).cast("B")
        while view:
            k = os.pwrite(fd, view, at)
            view, at = view[k:], at + k

    def read(self) -> bytearray:
        """Exactly nbytes (a bytearray, so a tensor can wrap it without a copy)."""
        buf = bytearray(self.nbytes)
        view = memoryview(buf)
        got = 0
        if self.path.is_file():
            with open_regular(self.path) as f:
                fd = f.fileno()
                while got < self.nbytes:  # pread returns at most ~2 GiB at a time on Linux
                    k = os.preadv(fd, [view[got:]], self.offset + got)
                    if not k:
                        break
                    got += k
        else:
            parts = split_parts(self.path)
            if not parts:
                raise FormatError(self.path, f"{self.name}: no such file (and no split parts)")
            with SplitReader(parts) as f:
                f.seek(self.offset)
                while got < self.nbytes and (k := f.readinto(view[got:])):
                    got += k
        if got < self.nbytes:
            raise FormatError(self.path, f"{self.name}: truncated: needs {self.nbytes} bytes at offset "
                                         f"{self.offset}, got {got}")
        return buf


@dataclass(frozen=True)
class Extent:
    """The bytes [lo, hi) of the logical file ``path`` that hold a tensor, known before they are there: all
    a partial download must have to read it. ``member`` names the torch zip member whose local header opens
    the extent (the tensor then lies ``skip`` bytes into the member's data); None when the tensor is
    exactly [lo, hi) (safetensors)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    lo: int
    hi: int
    member: str | None = None
    skip: int = 0
