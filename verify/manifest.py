"""blake3 manifests: every file (path, size, blake3) and optionally every tensor (name, file, dtype, shape,
blake3 of its raw little-endian C-order bytes), and their verification.

A tensor's hash depends only on its bytes, so it is the same in a source checkpoint and in the per-expert
files made from it: checking output against manifest and source against manifest, tensor by tensor,
proves a conversion lossless without loading a model.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import blake3

from verify.hashing import hash_file
from verify.paths import confined
from verify.report import Finding
from verify.structure import WEIGHT_SUFFIXES
from weightswarm import interrupt
from weightswarm.errors import FormatError, InputError
from weightswarm.jsonfile import read_json

FORMAT = "weightswarm-manifest"
VERSION = 1
_FIELDS = {"files": {"path": str, "size": int, "blake3": str},
           "tensors": {"name": str, "file": str, "dtype": str, "shape": list, "blake3": str}}


def manifest_bytes(manifest: dict) -> bytes:
    """One serialisation for every writer, so equal manifests are equal files."""
    return (json.dumps(manifest, indent=1) + "\n").encode()


def tensor_hash(data: bytes | memoryview) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if len(data) > (8 << 20) else blake3.blake3()
    h.update(data)
    return h.hexdigest()


def payload_files(root: Path) -> list[str]:
    """Every regular file under root, relative posix paths, sorted; hidden names and the manifest left out."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            p = Path(folder) / name
            if not name.startswith(".") and name != "manifest.json" and p.is_file():
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def file_tensors(path: Path):
    """TensorRefs of one weight file (safetensors, or a torch.save zip read without unpickling code)."""
    from runner.tensorfile import safetensors_refs, torch_zip_refs

    return safetensors_refs(path) if path.name.endswith(".safetensors") else torch_zip_refs(path)


def build_manifest(root: str | os.PathLike, tensors: bool = False, workers: int = 2) -> dict:
    """The manifest of any folder of weight files (``weightswarm manifest``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such folder")
    rels = payload_files(root)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(lambda rel: hash_file(root / rel, "blake3"), rels))
    manifest = {"format": FORMAT, "version": VERSION}
    if (root / "params.json").is_file():
        manifest["params"] = read_json(root / "params.json")
    manifest["files"] = [{"path": rel, "size": (root / rel).stat().st_size, "blake3": d}
                         for rel, d in zip(rels, digests)]
    if tensors:
        manifest["tensors"] = [
            {"name": name, "file": rel, "dtype": ref.dtype, "shape": list(ref.shape), "blake3": tensor_hash(ref.read())}
            for rel in rels if rel.endswith(WEIGHT_SUFFIXES) for name, ref in file_tensors(root / rel).items()]
    return manifest


def load_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise FormatError(path, f"not a {FORMAT} file")
    if m.get("version") != VERSION:
        raise FormatError(path, f"manifest version {m.get('version')!r} is not supported (this reads {VERSION})")
    for key, fields in _FIELDS.items():
        entries = m.get(key, [])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(f), t) and not isinstance(e.get(f), bool)
                                            for f, t in fields.items()) for e in entries):
            shown = ", ".join(f"{f} ({t.__name__})" for f, t in fields.items())
            raise FormatError(path, f"'{key}' must be a list of objects with {shown}")
    from runner.tensorfile import DTYPES

    for e in m.get("tensors", []):
        if e["dtype"] not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in e["shape"]):
            raise FormatError(path, f"{e['name']}: bad dtype or shape")
    return m


def verify_manifest(root: str | os.PathLike, manifest_path: str | os.PathLike, source: str | os.PathLike | None = None,
                    workers: int = 2) -> list[Finding]:
    """Files against their size and blake3 (absent ones reported as absent), then every tensor of the
    present files against its blake3, then (with ``source``) the source's tensors against the same hashes."""
    root = Path(root)
    m = load_manifest(manifest_path)

    def check_file(e: dict) -> Finding:
        path = confined(root, e["path"], manifest_path)
        if not path.exists():
            return Finding("manifest", e["path"], True, "absent", absent=True)
        if not path.is_file() or path.stat().st_size != e["size"]:
            return Finding("manifest", e["path"], False, f"size {path.stat().st_size}, manifest says {e['size']}")
        got = hash_file(path, "blake3")
        return Finding("manifest", e["path"], got == e["blake3"],
                       "blake3 ok" if got == e["blake3"] else f"blake3 mismatch: expected {e['blake3']}, got {got}")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        findings = list(pool.map(check_file, m["files"]))
    # Tensors of every file that is here, corrupt ones too: the finding then names the changed tensor.
    present = {f.path for f in findings if not f.absent}
    entries = [e for e in m.get("tensors", []) if e["file"] in present]
    findings += _tensor_findings("tensor", entries, _refs_in(root, entries, manifest_path))
    if source is not None:
        findings += _source_findings(Path(source), m.get("tensors", []))
    return findings


def _refs_in(root: Path, entries: list[dict], manifest_path) -> Iterator[Callable[[], bytes] | None]:
    """A reader of each entry's bytes in the folder's files (None when the file lacks the tensor)."""
    index: dict[str, dict | FormatError] = {}  # file -> its tensors: parse each header once
    for e in entries:
        if e["file"] not in index:
            try:
                index[e["file"]] = file_tensors(confined(root, e["file"], manifest_path))
            except FormatError as err:  # a header broken beyond reading: each of its tensors says so
                index[e["file"]] = err
        refs = index[e["file"]]
        if isinstance(refs, FormatError):
            yield _raiser(refs)
            continue
        ref = refs.get(e["name"])
        yield ref.read if ref is not None else None


def _raiser(err: FormatError) -> Callable[[], bytes]:
    def read() -> bytes:
        raise err
    return read


def _tensor_findings(check: str, entries: list[dict], readers: Iterable[Callable[[], bytes] | None],
                     where: str = "") -> list[Finding]:
    """Hash each tensor's bytes (one at a time: memory stays at the largest tensor) against the manifest."""
    out = []
    for e, read in zip(entries, readers):
        interrupt.check()
        if read is None:
            out.append(Finding(check, e["name"], False, f"not in {where or e['file']}"))
            continue
        try:
            got = tensor_hash(read())
        except FormatError as err:  # truncated under a valid header: a finding, not the end of the report
            out.append(Finding(check, e["name"], False, err.problem))
            continue
        ok = got == e["blake3"]
        place = where or e["file"]
        out.append(Finding(check, e["name"], ok, f"blake3 ok ({place})" if ok else
                           f"blake3 mismatch in {place}: expected {e['blake3']}, got {got}"))
    return out


def _source_findings(source: Path, entries: list[dict]) -> list[Finding]:
    """The source checkpoint's tensors, read through the converter's own readers, against the manifest."""
    from runner.layouts import open_layout
    from runner.tensorfile import DTYPES, raw_bytes

    layout = open_layout(source)

    def reader(e: dict) -> Callable[[], bytes] | None:
        t = layout.tensors.get(e["name"])
        if t is None:
            return None

        def read() -> bytes:
            x = t.load()
            if e["dtype"] != t.dtype:  # converted with --dtype: compare with what the converter wrote
                x = x.to(DTYPES[e["dtype"]])
            return raw_bytes(x)
        return read

    return _tensor_findings("provenance", entries, (reader(e) for e in entries), where=f"the source {source}")
