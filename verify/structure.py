"""Structural checks of weight files: zip CRCs and a safe unpickle for .pth, the header rules for
.safetensors, and params.json against the checkpoint's tensors. Nothing is materialised: a 93 GB
checkpoint is checked with memory bounded by a few read buffers.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable


from runner.config import ModelArgs
from verify.paths import confined
from weightswarm.errors import FormatError, InputError, VerificationError, WeightswarmError

from .hashing import CHUNK
from .report import Finding, first_few
from .splits import open_logical, split_base, split_parts

TensorInfo = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype code, shape)

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
# torch dtypes under their safetensors names, so both formats report the same vocabulary.
_TORCH_DTYPE = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
                "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32",
                "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
# The checkpoint params.json describes, first match wins.
CHECKPOINTS = ("consolidated.00.pth", "consolidated.safetensors")


def _opener(path: Path) -> Callable[[], BinaryIO]:
    """Opens path, or its split parts when only they exist (never writing a joined copy)."""
    return lambda: open_logical(path.parent, path.name)


def pth_tensors(path: str | os.PathLike, workers: int = 2) -> TensorInfo:
    """Tensors of a torch.save zip (or its split parts) after checking every member's CRC.

    Unpickles with weights_only onto the meta device, so no tensor data is read and a pickle that
    would call anything but tensor rebuilders is refused. Raises FormatError.
    """
    import torch  # two seconds of start-up that only .pth files need

    path = Path(path)
    opener = _opener(path)
    _check_crcs(path, opener, workers)
    with opener() as f:
        try:
            obj = torch.load(f, map_location="meta", weights_only=True)
        except pickle.UnpicklingError as e:
            raise FormatError(path, f"unsafe pickle refused: {_weights_only_reason(e)}") from None
        except Exception as e:  # whatever a malformed pickle makes torch raise, it is bad input
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FormatError(path, f"torch.load failed: {first}") from None
    if not isinstance(obj, dict):
        raise FormatError(path, f"top-level object is a {type(obj).__name__}, expected a dict of tensors")
    out: TensorInfo = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise FormatError(path, f"{name!r}: expected a str key and a tensor, got {type(t).__name__}")
        dtype = str(t.dtype).removeprefix("torch.")
        out[name] = (_TORCH_DTYPE.get(dtype, dtype), tuple(t.shape))
    return out


def _weights_only_reason(e: Exception) -> str:
    """The one line of torch's long weights_only message that says what was refused."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue")
    reason = next((ln for ln in lines if not ln.startswith(boiler)), lines[0] if lines else type(e).__name__)
    return reason.removeprefix("Trying to load ")


def _check_crcs(path: Path, opener: Callable[[], BinaryIO], workers: int) -> None:
    """Read every zip member to its end so zipfile checks its CRC-32.

    Members are spread over `workers` threads, each with its own file handle: zlib.crc32 and file
    reads release the GIL, so two cores share even a single 93 GB checkpoint.
    """
    with opener() as f:
        members = _zip_members(path, f)
    bins: list[list[zipfile.ZipInfo]] = [[] for _ in range(max(1, workers))]
    loads = [0] * len(bins)
    for m in sorted(members, key=lambda m: -m.file_size):  # biggest first balances the bins
        i = loads.index(min(loads))
        bins[i].append(m)
        loads[i] += m.file_size
    with ThreadPoolExecutor(max_workers=len(bins)) as pool:
        errors = [e for e in pool.map(lambda b: _first_bad_member(path, opener, b), bins) if e]
    if errors:  # report the earliest bad member in the file, whichever thread found it
        raise min(errors, key=lambda e: e[0])[1]


def _zip_members(path: Path, f: BinaryIO) -> list[zipfile.ZipInfo]:
    try:
        return zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise FormatError(path, f"not a valid zip archive (torch.save format): {e}") from None


def _first_bad_member(path: Path, opener: Callable[[], BinaryIO],
                      members: list[zipfile.ZipInfo]) -> tuple[int, WeightswarmError] | None:
    with opener() as f:
        zf = zipfile.ZipFile(f)
        for m in sorted(members, key=lambda m: m.header_offset):  # sequential reads within a thread
            try:
                with zf.open(m) as src:
                    while src.read(CHUNK):
                        pass
            except zipfile.BadZipFile as e:
                if "CRC" in str(e):  # the format is fine, the bytes are wrong
                    return m.header_offset, VerificationError(path, f"bad CRC-32 in member {m.filename}")
                return m.header_offset, FormatError(path, f"member {m.filename}: {e}")
            except (EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
                # truncated, unreadable, encrypted or compressed in a way torch never writes
                return m.header_offset, FormatError(path, f"member {m.filename}: {e}")
    return None


# name -> (dtype code, shape, begin, end): byte range relative to the start of the data section
HeaderEntries = dict[str, tuple[str, tuple[int, ...], int, int]]


def safetensors_tensors(path: str | os.PathLike) -> TensorInfo:
    """Tensors of a .safetensors file (or its split parts), checking the format's rules on the raw
    bytes: bounded header, UTF-8 JSON object, known dtypes, sizes that match shapes, and data
    offsets that tile the data section exactly. Raises FormatError("<tensor>: <problem>").
    """
    entries, _ = safetensors_header(path)
    return {name: (dtype, shape) for name, (dtype, shape, _b, _e) in entries.items()}


def safetensors_header(path: str | os.PathLike) -> tuple[HeaderEntries, int]:
    """The validated header of a .safetensors file (or its split parts) in header order, without
    __metadata__, and the absolute offset of its data section. Same rules as safetensors_tensors."""
    path = Path(path)
    with open_logical(path.parent, path.name) as f:
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
    return _parse_header(path, raw, size - 8 - n), 8 + n


def _parse_header(path: Path, raw: bytes, data_len: int) -> HeaderEntries:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "header is not valid UTF-8") from None
    if not text.startswith("{"):
        raise FormatError(path, "header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(path, pairs))
    except json.JSONDecodeError as e:
        raise FormatError(path, f"header is not valid JSON: {e.msg} at byte {e.pos}") from None
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
    if not isinstance(entry, dict):
        raise FormatError(path, f"{name}: entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise FormatError(path, f"{name}: missing {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise FormatError(path, f"{name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(path, f"{name}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
            or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(path, f"{name}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    need, span = numel * ITEMSIZE[dtype], offsets[1] - offsets[0]
    if need != span:
        raise FormatError(path, f"{name}: {dtype} {shape} needs {need} bytes, data_offsets span {span}")
    return dtype, shape, offsets


def params_problems(args: ModelArgs, tensors: TensorInfo) -> list[str]:
    """What differs between the tensors params.json implies and the checkpoint's: missing names
    (checkpoint order), unexpected names (file order), then wrong shapes."""
    expected = args.tensor_shapes()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k} has shape {list(tensors[k][1])}, params imply {list(shape)}"
                 for k, shape in expected.items() if k in tensors and tuple(tensors[k][1]) != tuple(shape)]
    return problems


def _weight_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Weight files (real, or logical names of split groups) and params.json files, relative posix."""
    weights: dict[str, Path] = {}
    params = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .weightswarm, .pad, ...
        here = Path(folder)
        # Hidden names are also our temp files; FIFOs and devices would block or never end.
        for name in sorted(f for f in files if not f.startswith(".") and (here / f).is_file()):
            logical = split_base(name) or name
            rel = (here / logical).relative_to(root).as_posix()
            if logical.endswith(WEIGHT_SUFFIXES):
                weights.setdefault(rel, here / logical)  # a real file wins over its parts
            elif name == "params.json":
                params.append(rel)
    return dict(sorted(weights.items())), params


def _check_weight(path: Path, rel: str, workers: int) -> tuple[Finding, TensorInfo | None]:
    """The file's Finding, and its tensors (None when it is broken). A file that breaks its format
    or is unsafe is refused (bad input); one whose bytes fail a CRC is wrong data."""
    try:
        parts = [] if path.is_file() else split_parts(path)
        suffix = f" ({len(parts)} split parts)" if parts else ""
        if path.name.endswith(".safetensors"):
            tensors = safetensors_tensors(path)
            return Finding("structure", rel, True, f"header ok, {len(tensors)} tensors{suffix}"), tensors
        tensors = pth_tensors(path, workers)
        return Finding("structure", rel, True, f"zip CRCs ok, {len(tensors)} tensors{suffix}"), tensors
    except FormatError as e:
        return Finding("structure", rel, False, e.problem, refused=True), None
    except VerificationError as e:
        return Finding("structure", rel, False, e.problem), None
    except OSError as e:
        return Finding("structure", rel, False, f"unreadable: {e.strerror or e}"), None


def check_structure(root: str | os.PathLike, workers: int = 2) -> list[Finding]:
    """One Finding (check="structure") per weight file, then one (check="params") per params.json.

    Hidden folders and files are skipped; split groups count as their logical file. A file that
    breaks its format gives a failing Finding, never an exception.
    """
    root = Path(root)
    weights, params = _weight_files(root)
    findings, tensors_of = [], {}
    for rel, path in weights.items():
        try:
            confined(root, rel, rel)  # a symlink out of the folder is not ours to open
        except InputError as e:
            findings.append(Finding("structure", rel, False, e.problem, refused=True))
            tensors_of[rel] = None
            continue
        finding, tensors_of[rel] = _check_weight(path, rel, workers)
        findings.append(finding)
    for rel in params:
        findings.append(_check_params(root, rel, weights, tensors_of))
    return findings


def _check_params(root: Path, rel: str, weights: dict[str, Path], tensors_of: dict) -> Finding:
    folder = Path(rel).parent
    ckpt = next((c for c in ((folder / n).as_posix() for n in CHECKPOINTS) if c in weights), None)
    try:
        args = ModelArgs.load(root / rel)
    except FormatError as e:
        return Finding("params", rel, False, e.problem, refused=True)
    if ckpt is None:
        # A partial fetch (say, only params.json) is not wrong: there is just nothing to compare with.
        return Finding("params", rel, True, f"valid; no {' or '.join(CHECKPOINTS)} beside it to compare with")
    tensors = tensors_of[ckpt]
    if tensors is None:
        return Finding("params", rel, False, f"cannot compare: {Path(ckpt).name} failed its structure check")
    problems = params_problems(args, tensors)
    if problems:
        return Finding("params", rel, False, first_few(problems))
    return Finding("params", rel, True, f"{len(tensors)} tensors match {Path(ckpt).name}")
