"""Restructure a checkpoint into per-expert safetensors files, tensor by tensor, with provenance.

Output (a contract, see FORMAT.md): ``params.json``, ``tokenizer.model`` (when the source has one),
``dense.safetensors``, ``experts/expert-EE.safetensors`` (or ``experts/layer-LL/expert-EE.safetensors``)
and ``manifest.json``, written last. Files are built in ``OUT/.convert/`` (each one atomically) and moved
into place only when all are done, so a failed run leaves nothing but that folder; a rerun of the same
job keeps the files already finished there and redoes the rest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from runner.layouts import CanonTensor, Layout, open_layout
from runner.tensorfile import DTYPES, FLOAT_NAMES, TORCH_TO_CODE, write_safetensors
from verify.hashing import hash_file
from verify.manifest import FORMAT, VERSION, manifest_bytes
from weightswarm.atomic import atomic_write_bytes, fsync_dir
from weightswarm.errors import InputError

WORK = ".convert"  # the temp folder inside OUT; a rerun finishes or cleans it
GRANULARITIES = ("expert", "layer-expert")
_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.w[123]\.weight$")


@dataclass(frozen=True)
class ConvertOptions:
    granularity: str = "expert"  # one file per expert, or per layer and expert
    dtype: str | None = None  # bfloat16 | float16 | float32; None keeps the source's

    def check(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InputError(self.granularity, f"unknown granularity (choose from {', '.join(GRANULARITIES)})")
        if self.dtype is not None and self.dtype not in FLOAT_NAMES:
            raise InputError(self.dtype, f"unknown dtype (choose from {', '.join(FLOAT_NAMES)})")


def output_file(name: str, granularity: str = "expert") -> str:
    """The file of the per-expert layout a canonical tensor goes to."""
    m = _EXPERT.match(name)
    if not m:
        return "dense.safetensors"
    layer, expert = int(m[1]), int(m[2])
    if granularity == "layer-expert":
        return f"experts/layer-{layer:02d}/expert-{expert:02d}.safetensors"
    return f"experts/expert-{expert:02d}.safetensors"


def expert_globs(experts: str) -> list[str]:
    """``--experts 0,3``: what a node serving those experts needs of the per-expert layout."""
    try:
        ids = sorted({int(x) for x in experts.split(",") if x.strip()})
    except ValueError:
        raise InputError(experts, "not a list of expert numbers (e.g. 0,3)") from None
    if not ids or any(not 0 <= e < 100 for e in ids):
        raise InputError(experts, "expert numbers must be between 0 and 99")
    globs = ["dense.safetensors", "params.json", "tokenizer.model", "manifest.json"]
    for e in ids:
        globs += [f"experts/expert-{e:02d}.safetensors", f"experts/layer-*/expert-{e:02d}.safetensors"]
    return globs


def plan_files(layout: Layout, opts: ConvertOptions) -> dict[str, list[CanonTensor]]:
    """Output file -> its tensors in canonical order; files sorted (dense first, then experts)."""
    files: dict[str, list[CanonTensor]] = {}
    for t in layout.tensors.values():
        files.setdefault(output_file(t.name, opts.granularity), []).append(t)
    return dict(sorted(files.items()))


def convert(src: str | os.PathLike, out: str | os.PathLike, opts: ConvertOptions = ConvertOptions(),
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Convert SRC into OUT; returns the manifest (also written to OUT/manifest.json).
    ``progress(bytes_read, total_bytes)`` is called after each tensor."""
    opts.check()
    layout = open_layout(src)
    out = Path(out)
    work = _prepare(out, layout, opts)
    files = plan_files(layout, opts)
    total, done = sum(t.nbytes for t in layout.tensors.values()), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    results = {rel: _convert_file(work, rel, tensors, opts, advance) for rel, tensors in files.items()}
    copied = _copy_small_files(layout, work / "files")
    manifest = _manifest(layout, opts, files, results, copied, work / "files")
    for rel in [*results, *copied]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / "files" / rel, out / rel)
    for folder in {(out / rel).parent for rel in [*results, *copied]}:
        fsync_dir(folder)
    atomic_write_bytes(out / "manifest.json", manifest_bytes(manifest))
    shutil.rmtree(work)
    return manifest



def _prepare(out: Path, layout: Layout, opts: ConvertOptions) -> Path:
    """The work folder, after checking OUT; a leftover from an interrupted run of the same job is reused."""
    if not out.parent.is_dir():
        raise InputError(out.parent, "output parent folder does not exist")
    work = out / WORK
    job = {"source": _fingerprint(layout), "options": asdict(opts)}
    if out.exists():
        if not out.is_dir():
            raise InputError(out, "exists and is not a folder")
        same_job = (work / "job.json").is_file() and json.loads((work / "job.json").read_text()) == job
        if not same_job:
            if any(p.name != WORK for p in out.iterdir()):
                raise InputError(out, "already exists and is not empty",
                                 hint="choose a new folder (a rerun resumes only the same source and options)")
            shutil.rmtree(work, ignore_errors=True)  # an interrupted run of another job
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "files").mkdir(exist_ok=True)
    atomic_write_bytes(work / "job.json", json.dumps(job, sort_keys=True).encode())
    return work


def _fingerprint(layout: Layout) -> dict:
    """Enough to tell a rerun of the same job from another: layout, files, sizes, modification times."""
    return {"layout": layout.kind, "root": str(layout.root.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in layout.files]}


def _convert_file(work: Path, rel: str, tensors: list[CanonTensor], opts: ConvertOptions, progress) -> dict:
    done = work / "done" / (rel.replace("/", "__") + ".json")
    dest = work / "files" / rel
    moved = work.parent / rel  # an earlier run may have died while moving finished files into place
    if done.is_file() and moved.is_file() and not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(moved, dest)
    if done.is_file() and dest.is_file():
        result = json.loads(done.read_text())
        if result["size"] == dest.stat().st_size:
            progress(sum(t.nbytes for t in tensors))
            return result  # finished by an earlier, interrupted run
    code = FLOAT_NAMES.get(opts.dtype) if opts.dtype else None
    plan = [(t.name, code or t.dtype, t.shape) for t in tensors]

    def stream():
        for t in tensors:
            x = t.load()
            if code and TORCH_TO_CODE[x.dtype] != code:
                x = x.to(DTYPES[code])
            progress(t.nbytes)
            yield x

    dest.parent.mkdir(parents=True, exist_ok=True)
    result = write_safetensors(dest, plan, stream())
    atomic_write_bytes(done, json.dumps(result).encode())
    return result


def _copy_small_files(layout: Layout, out: Path) -> list[str]:
    """params.json (Mistral's, derived for HF sources) and the tokenizer, when there is one."""
    atomic_write_bytes(out / "params.json", (json.dumps(layout.params.to_dict()) + "\n").encode())
    copied = ["params.json"]
    if layout.tokenizer is not None:
        atomic_write_bytes(out / "tokenizer.model", layout.tokenizer.read_bytes())
        copied.append("tokenizer.model")
    return copied


def _manifest(layout: Layout, opts: ConvertOptions, files: dict[str, list[CanonTensor]],
              results: dict[str, dict], copied: list[str], out: Path) -> dict:
    entries = [{"path": rel, "size": r["size"], "blake3": r["blake3"]} for rel, r in results.items()]
    entries += [{"path": rel, "size": (out / rel).stat().st_size, "blake3": hash_file(out / rel, "blake3")}
                for rel in copied]
    code = FLOAT_NAMES.get(opts.dtype) if opts.dtype else None
    tensors = [{"name": t.name, "file": rel, "dtype": code or t.dtype, "shape": list(t.shape),
                "blake3": results[rel]["tensors"][t.name]}
               for rel, ts in files.items() for t in ts]
    order = {name: i for i, name in enumerate(layout.tensors)}
    tensors.sort(key=lambda e: order[e["name"]])
    return {
        "format": FORMAT,
        "version": VERSION,
        "params": layout.params.to_dict(),
        "source": {"layout": layout.kind,
                   "files": [{"path": p.relative_to(layout.root).as_posix(), "size": p.stat().st_size,
                              "blake3": hash_file(p, "blake3")} for p in layout.files]},
        "files": sorted(entries, key=lambda e: e["path"]),
        "tensors": tensors,
    }

