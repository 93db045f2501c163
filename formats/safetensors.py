"""The safetensors format: its header rules checked on the raw bytes, tensor byte ranges, and a streaming
writer that lays files out the same way on every machine.

No torch: the writer takes each tensor's raw bytes (anything with the buffer protocol).
"""
from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from weightswarm.core.atomic import atomic_open
from weightswarm.core.errors import FormatError
from weightswarm.core.hashing import new_hasher
from weightswarm.formats.dtypes import ITEMSIZE, nbytes
from weightswarm.formats.partial import Partial
from weightswarm.formats.splitfile import open_logical
from weightswarm.formats.tensorref import MAX_DIMS, Extent, TensorRef

MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
# Python holds a parsed header in ~10x its bytes: before parsing, bound what the JSON can build. A checkpoint
# file has a few thousand tensors at most (Mixtral 8x22B: 563 in its largest shard).
MAX_TENSORS = 1 << 17
ALIGN = 8  # the header is padded with spaces so the data starts on a multiple of 8

# name -> (dtype code, shape, begin, end): byte range relative to the start of the data section
HeaderEntries = dict[str, tuple[str, tuple[int, ...], int, int]]


def read_header(path: str | os.PathLike, partial: Partial | None = None) -> tuple[HeaderEntries, int]:
    """The validated header of a .safetensors file (or its split parts) in header order, without
    __metadata__, and the absolute offset of its data section. Raises FormatError("<tensor>: <problem>"):
    bounded header, UTF-8 JSON object, known dtypes, sizes that match shapes, and data offsets that tile
    the data section exactly (no gap, no overlap, no trailing bytes). With ``partial``, Absent until the
    header is there."""
    path = Path(path)
    with (partial.open(path) if partial else open_logical(path.parent, path.name)) as f:
        size = f.seek(0, io.SEEK_END)
        if size < 8:
            raise FormatError(path, f"file is {size} bytes, too small for a safetensors header")
        f.seek(0)
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise FormatError(path, f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        if n > size - 8:
            raise FormatError(path, f"header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    return parse_header(path, raw, size - 8 - n), 8 + n


def refs(path: str | os.PathLike, partial: Partial | None = None) -> dict[str, TensorRef | Extent]:
    """Every tensor of a .safetensors file (or its split parts) as a byte range, header checked; with
    ``partial``, as Extents (read_header's Absent until the header is there)."""
    path = Path(path)
    entries, start = read_header(path, partial)
    if partial:
        return {name: Extent(name, dtype, shape, path, start + begin, start + end)
                for name, (dtype, shape, begin, end) in entries.items()}
    return {name: TensorRef(name, dtype, shape, path, start + begin, end - begin)
            for name, (dtype, shape, begin, end) in entries.items()}


def parse_header(path: Path, raw: bytes, data_len: int) -> HeaderEntries:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "header is not valid UTF-8") from None
    if not text.startswith("{"):
        raise FormatError(path, "header does not start with '{'")
    if text.count("{") > MAX_TENSORS + 2 or text.count(",") > 16 * MAX_TENSORS:
        raise FormatError(path, f"header declares more than {MAX_TENSORS} tensors or values; no checkpoint has")
    try:
        header = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(path, pairs))
    except json.JSONDecodeError as e:
        raise FormatError(path, f"header is not valid JSON: {e.msg} at byte {e.pos}") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise FormatError(path, f"header is not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(path, "header is not valid JSON: nested too deeply") from None
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(path, "__metadata__: must map strings to strings")
    spans = []
    out: HeaderEntries = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(path, name, entry)
        if end > data_len:
            raise FormatError(path, f"{name}: data_offsets end {end} is past the end of the data ({data_len} bytes)")
        spans.append((begin, end, name))
        out[name] = (dtype, tuple(shape), begin, end)
    prev_end, prev = 0, None
    for begin, end, name in sorted(spans):
        after = f"after {prev}" if prev else "at the start of the data"
        if begin < prev_end:
            raise FormatError(path, f"{name}: starts at byte {begin}, overlapping {prev} which ends at {prev_end}")
        if begin > prev_end:
            raise FormatError(path, f"{name}: starts at byte {begin}, leaving a {begin - prev_end}-byte gap {after}")
        prev_end, prev = end, name
    if prev_end != data_len:
        raise FormatError(path, f"{data_len - prev_end} trailing bytes after the last tensor")
    return out


def _no_duplicates(path: Path, pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(path, f"{k}: appears twice in the header")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _entry(path: Path, name: str, entry) -> tuple[str, list[int], list[int]]:
    if not name.isprintable():  # a name ends up in file names, manifests and error lines
        raise FormatError(path, f"tensor name {name!r:.80} contains control characters")
    if not isinstance(entry, dict):
        raise FormatError(path, f"{name}: entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise FormatError(path, f"{name}: missing {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise FormatError(path, f"{name}: unknown dtype {dtype!r:.40}")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise FormatError(path, f"{name}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 63 for d in shape):
        raise FormatError(path, f"{name}: shape must be a list of non-negative integers, got {shape!r:.80}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o < 1 << 63 for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(path, f"{name}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                f"got {offsets!r:.80}")
    need, span = nbytes(dtype, tuple(shape)), offsets[1] - offsets[0]
    if need != span:
        raise FormatError(path, f"{name}: {dtype} {shape} needs {need} bytes, data_offsets span {span}")
    return dtype, shape, offsets


# --- writing -------------------------------------------------------------------------------------

Entry = tuple[str, str, tuple[int, ...]]  # name, dtype code, shape


@dataclass(frozen=True)
class Plan:
    """A file's layout before any tensor is written: its header bytes and where each tensor goes."""

    header: bytes  # the 8-byte length and the padded JSON
    spans: dict[str, tuple[int, int]]  # name -> absolute [begin, end) in the file, in header order
    size: int


def plan(entries: list[Entry], metadata: dict[str, str] | None = None) -> Plan:
    """Deterministic layout: header keys in entry order (__metadata__ first), compact JSON padded with
    spaces to a multiple of 8 bytes, tensors contiguous in header order."""
    if metadata and len(metadata) > 1:  # safetensors itself writes several keys in hash order
        raise ValueError("at most one __metadata__ key, so the header is deterministic")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, code, shape in entries:
        if name in header or name == "__metadata__":
            raise ValueError(f"{name}: appears twice in the plan")
        if code not in ITEMSIZE:
            raise ValueError(f"{name}: unknown dtype code {code!r}")
        n = nbytes(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    start = 8 + len(raw)
    spans = {name: (start + e["data_offsets"][0], start + e["data_offsets"][1])
             for name, e in header.items() if name != "__metadata__"}
    return Plan(struct.pack("<Q", len(raw)) + raw, spans, start + pos)


def write_safetensors(dest: str | os.PathLike, entries: list[Entry], tensors: Iterable,
                      metadata: dict[str, str] | None = None) -> dict:
    """Stream each tensor's raw bytes (in entry order) into a .safetensors at dest, atomically. A tensor is
    a buffer, or a TensorRef of bytes stored as they are (copied in the kernel, hashed from the page cache).

    Returns {"size", "blake3" (of the file), "tensors": {name: blake3 of its raw bytes}}. Holds two
    tensors at a time (one hashed, the next read). ValueError if a tensor's byte count disagrees with its entry."""
    p = plan(entries, metadata)
    whole = new_hasher("blake3", p.size)
    hashes: dict[str, str] = {}
    it = iter(tensors)

    def digest(name: str, view: memoryview) -> None:
        h = new_hasher("blake3", view.nbytes)
        h.update(view)
        whole.update(view)
        hashes[name] = h.hexdigest()

    # A tensor is hashed on a thread while it is written and the next one is read (blake3, writes and reads
    # release the GIL): the file's hash needs the tensors in order, so one is hashed at a time.
    with atomic_open(dest) as f, ThreadPoolExecutor(1, thread_name_prefix="hash") as pool:
        f.write(p.header)
        whole.update(p.header)
        f.flush()  # tensors go in at their offsets, past the buffer
        fd = f.fileno()
        hashing = None
        for name, (begin, end) in p.spans.items():
            data = next(it, None)
            if data is None:
                raise ValueError(f"{name}: the tensors ran out before the plan did")
            view = memoryview(data.view() if isinstance(data, TensorRef) else data).cast("B")
            if view.nbytes != end - begin:
                raise ValueError(f"{name}: got {view.nbytes} bytes, the plan says {end - begin}")
            if hashing is not None:
                hashing.result()
            hashing = pool.submit(digest, name, view)
            if isinstance(data, TensorRef):
                data.copy_into(fd, begin)
            else:
                at = begin
                while view:
                    k = os.pwrite(fd, view, at)
                    view, at = view[k:], at + k
            # Start writing it back now, so the final fsync does not wait for the whole file.
            os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
            del view, data  # the hash holds this tensor until it is done; the next one comes meanwhile
        if hashing is not None:
            hashing.result()
        if next(it, None) is not None:
            raise ValueError(f"{dest}: more tensors than the plan's {len(entries)}")
    return {"size": p.size, "blake3": whole.hexdigest(), "tensors": hashes}
