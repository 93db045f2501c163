"""torch.save zips (``.pth``/``.pt``, a real file or split parts) read without torch and without trust.

One reader and one set of rules for verify, convert, manifest and the runner. Nothing is unpickled with
torch: ``data.pkl`` goes through a restricted unpickler that knows only what ``torch.save`` of a state dict
writes and builds byte ranges, never objects. Every size the archive declares is checked against the file
before anything is allocated:

- reads of the archive's own metadata (end records, central directory, ``data.pkl``) are capped at
  ``MAX_METADATA`` bytes, and never past the end of the file;
- every member is stored as is (torch.save never compresses: a deflated member could be a zip bomb) and
  lies inside the file, and no two members overlap;
- a tensor lies inside its storage, and its storage is exactly its member.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, NamedTuple

from weightswarm.core.errors import FormatError, VerificationError, WeightswarmError
from weightswarm.core.hashing import CHUNK
from weightswarm.formats.dtypes import CODE_OF_NAME, ITEMSIZE, nbytes
from weightswarm.formats.partial import Partial
from weightswarm.formats.splitfile import open_logical
from weightswarm.formats.tensorref import MAX_DIMS, Extent, TensorRef

# data.pkl of Mixtral 8x7B is ~100 kB, of 8x22B ~200 kB; the central directories are of the same order.
MAX_METADATA = 16 << 20

# The legacy typed storage classes torch.save names in a tensor's persistent id.
_STORAGES = {"BFloat16Storage": "BF16", "HalfStorage": "F16", "FloatStorage": "F32", "DoubleStorage": "F64",
             "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
             "ByteStorage": "U8", "BoolStorage": "BOOL"}


class _Bounded:
    """A read-only view of a file of known size whose reads never ask for more than the file holds, nor
    more than MAX_METADATA at once: zipfile reads a central directory of whatever size the end record
    claims in one call, and a read allocates its whole size before it learns how much is there."""

    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        n = left if n is None or n < 0 else min(n, left)
        if n > MAX_METADATA:
            raise FormatError(self.path, f"the zip archive asks to read {n} bytes at once: more than its "
                                         "metadata can need")
        return self.f.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True


class Archive:
    """An opened torch zip: its members, checked against the file, and a reader for their bytes.

    The central directory alone bounds every member (from its local header to the next member's); where
    its bytes begin is read from its local header when asked (``data_start``), so a partial download can
    map its tensors before their bytes are there."""

    def __init__(self, path: Path, f: BinaryIO):
        self.path = path
        self.size = f.seek(0, io.SEEK_END)
        f.seek(0)
        self.f = _Bounded(f, self.size, path)
        try:
            self.zf = zipfile.ZipFile(self.f)
        except (zipfile.BadZipFile, EOFError, ValueError, OverflowError, struct.error) as e:
            raise FormatError(path, f"not a valid zip archive (torch.save format): {e}") from None
        self.members = {m.filename: m for m in self.zf.infolist()}
        self.bound: dict[str, int] = {}  # where the next member (or the central directory) begins
        self._start: dict[str, int] = {}
        ordered = sorted(self.members.values(), key=lambda m: m.header_offset)
        for i, m in enumerate(ordered):
            if m.compress_type != zipfile.ZIP_STORED or m.flag_bits & 1:
                raise FormatError(path, f"member {m.filename} is compressed or encrypted; torch.save stores "
                                        "every member as is")
            if not 0 <= m.header_offset < self.size:  # zipfile shifts offsets by where it found the directory
                raise FormatError(path, f"member {m.filename}: its local header would lie outside the file")
            nxt = ordered[i + 1].header_offset if i + 1 < len(ordered) else min(self.zf.start_dir, self.size)
            least = m.header_offset + 30 + len(m.filename.encode()) + m.compress_size
            if m.file_size != m.compress_size or least > self.size:
                raise FormatError(path, f"member {m.filename} declares {m.file_size} bytes at byte "
                                        f"{m.header_offset}, past the end of the {self.size}-byte file")
            if least > nxt:
                other = ordered[i + 1].filename if i + 1 < len(ordered) else "the central directory"
                raise FormatError(path, f"member {m.filename} overlaps {other} after it")
            self.bound[m.filename] = nxt

    def span(self, m: zipfile.ZipInfo) -> tuple[int, int]:
        """The bytes that hold member m: its local header, name, padding and data."""
        return m.header_offset, self.bound[m.filename]

    def data_start(self, m: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its LOCAL header, whose extra field (torch pads it
        to align data to 64 bytes) differs from the central directory's."""
        if m.filename in self._start:
            return self._start[m.filename]
        self.f.seek(m.header_offset)
        head = self.f.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(self.path, f"member {m.filename}: bad local header at byte {m.header_offset}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        if self.f.read(name_len) != m.filename.encode():
            raise FormatError(self.path, f"member {m.filename}: local header names another file")
        start = m.header_offset + 30 + name_len + extra_len
        if start + m.compress_size > self.bound[m.filename]:
            raise FormatError(self.path, f"member {m.filename}: its data runs into the member after it")
        self._start[m.filename] = start
        return start

    def read_member(self, m: zipfile.ZipInfo, limit: int = MAX_METADATA) -> bytes:
        """A small member's bytes, its CRC checked."""
        if m.file_size > limit:
            raise FormatError(self.path, f"member {m.filename} is {m.file_size} bytes, too big to be metadata")
        try:
            return self.zf.read(m)
        except zipfile.BadZipFile as e:
            raise _member_error(self.path, m, e) from None
        except (EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as e:
            raise FormatError(self.path, f"member {m.filename}: {e or type(e).__name__}") from None


def _member_error(path: Path, m: zipfile.ZipInfo, e: Exception) -> WeightswarmError:
    if "CRC" in str(e):  # the format is fine, the bytes are wrong
        return VerificationError(path, f"bad CRC-32 in member {m.filename}")
    return FormatError(path, f"member {m.filename}: {e or type(e).__name__}")


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
    return (isinstance(v, tuple) and len(v) <= MAX_DIMS and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 63 for x in v))


# The pure-Python unpickler: the C one grows its memo to whatever index a pickle names (a 10-byte pickle
# can ask for gigabytes); this one keeps the memo in a dict. data.pkl is small, so speed does not matter.
class _Unpickler(pickle._Unpickler):
    """Knows only the globals a torch.save'd state dict uses; each maps to an inert stand-in."""

    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def refuse(self, what: str) -> FormatError:
        return FormatError(self.path, f"unsafe pickle refused: {what}")

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return self._ordered_dict
        if module == "torch._utils":
            allowed = {"_rebuild_tensor": self._rebuild_v1, "_rebuild_tensor_v2": self._rebuild_v2,
                       "_rebuild_tensor_v3": self._rebuild_v3, "_rebuild_parameter": self._rebuild_parameter}
            if name in allowed:
                return allowed[name]
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch" and name in CODE_OF_NAME:
            return _Dtype(CODE_OF_NAME[name])
        raise self.refuse(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _ints(pid[4:])):
            # not its repr: a tuple nested through the memo has a repr of 2**depth parts
            raise self.refuse(f"a persistent id that is no storage ({type(pid).__name__})")
        return _Storage(pid[2], pid[1].code, pid[4])

    # A state dict's keys are names. Anything else as a key must be hashed, and a tuple nested through the
    # memo (a few bytes per level) takes 2**depth steps to hash, in C, where no signal can stop it.
    def _keys(self, keys) -> None:
        if not all(isinstance(k, str) for k in keys):
            raise self.refuse("a dictionary key that is not a name")

    def _ordered_dict(self, *args):
        if args:  # torch calls it empty (the state dict, backward hooks); items come through SETITEMS
            raise self.refuse("collections.OrderedDict with arguments")
        return collections.OrderedDict()

    def load_setitem(self):
        self._keys([self.stack[-2]])
        pickle._Unpickler.load_setitem(self)

    def load_setitems(self):
        self._keys(self.stack[0::2])  # the items since the mark
        pickle._Unpickler.load_setitems(self)

    def load_dict(self):
        self._keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)

    def load_set(self):
        raise self.refuse("a set")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch |= {pickle.SETITEM[0]: load_setitem, pickle.SETITEMS[0]: load_setitems, pickle.DICT[0]: load_dict,
                 pickle.EMPTY_SET[0]: load_set, pickle.ADDITEMS[0]: load_set, pickle.FROZENSET[0]: load_set}

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


def _unpickle(path: Path, data: bytes):
    try:
        return _Unpickler(io.BytesIO(data), path).load()
    except FormatError:
        raise
    except Exception as e:  # whatever a malformed pickle raises is bad input, one line
        first = str(e).splitlines()[0] if str(e) else "it ends too early" if isinstance(e, EOFError) else "no detail"
        raise FormatError(path, f"data.pkl is not a valid pickle: {type(e).__name__}: {first:.200}") from None


def torch_zip_refs(path: str | os.PathLike, partial: Partial | None = None) -> dict[str, TensorRef | Extent]:
    """Every tensor of a torch.save zip (real file or split parts) as a byte range, after checking the
    archive against the rules in the module docstring. Raises FormatError naming the tensor.

    With ``partial`` (a download in progress), only the archive's metadata is read (Absent until it is
    there), and each tensor comes as the Extent of its member: ``locate`` makes it a TensorRef once there."""
    path = Path(path)
    with _open(path, partial) as f:
        a = Archive(path, f)
        pkls = [n for n in a.members if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise FormatError(path, f"expected one <archive>/data.pkl member, found {len(pkls)}")
        prefix = pkls[0].removesuffix("data.pkl")  # "consolidated.00/", "archive/", ...
        order = a.members.get(prefix + "byteorder")
        if order is not None and _read_member(a, order, partial) != b"little":
            raise FormatError(path, "tensors are stored big-endian; only little-endian checkpoints are supported")
        obj = _unpickle(path, _read_member(a, a.members[pkls[0]], partial))
        if not isinstance(obj, dict):
            raise FormatError(path, f"top-level object is a {type(obj).__name__}, expected a dict of tensors")
        refs = {}
        for name, meta in obj.items():
            if not isinstance(name, str) or not isinstance(meta, _TensorMeta):
                raise FormatError(path, f"{name!r:.100}: expected a str key and a tensor, got {type(meta).__name__}")
            ext = _extent(a, prefix, name, meta)
            refs[name] = ext if partial else _located(a, ext)
    return refs


def _read_member(a: Archive, m: zipfile.ZipInfo, partial: Partial | None) -> bytes:
    if partial:  # the whole member at once: one round of fetching, not one per header field
        partial.need(a.path, *a.span(m))
    return a.read_member(m)


def _extent(a: Archive, prefix: str, name: str, meta: _TensorMeta) -> Extent:
    st = meta.storage
    m = a.members.get(f"{prefix}data/{st.key}")
    if m is None:
        raise FormatError(a.path, f"{name}: storage {st.key!r:.100} has no member {prefix}data/{st.key:.100}")
    item = ITEMSIZE[meta.code]
    storage_bytes = st.numel * (ITEMSIZE[st.code] if st.code else 1)
    if m.file_size != storage_bytes:
        raise FormatError(a.path, f"{name}: member {m.filename} holds {m.file_size} bytes, "
                                  f"the pickle says {storage_bytes}")
    expected, numel = [], 1
    for d in reversed(meta.shape):  # C-order strides; a dim of size 1 may carry any stride
        expected.insert(0, numel)
        numel *= d
    if any(s != e for s, e, d in zip(meta.stride, expected, meta.shape, strict=True) if d > 1):
        raise FormatError(a.path, f"{name}: not contiguous (shape {list(meta.shape)}, stride {list(meta.stride)})")
    if (meta.offset + numel) * item > storage_bytes:
        raise FormatError(a.path, f"{name}: {meta.code} {list(meta.shape)} at element {meta.offset} "
                                  f"runs past its {storage_bytes}-byte storage")
    return Extent(name, meta.code, meta.shape, a.path, *a.span(m), member=m.filename, skip=meta.offset * item)


def _located(a: Archive, ext: Extent) -> TensorRef:
    start = a.data_start(a.members[ext.member])
    return TensorRef(ext.name, ext.dtype, ext.shape, ext.path, start + ext.skip, nbytes(ext.dtype, ext.shape))


def locate(ext: Extent, partial: Partial | None = None) -> TensorRef:
    """The exact byte range of an Extent's tensor, reading (and checking) only its member's local header."""
    if ext.member is None:
        return TensorRef(ext.name, ext.dtype, ext.shape, ext.path, ext.lo, ext.hi - ext.lo)
    if partial:
        partial.need(ext.path, ext.lo, ext.hi)
    with _open(ext.path, partial) as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        head = _Bounded(f, size, ext.path)
        head.seek(ext.lo)
        raw = head.read(30)
        name = ext.member.encode()
        if len(raw) < 30 or raw[:4] != b"PK\x03\x04" or head.read(len(name)) != name:
            raise FormatError(ext.path, f"member {ext.member}: bad local header at byte {ext.lo}")
        start = ext.lo + 30 + len(name) + struct.unpack("<H", raw[28:30])[0]
    n = nbytes(ext.dtype, ext.shape)
    if start + ext.skip + n > ext.hi:
        raise FormatError(ext.path, f"member {ext.member}: its data runs into the member after it")
    return TensorRef(ext.name, ext.dtype, ext.shape, ext.path, start + ext.skip, n)


def check_crcs(path: str | os.PathLike, workers: int = 2, members: set[str] | None = None,
               partial: Partial | None = None) -> None:
    """Read every member (or the named ones) to its end so its CRC-32 is checked: VerificationError naming
    the first bad one. With ``partial``, the named members' bytes must be there.

    Members are spread over ``workers`` threads, each with its own file handle: zlib.crc32 and file
    reads release the GIL, so two cores share even a single 93 GB checkpoint."""
    path = Path(path)
    with _open(path, partial) as f:
        chosen = [m for m in Archive(path, f).members.values() if members is None or m.filename in members]
    bins: list[list[zipfile.ZipInfo]] = [[] for _ in range(max(1, workers))]
    loads = [0] * len(bins)
    for m in sorted(chosen, key=lambda m: -m.file_size):  # biggest first balances the bins
        i = loads.index(min(loads))
        bins[i].append(m)
        loads[i] += m.file_size
    with ThreadPoolExecutor(max_workers=len(bins)) as pool:
        errors = [e for e in pool.map(lambda b: _first_bad_member(path, b, partial), bins) if e]
    if errors:  # report the earliest bad member in the file, whichever thread found it
        raise min(errors, key=lambda e: e[0])[1]


def _open(path: Path, partial: Partial | None) -> BinaryIO:
    return partial.open(path) if partial else open_logical(path.parent, path.name)


def _first_bad_member(path: Path, members: list[zipfile.ZipInfo],
                      partial: Partial | None) -> tuple[int, WeightswarmError] | None:
    with _open(path, partial) as f:
        a = Archive(path, f)
        for m in sorted(members, key=lambda m: m.header_offset):  # sequential reads within a thread
            try:
                with a.zf.open(m.filename) as src:
                    while src.read(CHUNK):
                        pass
            except zipfile.BadZipFile as e:
                return m.header_offset, _member_error(path, m, e)
            except (EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
                return m.header_offset, FormatError(path, f"member {m.filename}: {e or type(e).__name__}")
    return None
