"""Reassemble any supported layout (the per-expert one included) as Hugging Face shards or Mistral's single file.

Files are built in ``DEST/.export/`` and moved up when all are done (``core.workdir``), so DEST never holds
half a layout. A run that dies (kill -9, a full disk) leaves that folder; the same command then keeps the
shards it finished and writes the rest. Hugging Face shards are written from raw bytes; only Mistral's
``consolidated.00.pth`` needs torch (``torch.save``, which holds the whole model in memory for this one file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

from weightswarm.core.atomic import atomic_open, atomic_write_bytes
from weightswarm.core.errors import OptionError
from weightswarm.core.workdir import prepare, publish, resume
from weightswarm.formats.dtypes import NAMES
from weightswarm.formats.hf import heads_of, hf_config_from_params, hf_row_order, mistral_to_hf, reorder_rows
from weightswarm.formats.layouts import CanonTensor, Layout, open_layout
from weightswarm.formats.safetensors import plan, write_safetensors

FORMATS = ("hf", "consolidated")
DEFAULT_SHARD_BYTES = 2 << 30
WORK = ".export"


def export(src: str | os.PathLike, dest: str | os.PathLike, fmt: str = "hf",
           shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write SRC's weights to the new folder DEST; returns the files written."""
    if fmt not in FORMATS:
        raise OptionError("--format", fmt, f"choose from {', '.join(FORMATS)}")
    if shard_bytes <= 0:
        raise OptionError("--shard-size", shard_bytes, "must be at least 1 byte")
    layout = open_layout(src)
    dest = Path(dest)
    job = {"source": str(layout.root.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                           for p in layout.files], "format": fmt,
           "shard_bytes": shard_bytes}
    done = resume(dest, WORK, job)
    if done is not None:  # an earlier run of this export was killed while moving its files into place
        return done
    files = prepare(dest, WORK, job)  # a leftover of this export keeps the shards it finished
    written = _hf(layout, files, shard_bytes) if fmt == "hf" else _consolidated(layout, files)
    if layout.tokenizer is not None:
        written.append(atomic_write_bytes(files / "tokenizer.model", layout.tokenizer.read_bytes()))
    return publish(files, [p.name for p in written])


def _hf(layout: Layout, work: Path, shard_bytes: int) -> list[Path]:
    """config.json, model-0000N-of-0000M.safetensors and the index, with q/k permuted for HF's RoPE."""
    args = layout.params
    shards: list[list[CanonTensor]] = [[]]
    size = 0
    for t in layout.tensors.values():
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, written = {}, []
    for name, tensors in zip(names, shards, strict=True):
        entries = [(mistral_to_hf(t.name), t.dtype, t.shape) for t in tensors]
        meta = {"format": "pt"}
        done = work / name
        # A shard of an earlier run of this job is complete (written atomically) if it has its planned size.
        if not (done.is_file() and done.stat().st_size == plan(entries, meta).size):
            write_safetensors(done, entries, (_to_hf(t, args) for t in tensors), metadata=meta)
        weight_map.update({hf: name for hf, _, _ in entries})
        written.append(done)
    index = {"metadata": {"total_size": sum(t.nbytes for t in layout.tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    dtype = next(iter(layout.tensors.values())).dtype
    written.append(atomic_write_bytes(work / "model.safetensors.index.json", _json(index)))
    written.append(atomic_write_bytes(work / "config.json", _json(hf_config_from_params(args, dtype))))
    return written


def _to_hf(t: CanonTensor, args) -> bytearray:
    data = t.read()
    heads = heads_of(t.name, args)
    return data if heads is None else reorder_rows(data, t.shape[0], hf_row_order(t.shape[0], heads, to_hf=True))


class _Recorder:
    """The file torch.save writes to, keeping the OSError a write raised: torch reports a failed write as a
    RuntimeError without it (no errno, no file name), and a full disk must say which file and why."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _consolidated(layout: Layout, work: Path) -> list[Path]:
    """Mistral's consolidated.00.pth and params.json. torch.save needs every tensor in memory at once."""
    import torch

    def tensor(t: CanonTensor) -> torch.Tensor:
        dtype = getattr(torch, NAMES[t.dtype])
        if not t.nbytes:  # frombuffer refuses an empty buffer
            return torch.empty(t.shape, dtype=dtype)
        return torch.frombuffer(t.read(), dtype=dtype).reshape(t.shape)

    state = {t.name: tensor(t) for t in layout.tensors.values()}
    with atomic_open(work / "consolidated.00.pth") as f:
        sink = _Recorder(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
    params = atomic_write_bytes(work / "params.json", (json.dumps(layout.params.to_dict()) + "\n").encode())
    return [work / "consolidated.00.pth", params]


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()
