"""Reassemble any supported layout (the per-expert one included) as Hugging Face shards or Mistral's single file."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from runner.layouts import Layout, hf_config_from_params, mistral_to_hf, open_layout, permute_for_hf
from runner.tensorfile import write_safetensors
from weightswarm.atomic import atomic_open, atomic_write_bytes, fsync_dir
from weightswarm.errors import InputError

FORMATS = ("hf", "consolidated")
DEFAULT_SHARD_BYTES = 2 << 30


def export(src: str | os.PathLike, dest: str | os.PathLike, fmt: str = "hf",
           shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write SRC's weights to the new folder DEST; returns the files written."""
    if fmt not in FORMATS:
        raise InputError(fmt, f"unknown export format (choose from {', '.join(FORMATS)})")
    layout = open_layout(src)
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise InputError(dest.parent, "output parent folder does not exist")
    if dest.exists() and not dest.is_dir():
        raise InputError(dest, "exists and is not a folder")
    if dest.exists() and any(dest.iterdir()):
        raise InputError(dest, "already exists and is not empty")
    # Built in a hidden folder inside DEST and moved up at the end: a failed export leaves no half layout,
    # and nothing is written outside DEST.
    created = not dest.exists()
    work = dest / ".export"
    work.mkdir(parents=True)
    try:
        written = _hf(layout, work, shard_bytes) if fmt == "hf" else _consolidated(layout, work)
        if layout.tokenizer is not None:
            written.append(atomic_write_bytes(work / "tokenizer.model", layout.tokenizer.read_bytes()))
        for p in written:
            os.replace(p, dest / p.name)
        work.rmdir()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            dest.rmdir()
        raise
    fsync_dir(dest)
    return [dest / p.name for p in written]


def _hf(layout: Layout, dest: Path, shard_bytes: int) -> list[Path]:
    """config.json, model-0000N-of-0000M.safetensors and the index, with q/k permuted for HF's RoPE."""
    args = layout.params
    shards: list[list] = [[]]
    size = 0
    for t in layout.tensors.values():
        nbytes = t.nbytes
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, written = {}, []
    for name, tensors in zip(names, shards):
        plan = [(mistral_to_hf(t.name), t.dtype, t.shape) for t in tensors]
        write_safetensors(dest / name, plan, (_to_hf(t, args) for t in tensors), metadata={"format": "pt"})
        weight_map.update({hf: name for hf, _, _ in plan})
        written.append(dest / name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in layout.tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    dtype = next(iter(layout.tensors.values())).dtype
    written.append(atomic_write_bytes(dest / "model.safetensors.index.json", _json(index)))
    written.append(atomic_write_bytes(dest / "config.json", _json(hf_config_from_params(args, dtype))))
    return written


def _to_hf(t, args):
    x = t.load()
    if t.name.endswith("attention.wq.weight"):
        return permute_for_hf(x, args.n_heads)
    if t.name.endswith("attention.wk.weight"):
        return permute_for_hf(x, args.n_kv_heads)
    return x


def _consolidated(layout: Layout, dest: Path) -> list[Path]:
    """Mistral's consolidated.00.pth and params.json. torch.save needs every tensor in memory at once."""
    import torch

    state = {t.name: t.load() for t in layout.tensors.values()}
    with atomic_open(dest / "consolidated.00.pth") as f:
        torch.save(state, f)
    params = atomic_write_bytes(dest / "params.json", (json.dumps(layout.params.to_dict()) + "\n").encode())
    return [dest / "consolidated.00.pth", params]


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()
