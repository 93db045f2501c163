"""Restructure a checkpoint into per-expert safetensors files, tensor by tensor, with provenance.

Output (a contract, see FORMAT.md): ``params.json``, ``tokenizer.model`` (when the source has one),
``dense.safetensors``, ``experts/expert-EE.safetensors`` (or ``experts/layer-LL/expert-EE.safetensors``)
and ``manifest.json``, written last. Files are built in ``OUT/.convert/`` (each one atomically) and moved
into place only when all are done, so a failed run leaves nothing but that folder; a rerun of the same
job keeps the files already finished there and redoes the rest, and a rerun of a finished job is a no-op.

Tensor bytes are moved as they are; torch is imported only for ``--dtype`` (formats.dtypes.cast).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from weightswarm.core.atomic import atomic_write_bytes
from weightswarm.core.errors import OptionError
from weightswarm.core.hashing import hash_file
from weightswarm.core.paths import walk_files
from weightswarm.core.workdir import FILES, publish, resume, same_job
from weightswarm.core.workdir import prepare as workdir_prepare
from weightswarm.formats.dtypes import FLOAT_NAMES, cast
from weightswarm.formats.layouts import CanonTensor, Layout, open_layout
from weightswarm.formats.manifest import FORMAT, NAME, VERSION, manifest_bytes
from weightswarm.formats.partial import Partial
from weightswarm.formats.perexpert import GRANULARITIES, check_experts, expert_of_tensor, output_file
from weightswarm.formats.safetensors import write_safetensors

WORK = ".convert"  # the work folder inside OUT: a rerun finishes or cleans it; afterwards it keeps job.json


@dataclass(frozen=True)
class ConvertOptions:
    granularity: str = "expert"  # one file per expert, or per layer and expert
    dtype: str | None = None  # bfloat16 | float16 | float32; None keeps the source's
    experts: tuple[int, ...] | None = None  # the dense tensors and these experts' only; None: all

    def check(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise OptionError("--granularity", self.granularity, f"choose from {', '.join(GRANULARITIES)}")
        if self.dtype is not None and self.dtype not in FLOAT_NAMES:
            raise OptionError("--dtype", self.dtype, f"choose from {', '.join(FLOAT_NAMES)}")

    def chosen(self, layout: Layout) -> list[CanonTensor]:
        """The layout's tensors this conversion writes, in canonical order."""
        if self.experts is None:
            return list(layout.tensors.values())
        moe = layout.params.moe
        check_experts(self.experts, list(range(moe.num_experts)) if moe else [])
        return [t for t in layout.tensors.values() if (le := expert_of_tensor(t.name)) is None or le[1] in self.experts]


def plan_files(layout: Layout, opts: ConvertOptions) -> dict[str, list[CanonTensor]]:
    """Output file -> its tensors in canonical order; files sorted (dense first, then experts)."""
    files: dict[str, list[CanonTensor]] = {}
    for t in opts.chosen(layout):
        files.setdefault(output_file(t.name, opts.granularity), []).append(t)
    return dict(sorted(files.items()))


def convert(src: str | os.PathLike, out: str | os.PathLike, opts: ConvertOptions = ConvertOptions(),
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Convert SRC into OUT; returns the manifest (also written to OUT/manifest.json).
    ``progress(bytes_read, total_bytes)`` is called after each tensor."""
    opts.check()
    # Some experts only: their tensors are located one by one, so a source fetched with --experts (whose
    # other members are holes) converts too.
    layout = open_layout(src) if opts.experts is None else open_layout(src, disk_partial(Path(src)))
    out = Path(out)
    job = job_of(layout, opts)
    done = already_done(out, job)
    if done is not None:
        return done
    work = prepare(out, job)
    files = plan_files(layout, opts)
    total, read = sum(t.nbytes for ts in files.values() for t in ts), 0
    # The source's own hashes (a full conversion records them) on a second core, beside the writes.
    side = ThreadPoolExecutor(1, thread_name_prefix="source-hash")
    sources = side.submit(source_hashes, layout) if opts.experts is None else None

    def advance(n: int) -> None:
        nonlocal read
        read += n
        if progress:
            progress(read, total)

    try:
        results = {rel: _convert_file(work, rel, [layout.located(t.name) for t in tensors], opts, advance)
                   for rel, tensors in files.items()}
        hashes = sources.result() if sources else None
    finally:
        side.shutdown(wait=True, cancel_futures=True)
    return finish(out, work, layout, opts, files, results, hashes)


def source_hashes(layout: Layout) -> list[str]:
    return [hash_file(p, "blake3") for p in layout.files]


def finish(out: Path, work: Path, layout: Layout, opts: ConvertOptions, files: dict[str, list[CanonTensor]],
           results: dict[str, dict], sources: list[str] | None = None) -> dict:
    """Once every output file is done in the work folder: the small files, then all moved into place
    with the manifest last. ``sources``: the source files' blake3, when already taken."""
    copied = _copy_small_files(layout, work / FILES)
    if opts.experts is None and sources is None:
        sources = source_hashes(layout)
    manifest = _manifest(layout, opts, files, results, copied, work / FILES, sources)
    atomic_write_bytes(work / FILES / NAME, manifest_bytes(manifest))
    # What stays is the job's record: a rerun of the same job is then a no-op.
    publish(work / FILES, [*results, *copied, NAME], keep_job=True)
    return manifest


def already_done(out: Path, job: dict) -> dict | None:
    """The manifest of a finished conversion of the same job whose files are all still there, else None.
    A run killed while moving its files into place is finished first."""
    resume(out, WORK, job, keep_job=True)
    try:
        manifest = json.loads((out / NAME).read_text())
        intact = all((out / e["path"]).is_file() and (out / e["path"]).stat().st_size == e["size"]
                     for e in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if same_job(out / WORK, job) and intact else None


def job_of(layout: Layout, opts: ConvertOptions, mtimes: bool = True) -> dict:
    return {"source": _fingerprint(layout, mtimes), "options": asdict(opts)}


def disk_partial(root: Path) -> Partial:
    """A folder on disk as a Partial whose bytes are all there: tensors are then located one by one."""
    sizes = {rel: path.stat().st_size for rel, path in walk_files(root)}
    return Partial(root, sizes, lambda rel, lo, hi: True)


def prepare(out: Path, job: dict) -> Path:
    """The work folder (core.workdir), after checking OUT; a leftover of an interrupted run of the same job
    is reused. ``done/`` holds the records of the files it finished."""
    work = workdir_prepare(out, WORK, job).parent
    (work / "done").mkdir(exist_ok=True)
    return work


def _fingerprint(layout: Layout, mtimes: bool) -> dict:
    """Enough to tell a rerun of the same job from another: layout, files, sizes, modification times (not
    of a download in progress, whose files change as they fill)."""
    files = [[p.name, layout.size(p)] + ([p.stat().st_mtime_ns] if mtimes else []) for p in layout.files]
    return {"layout": layout.kind, "root": str(layout.root.resolve()), "files": files}


def done_file(work: Path, rel: str) -> dict | None:
    """The result of an output file an earlier, interrupted run finished (None if it did not)."""
    done = work / "done" / (rel.replace("/", "__") + ".json")
    dest = work / FILES / rel
    if done.is_file() and dest.is_file():
        result = json.loads(done.read_text())
        if result["size"] == dest.stat().st_size:
            return result
    return None


def record_done(work: Path, rel: str, result: dict) -> None:
    atomic_write_bytes(work / "done" / (rel.replace("/", "__") + ".json"), json.dumps(result).encode())


def entries(tensors: list[CanonTensor], opts: ConvertOptions) -> list[tuple[str, str, tuple[int, ...]]]:
    """An output file's safetensors entries: its tensors, in the dtype they are written in."""
    code = FLOAT_NAMES.get(opts.dtype) if opts.dtype else None
    return [(t.name, code or t.dtype, t.shape) for t in tensors]


def tensor_bytes(t: CanonTensor, opts: ConvertOptions):
    """A tensor's bytes as they are written (canonical, in the asked dtype), or its TensorRef when they are
    stored so (write_safetensors copies those)."""
    code = FLOAT_NAMES.get(opts.dtype) if opts.dtype else None
    if code and code != t.dtype:
        return cast(t.read(), t.dtype, code)
    # Stored as they are: the writer copies them file to file in the kernel.
    return t.ref if t.transform is None else t.read()


def _convert_file(work: Path, rel: str, tensors: list[CanonTensor], opts: ConvertOptions, progress) -> dict:
    result = done_file(work, rel)
    if result is not None:
        progress(sum(t.nbytes for t in tensors))
        return result

    def stream():
        for t in tensors:
            data = tensor_bytes(t, opts)
            progress(t.nbytes)
            yield data

    dest = work / FILES / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    result = write_safetensors(dest, entries(tensors, opts), stream())
    record_done(work, rel, result)
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
              results: dict[str, dict], copied: list[str], out: Path, sources: list[str] | None) -> dict:
    """With --experts the source may be a partial download: its files are listed by size (the tensors'
    blake3 are the provenance), and the manifest names the experts it holds."""
    entries = [{"path": rel, "size": r["size"], "blake3": r["blake3"]} for rel, r in results.items()]
    entries += [{"path": rel, "size": (out / rel).stat().st_size, "blake3": hash_file(out / rel, "blake3")}
                for rel in copied]
    code = FLOAT_NAMES.get(opts.dtype) if opts.dtype else None
    tensors = [{"name": t.name, "file": rel, "dtype": code or t.dtype, "shape": list(t.shape),
                "blake3": results[rel]["tensors"][t.name]}
               for rel, ts in files.items() for t in ts]
    order = {name: i for i, name in enumerate(layout.tensors)}
    tensors.sort(key=lambda e: order[e["name"]])
    listed = [{"path": p.relative_to(layout.root).as_posix(), "size": layout.size(p)} for p in layout.files]
    if sources is not None:
        listed = [e | {"blake3": h} for e, h in zip(listed, sources, strict=True)]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "params": layout.params.to_dict(),
        "source": {"layout": layout.kind, "files": listed},
        "files": sorted(entries, key=lambda e: e["path"]),
        "tensors": tensors,
    }
    if opts.experts is not None:
        manifest["experts"] = list(opts.experts)
    return manifest
