"""blake3 manifests (formats.manifest) built from a folder and checked against one.

A tensor's hash depends only on its bytes, so it is the same in a source checkpoint and in the per-expert
files made from it: checking output against manifest and source against manifest, tensor by tensor,
proves a conversion lossless without loading a model. ``check_files`` is the one check of files against a
manifest: verify, the runner (before it maps an expert file) and the daemon's scrubs all use it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from weightswarm.core import interrupt
from weightswarm.core.errors import FormatError, InputError
from weightswarm.core.hashing import Spend, blake3_hex, hash_file
from weightswarm.core.inputs import os_problem, read_json
from weightswarm.core.paths import confined, walk_files
from weightswarm.formats.dtypes import cast
from weightswarm.formats.manifest import FORMAT, NAME, VERSION, load_manifest
from weightswarm.formats.tensorref import WEIGHT_SUFFIXES, TensorRef
from weightswarm.verify.report import Finding


def file_tensors(path: Path) -> dict[str, TensorRef]:
    """The tensors of one weight file (safetensors, or a torch.save zip through the restricted reader)."""
    # Imported here: checking files alone (the common case, compared with b3sum) reads no weight format.
    from weightswarm.formats import safetensors
    from weightswarm.formats.torchzip import torch_zip_refs

    return safetensors.refs(path) if path.name.endswith(".safetensors") else torch_zip_refs(path)


def build_manifest(root: str | os.PathLike, tensors: bool = False, workers: int = 2) -> dict:
    """The manifest of any folder of weight files (``weightswarm manifest``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such folder")
    files = [(rel, p) for rel, p in walk_files(root) if rel != NAME]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(lambda f: hash_file(f[1], "blake3"), files))
    manifest = {"format": FORMAT, "version": VERSION}
    if (root / "params.json").is_file():
        manifest["params"] = read_json(root / "params.json")
    manifest["files"] = [{"path": rel, "size": p.stat().st_size, "blake3": d}
                         for (rel, p), d in zip(files, digests, strict=True)]
    if tensors:
        manifest["tensors"] = [
            {"name": name, "file": rel, "dtype": ref.dtype, "shape": list(ref.shape), "blake3": blake3_hex(ref.read())}
            for rel, p in files if rel.endswith(WEIGHT_SUFFIXES) for name, ref in file_tensors(p).items()]
    return manifest


def check_files(root: str | os.PathLike, manifest: dict, manifest_path: str | os.PathLike, workers: int = 2,
                spend: Spend | None = None) -> list[Finding]:
    """Each listed file against its size and blake3, in the manifest's order (check "manifest"): an absent
    file is reported as absent (a partial fetch), not as corrupt."""
    root = Path(root)

    def one(e: dict) -> Finding:
        path = confined(root, e["path"], manifest_path)
        if not path.exists() and not path.is_symlink():
            return Finding("manifest", e["path"], True, "absent", absent=True)
        try:
            if not path.is_file():
                return Finding("manifest", e["path"], False, "not a regular file")
            size = path.stat().st_size
            if size != e["size"]:
                return Finding("manifest", e["path"], False, f"size {size}, {Path(manifest_path).name} says {e['size']}"
                               + (" (truncated)" if size < e["size"] else ""))
            got = hash_file(path, "blake3", spend)
        except OSError as err:
            return Finding("manifest", e["path"], False, f"unreadable: {os_problem(err)}")
        except InputError as err:
            return Finding("manifest", e["path"], False, err.problem)
        return Finding("manifest", e["path"], got == e["blake3"],
                       "blake3 ok" if got == e["blake3"] else f"blake3 mismatch: expected {e['blake3']}, got {got}")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, manifest["files"]))


def verify_manifest(root: str | os.PathLike, manifest_path: str | os.PathLike, source: str | os.PathLike | None = None,
                    workers: int = 2) -> list[Finding]:
    """Files against their size and blake3 (absent ones reported as absent), then every tensor of the
    present files against its blake3, then (with ``source``) the source's tensors against the same hashes."""
    root = Path(root)
    m = load_manifest(manifest_path)
    findings = check_files(root, m, manifest_path, workers)
    # Tensors of every file that is here, corrupt ones too: the finding then names the changed tensor.
    present = {f.path for f in findings if not f.absent and f.detail != "not a regular file"}
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
    for e, read in zip(entries, readers, strict=True):
        interrupt.check()
        place = where or e["file"]
        if read is None:
            out.append(Finding(check, e["name"], False, f"not in {place}"))
            continue
        try:
            got = blake3_hex(read())
        except FormatError as err:  # truncated under a valid header: a finding, not the end of the report
            out.append(Finding(check, e["name"], False, err.problem))
            continue
        ok = got == e["blake3"]
        out.append(Finding(check, e["name"], ok, f"blake3 ok ({place})" if ok else
                           f"blake3 mismatch in {place}: expected {e['blake3']}, got {got}"))
    return out


def _source_findings(source: Path, entries: list[dict]) -> list[Finding]:
    """The source checkpoint's canonical tensors, read as the converter reads them, against the manifest."""
    from weightswarm.formats.layouts import open_layout  # only provenance reads layouts: keep start-up short

    layout = open_layout(source)

    def reader(e: dict) -> Callable[[], bytes] | None:
        t = layout.tensors.get(e["name"])
        if t is None:
            return None
        if e["dtype"] == t.dtype:
            return t.read
        return lambda: cast(t.read(), t.dtype, e["dtype"])  # converted with --dtype: as the converter wrote it

    return _tensor_findings("provenance", entries, (reader(e) for e in entries), where=f"the source {source}")
