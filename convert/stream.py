"""Convert while downloading: each tensor goes into its per-expert file as soon as its bytes are there.

Every output file's header and tensor offsets are known before any tensor arrives (formats.safetensors.plan
of the map's shapes), so tensors land in any order. The work folder is convert's (``OUT/.convert``): files
grow in ``files/``, and ``journal.jsonl`` lists each tensor once its bytes are on disk, so a rerun after
kill -9 rewrites nothing it lists. A file whose tensors are all in is hashed and recorded as convert records
a finished file; the manifest comes last (convert.finish). The result is byte for byte that of
``convert --experts`` on the whole download.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from weightswarm.convert.convert import (
    ConvertOptions,
    already_done,
    done_file,
    entries,
    finish,
    job_of,
    plan_files,
    prepare,
    record_done,
    tensor_bytes,
)
from weightswarm.core.hashing import blake3_hex, hash_file
from weightswarm.core.workdir import FILES
from weightswarm.formats.layouts import Layout
from weightswarm.formats.safetensors import Plan, plan
from weightswarm.formats.tensorref import TensorRef

JOURNAL = "journal.jsonl"


class StreamConvert:
    """``submit(name)`` once a tensor's bytes are there; ``finish()`` once all are: returns the manifest."""

    def __init__(self, layout: Layout, out: Path, opts: ConvertOptions):
        opts.check()
        self.layout, self.out, self.opts = layout, Path(out), opts
        # A download in progress changes its files' times: the job is the layout, sizes and options.
        job = job_of(layout, opts, mtimes=False)
        self.manifest = already_done(self.out, job)
        self.files = plan_files(layout, opts)
        self.file_of = {t.name: rel for rel, ts in self.files.items() for t in ts}
        self._jobs: list[Future] = []
        if self.manifest is not None:  # the same job, finished by an earlier run
            self.results, self.todo = {}, set()
            return
        self.work = prepare(self.out, job)
        self.plans: dict[str, Plan] = {rel: plan(entries(ts, opts)) for rel, ts in self.files.items()}
        self.results = {rel: r for rel in self.files if (r := done_file(self.work, rel)) is not None}
        self.hashes: dict[str, dict[str, str]] = {rel: {} for rel in self.files}
        for e in self._journal():
            if self.file_of.get(e.get("tensor")) == e.get("file") and e["file"] not in self.results:
                self.hashes[e["file"]][e["tensor"]] = e["blake3"]
        self.todo = {n for n, rel in self.file_of.items() if rel not in self.results and n not in self.hashes[rel]}
        self._fds: dict[str, int] = {}
        for rel in self.files:  # all in, but the run died before it was recorded
            if rel not in self.results and len(self.hashes[rel]) == len(self.files[rel]):
                self._seal(rel)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="convert")
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._busy = False

    @property
    def names(self) -> list[str]:
        """The tensors this conversion writes."""
        return list(self.file_of)

    def submit(self, name: str) -> None:
        """Write tensor ``name`` (its bytes must be there) on the converter's thread; errors come out of
        the next submit or finish."""
        for f in [j for j in self._jobs if j.done()]:
            self._jobs.remove(f)
            f.result()
        if name in self.todo:
            self.todo.discard(name)
            with self._lock:
                self._pending.append(name)
                if not self._busy:
                    self._busy = True
                    self._jobs.append(self._pool.submit(self._drain))

    def finish(self) -> dict:
        if self.manifest is not None:
            return self.manifest
        self._pool.shutdown(wait=True)
        for f in self._jobs:
            f.result()
        missing = sorted(self.todo)
        if missing:
            raise RuntimeError(f"finish() before {len(missing)} tensors were submitted, e.g. {missing[0]}")
        for fd in self._fds.values():
            os.close(fd)
        self.manifest = finish(self.out, self.work, self.layout, self.opts, self.files, self.results)
        return self.manifest

    def close(self) -> None:
        """Stop without finishing (what is written stays for the next run)."""
        if self.manifest is None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _drain(self) -> None:
        """Write what was submitted, in batches: one sync per file and one journal sync per batch, not per
        tensor (a download hands over tensors faster than a disk syncs them one by one)."""
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._busy = False
                    return
            done = [(self.file_of[name], name, self._put(name)) for name in batch]
            rels = {rel for rel, _, _ in done}
            for rel in rels:
                os.fdatasync(self._fds[rel])  # the bytes are on disk before the journal says so
            with open(self.work / JOURNAL, "a") as j:
                j.writelines(json.dumps({"file": rel, "tensor": name, "blake3": digest}) + "\n"
                             for rel, name, digest in done)
                j.flush()
                os.fsync(j.fileno())
            for rel, name, digest in done:
                self.hashes[rel][name] = digest
            for rel in rels:
                if len(self.hashes[rel]) == len(self.files[rel]):
                    self._seal(rel)

    def _put(self, name: str) -> str:
        """Write one tensor at its place in its file; its blake3."""
        rel = self.file_of[name]
        data = tensor_bytes(self.layout.located(name), self.opts)
        fd = self._fd(rel)
        begin, end = self.plans[rel].spans[name]
        view = memoryview(data.view() if isinstance(data, TensorRef) else data).cast("B")
        if view.nbytes != end - begin:
            raise ValueError(f"{name}: got {view.nbytes} bytes, the plan says {end - begin}")
        if isinstance(data, TensorRef):
            data.copy_into(fd, begin)
        else:
            at = begin
            while view[at - begin:]:
                at += os.pwrite(fd, view[at - begin:], at)
        return blake3_hex(view)

    def _seal(self, rel: str) -> None:
        """A file whose tensors are all in: hashed, and recorded as convert records a finished file."""
        fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)
        dest = self.work / FILES / rel
        tensors = {t.name: self.hashes[rel][t.name] for t in self.files[rel]}
        result = {"size": self.plans[rel].size, "blake3": hash_file(dest, "blake3"), "tensors": tensors}
        record_done(self.work, rel, result)
        self.results[rel] = result

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            dest = self.work / FILES / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o644)
            p = self.plans[rel]
            if os.fstat(fd).st_size != p.size:
                os.ftruncate(fd, p.size)
            os.pwrite(fd, p.header, 0)
            self._fds[rel] = fd
        return self._fds[rel]

    def _journal(self) -> list[dict]:
        """The tensors earlier runs wrote; a line cut short by kill -9 is not one of them."""
        out = []
        try:
            lines = (self.work / JOURNAL).read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("file", "tensor", "blake3")):
                out.append(e)
        return out
