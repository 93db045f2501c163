"""Tensor-level access to checkpoint files without loading them: where each tensor's bytes lie in a
.safetensors file or a torch.save zip (real file or split parts), and a streaming safetensors writer.

Nothing here unpickles with torch: a .pth's data.pkl goes through a restricted unpickler that knows
only what torch.save of a state dict writes, and builds byte ranges instead of tensors.
"""
from __future__ import annotations

import collections
import ctypes
import io
import json
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import blake3
import torch

from verify.splits import SplitReader, open_logical, split_parts
from verify.structure import ITEMSIZE, safetensors_header
from weightswarm.atomic import atomic_open
from weightswarm.errors import FormatError

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
}
TORCH_TO_CODE: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# The floating dtypes users name on the command line (--dtype) and in config.json, as codes.
FLOAT_NAMES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
BIG = 1 << 20  # tensors above this are hashed with blake3's threads


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's raw little-endian C-order bytes lie: a byte range of a (possibly split) file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path  # the logical file; may exist only as split parts (path-split0..N)
    offset: int  # absolute offset of the first byte in the logical file
    nbytes: int

    def read(self) -> bytearray:
        """Exactly nbytes (a bytearray, so tensor() can wrap it without a copy)."""
        return self._read(self.offset, self.nbytes)

    def read_rows(self, start: int, stop: int) -> bytearray:
        """Rows [start, stop) along dim 0, reading only those bytes."""
        if not self.shape or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"{self.name}: rows [{start}, {stop}) outside shape {list(self.shape)}")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return self._read(self.offset + start * row, (stop - start) * row)

    def tensor(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A fresh, writable CPU tensor of this ref (rows slices dim 0)."""
        shape = self.shape if rows is None else (rows[1] - rows[0], *self.shape[1:])
        data = self.read() if rows is None else self.read_rows(*rows)
        if not data:  # frombuffer refuses an empty buffer
            return torch.empty(shape, dtype=DTYPES[self.dtype])
        return torch.frombuffer(data, dtype=DTYPES[self.dtype]).reshape(shape)

    def mapped(self, maps: dict | None = None) -> torch.Tensor:
        """This tensor as a view of a private (copy-on-write) memory map of its file: nothing is read or
        copied until a page is touched, and those pages are the page cache's, shared with other readers.
        Split files (a tensor may cross parts) are read instead. Writes to it never reach the file.
        ``maps`` (path -> map) lets the tensors of one model share one map per file (one file descriptor
        each); two models must not share one, or a write to one would show in the other."""
        if not self.path.is_file():
            return self.tensor()
        dtype = DTYPES[self.dtype]
        if not self.nbytes:  # frombuffer refuses an empty range
            return torch.empty(self.shape, dtype=dtype)
        mm = _file_map(self.path, {} if maps is None else maps)
        if self.offset + self.nbytes > len(mm):  # a mapped page past the end would be SIGBUS, not an error
            raise FormatError(self.path, f"{self.name}: truncated: needs {self.nbytes} bytes at offset "
                                         f"{self.offset}, the file has {len(mm)}")
        # frombuffer holds a reference to mm, so the mapping lives as long as any tensor made from it.
        return torch.frombuffer(mm, dtype=dtype, count=self.nbytes // dtype.itemsize,
                                offset=self.offset).view(self.shape)

    def _read(self, offset: int, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        if self.path.is_file():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while got < n:  # pread returns at most ~2 GiB at a time on Linux
                    k = os.preadv(fd, [view[got:]], offset + got)
                    if not k:
                        break
                    got += k
            finally:
                os.close(fd)
        else:
            parts = split_parts(self.path)
            if not parts:
                raise FormatError(self.path, f"{self.name}: no such file (and no split parts)")
            with SplitReader(parts) as f:
                f.seek(offset)
                while got < n and (k := f.readinto(view[got:])):
                    got += k
        if got < n:
            raise FormatError(self.path, f"{self.name}: truncated: needs {n} bytes at offset {offset}, "
                                         f"got {got}")
        return buf


def _file_map(path: Path, maps: dict) -> mmap.mmap:
    mm = maps.get(path)
    if mm is None:
        if not path.stat().st_size:
            raise FormatError(path, "empty file")
        with open(path, "rb") as f:
            mm = maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return mm


def safetensors_refs(path: str | os.PathLike) -> dict[str, TensorRef]:
    """Every tensor of a .safetensors file (or its split parts), header checked like verify does."""
    path = Path(path)
    entries, start = safetensors_header(path)
    return {name: TensorRef(name, dtype, shape, path, start + begin, end - begin)
            for name, (dtype, shape, begin, end) in entries.items()}


# --- torch.save zips -----------------------------------------------------------------------------

# The legacy typed storage classes torch.save names in a tensor's persistent id.
_STORAGES = {"BFloat16Storage": "BF16", "HalfStorage": "F16", "FloatStorage": "F32", "DoubleStorage": "F64",
             "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
             "ByteStorage": "U8", "BoolStorage": "BOOL"}
# dtypes pickled as globals ("torch uint16") beside an UntypedStorage by _rebuild_tensor_v3.
_DTYPE_NAMES = {str(d).removeprefix("torch."): code for d, code in TORCH_TO_CODE.items()}


# Inert stand-ins the unpickler builds instead of storages and tensors. Tuples: a pickle's BUILD opcode
# cannot rewrite them after they were checked (a slots dataclass would let it, through __setstate__).
class _StorageType(NamedTuple):
    code: str | None  # None: untyped (bytes), the dtype comes with the tensor


class _Dtype(NamedTuple):
    code: str


class _Storage(NamedTuple):
    key: str
    code: str | None
    numel: int  # elements of code, or bytes when untyped


class _TensorMeta(NamedTuple):
    storage: _Storage
    code: str
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(v, n: int | None = None) -> bool:
    return (isinstance(v, tuple) and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))


class _Unpickler(pickle.Unpickler):
    """Knows only the globals a torch.save'd state dict uses; each maps to an inert stand-in."""

    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def refuse(self, what: str) -> FormatError:
        return FormatError(self.path, f"unsafe pickle refused: {what}")

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # the empty backward_hooks argument
        if module == "torch._utils":
            allowed = {"_rebuild_tensor": self._rebuild_v1, "_rebuild_tensor_v2": self._rebuild_v2,
                       "_rebuild_tensor_v3": self._rebuild_v3, "_rebuild_parameter": self._rebuild_parameter}
            if name in allowed:
                return allowed[name]
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch" and name in _DTYPE_NAMES:
            return _Dtype(_DTYPE_NAMES[name])
        raise self.refuse(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _ints(pid[4:])):
            raise self.refuse(f"persistent id {pid!r}")
        return _Storage(pid[2], pid[1].code, pid[4])

    def _tensor(self, storage, offset, size, stride, code: str | None) -> _TensorMeta:
        if not isinstance(storage, _Storage) or not _ints((offset,)) or not _ints(size) or not _ints(stride, len(size)):
            raise self.refuse("a tensor rebuilt from unexpected arguments")
        if code is None:
            raise self.refuse("an untyped storage without a dtype")
        return _TensorMeta(storage, code, offset, size, stride)

    def _rebuild_v1(self, storage, offset, size, stride):
        return self._tensor(storage, offset, size, stride, getattr(storage, "code", None))

    def _rebuild_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        return self._tensor(storage, offset, size, stride, getattr(storage, "code", None))

    def _rebuild_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        if not isinstance(dtype, _Dtype) or getattr(storage, "code", "") is not None:
            raise self.refuse("_rebuild_tensor_v3 without an untyped storage and a dtype")
        return self._tensor(storage, offset, size, stride, dtype.code)

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None):
        if not isinstance(data, _TensorMeta):
            raise self.refuse("a parameter that is not a tensor")
        return data


def torch_zip_refs(path: str | os.PathLike) -> dict[str, TensorRef]:
    """Every tensor of a torch.save zip (.pth/.pt, real file or split parts), without unpickling
    with torch and without reading tensor data. Raises FormatError naming the tensor."""
    path = Path(path)
    with open_logical(path.parent, path.name) as f:
        try:
            zf = zipfile.ZipFile(f)
            members = {m.filename: m for m in zf.infolist()}
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise FormatError(path, f"not a valid zip archive (torch.save format): {e}") from None
        pkls = [n for n in members if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise FormatError(path, f"expected one <archive>/data.pkl member, found {len(pkls)}")
        prefix = pkls[0].removesuffix("data.pkl")  # "consolidated.00/", "archive/", ...
        order = members.get(prefix + "byteorder")
        if order is not None and _member_bytes(path, zf, order) != b"little":
            raise FormatError(path, "tensors are stored big-endian; only little-endian checkpoints are supported")
        obj = _unpickle(path, _member_bytes(path, zf, members[pkls[0]]))
        if not isinstance(obj, dict):
            raise FormatError(path, f"top-level object is a {type(obj).__name__}, expected a dict of tensors")
        starts: dict[str, int] = {}
        refs = {}
        for name, meta in obj.items():
            if not isinstance(name, str) or not isinstance(meta, _TensorMeta):
                raise FormatError(path, f"{name!r}: expected a str key and a tensor, got {type(meta).__name__}")
            refs[name] = _zip_ref(path, f, members, prefix, name, meta, starts)
    return refs


def _member_bytes(path: Path, zf: zipfile.ZipFile, m: zipfile.ZipInfo) -> bytes:
    if m.file_size > 64 << 20:  # data.pkl of the 8x7B is ~100 kB; refuse to buffer a giant
        raise FormatError(path, f"member {m.filename} is {m.file_size} bytes, too big to be metadata")
    try:
        return zf.read(m)  # checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise FormatError(path, f"member {m.filename}: {e}") from None


def _unpickle(path: Path, data: bytes):
    try:
        return _Unpickler(io.BytesIO(data), path).load()
    except FormatError:
        raise
    except Exception as e:  # whatever a malformed pickle raises is bad input, one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise FormatError(path, f"data.pkl is not a valid pickle: {type(e).__name__}: {first}") from None


def _zip_ref(path: Path, f, members: dict[str, zipfile.ZipInfo], prefix: str, name: str,
             meta: _TensorMeta, starts: dict[str, int]) -> TensorRef:
    st = meta.storage
    m = members.get(f"{prefix}data/{st.key}")
    if m is None:
        raise FormatError(path, f"{name}: storage {st.key!r} has no member {prefix}data/{st.key}")
    item = ITEMSIZE[meta.code]
    storage_bytes = st.numel * (ITEMSIZE[st.code] if st.code else 1)
    if m.file_size != storage_bytes:
        raise FormatError(path, f"{name}: member {m.filename} holds {m.file_size} bytes, "
                                f"the pickle says {storage_bytes}")
    if m.compress_type != zipfile.ZIP_STORED or m.flag_bits & 1:
        raise FormatError(path, f"{name}: member {m.filename} is compressed or encrypted; "
                                "torch.save stores tensor data as is")
    expected, acc = [], 1
    for d in reversed(meta.shape):  # C-order strides; a dim of size 1 may carry any stride
        expected.insert(0, acc)
        acc *= d
    if any(s != e for s, e, d in zip(meta.stride, expected, meta.shape) if d > 1):
        raise FormatError(path, f"{name}: not contiguous (shape {list(meta.shape)}, stride {list(meta.stride)})")
    numel = acc
    if (meta.offset + numel) * item > storage_bytes:
        raise FormatError(path, f"{name}: {meta.code} {list(meta.shape)} at element {meta.offset} "
                                f"runs past its {storage_bytes}-byte storage")
    if m.filename not in starts:
        starts[m.filename] = _data_start(path, f, m)
    return TensorRef(name, meta.code, meta.shape, path, starts[m.filename] + meta.offset * item, numel * item)


def _data_start(path: Path, f, m: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes begin: after its LOCAL header, whose extra field (torch pads
    it to align data to 64 bytes) differs from the central directory's."""
    f.seek(m.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise FormatError(path, f"member {m.filename}: bad local header at byte {m.header_offset}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if f.read(name_len) != m.filename.encode():
        raise FormatError(path, f"member {m.filename}: local header names another file")
    return m.header_offset + 30 + name_len + extra_len


# --- writing -------------------------------------------------------------------------------------

def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian C-order bytes as a read-only-by-convention memoryview, without a copy
    for a contiguous CPU tensor (and without numpy). The view keeps the tensor alive."""
    t = t.detach().cpu().contiguous()
    n = t.numel() * t.element_size()
    if not n:
        return memoryview(b"")
    arr = (ctypes.c_char * n).from_address(t.data_ptr())
    arr.keep = t  # the memoryview holds arr, arr holds the tensor: no dangling pointer
    return memoryview(arr).cast("B")


def write_safetensors(dest: str | os.PathLike, plan: list[tuple[str, str, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Stream `tensors` (in plan order: name, dtype code, shape) into a .safetensors at dest, atomically.

    Deterministic bytes: header keys in plan order (__metadata__ first), compact JSON padded with spaces
    to 8 bytes. Returns {"size", "blake3" (of the file), "tensors": {name: blake3 of its raw bytes}}.
    Holds one tensor at a time. ValueError if a tensor disagrees with the plan.
    """
    if metadata and len(metadata) > 1:  # safetensors itself writes several keys in hash order
        raise ValueError("at most one __metadata__ key, so the header is deterministic")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, code, shape in plan:
        if name in header or name == "__metadata__":
            raise ValueError(f"{name}: appears twice in the plan")
        if code not in DTYPES:
            raise ValueError(f"{name}: unknown dtype code {code!r}")
        n = ITEMSIZE[code]
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hashes: dict[str, str] = {}
    size = 8 + len(raw) + pos
    it = iter(tensors)
    with atomic_open(dest) as f:
        head = struct.pack("<Q", len(raw)) + raw
        f.write(head)
        whole.update(head)
        for name, code, shape in plan:
            t = next(it, None)
            if t is None:
                raise ValueError(f"{name}: the tensors ran out before the plan did")
            if t.dtype != DTYPES[code] or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {TORCH_TO_CODE.get(t.dtype, t.dtype)} {list(t.shape)}, "
                                 f"the plan says {code} {list(shape)}")
            view = raw_bytes(t)
            h = blake3.blake3(max_threads=blake3.blake3.AUTO if view.nbytes > BIG else 1)
            h.update(view)
            whole.update(view)
            f.write(view)
            hashes[name] = h.hexdigest()
            del view, t  # drop this tensor before the iterator makes the next one
        if next(it, None) is not None:
            raise ValueError(f"{dest}: more tensors than the plan's {len(plan)}")
    return {"size": size, "blake3": whole.hexdigest(), "tensors": hashes}
