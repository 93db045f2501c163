"""Assemble a Transformer from a checkpoint folder of any supported layout, without copying its weights.

The model is built on the meta device (no memory), then each canonical tensor is assigned: a view of a
memory map of its file when the stored bytes are the tensor as is and the dtype and device match, so a
bf16 checkpoint run in bf16 on CPU costs page cache, not a second copy; otherwise one converted copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from runner.config import ModelArgs
from runner.layouts import CanonTensor, Layout, open_layout
from runner.model import Transformer
from runner.tensorfile import DTYPES, FLOAT_NAMES
from verify.hashing import hash_file
from verify.manifest import load_manifest
from verify.paths import confined
from weightswarm.errors import FormatError, InputError

DTYPE_NAMES = {name: DTYPES[code] for name, code in FLOAT_NAMES.items()}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (bfloat16, float32, float16); None stays None (the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise InputError(str(dtype), f"unknown dtype (choose from {', '.join(DTYPE_NAMES)})")
    return DTYPE_NAMES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(str(device), "CUDA is not available in this torch build or on this machine",
                         hint="use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(str(device), "unsupported device (choose cpu or cuda)")
    return device


def open_checked(src: str | os.PathLike) -> Layout:
    """open_layout, after checking a per-expert folder's files against its manifest (when it has one):
    a missing or truncated expert file is named here, before anything is mapped."""
    root = Path(src)
    if (root / "dense.safetensors").is_file():
        check_per_expert_files(root)
    return open_layout(root)


def check_per_expert_files(root: Path) -> None:
    """Every file manifest.json lists exists with its size and blake3 (about 8 GB/s from the page cache).
    Without a manifest, every expert file the params imply exists."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        for entry in load_manifest(manifest)["files"]:
            path = confined(root, str(entry["path"]), manifest)
            if not path.is_file():
                raise FormatError(path, f"missing (listed in {manifest.name})",
                                  hint="fetch it again, e.g. weightswarm fetch --experts")
            size = path.stat().st_size
            if size != entry["size"]:
                raise FormatError(path, f"is {size} bytes, {manifest.name} says {entry['size']} "
                                        "(truncated or corrupt)", hint="fetch or convert it again")
            # A flipped bit keeps the size: only the hash tells, and a wrong answer must never be silent.
            if hash_file(path, "blake3") != entry["blake3"]:
                raise FormatError(path, f"blake3 differs from {manifest.name}: the file is corrupt",
                                  hint="fetch or convert it again")
        return
    args = ModelArgs.load(root / "params.json")
    if not args.moe:
        return
    per_layer = (root / "experts" / "layer-00").is_dir()
    for e in range(args.moe.num_experts):
        for layer in range(args.n_layers) if per_layer else [None]:
            rel = f"layer-{layer:02d}/expert-{e:02d}" if per_layer else f"expert-{e:02d}"
            path = root / "experts" / f"{rel}.safetensors"
            if not path.is_file():
                raise FormatError(path, "missing: the per-expert layout needs every expert's file to run")


def tensor_for(t: CanonTensor, device: torch.device, dtype: torch.dtype | None, maps: dict,
               copy: bool = False) -> torch.Tensor:
    """One canonical tensor on device in dtype: mapped without a copy when nothing needs to change, unless
    ``copy`` asks for a private one in memory the allocator aligned."""
    x = t.ref.mapped(maps) if t.ref is not None else t.load()  # transformed tensors (HF q/k, stacked) are read
    want = dtype or DTYPES[t.dtype]
    y = x if want == x.dtype and device.type == "cpu" else x.to(device=device, dtype=want)
    # A mapped tensor starts wherever its file puts it, and a tensor read into a bytearray at a 16-byte
    # boundary; matmul kernels take other paths for other alignments, so rounding follows the file layout.
    return x.clone() if copy and y is x else y


def build_model(layout: Layout, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None, copy: bool = False) -> Transformer:
    """The model of an opened layout, its parameters assigned from the files (see module docstring).

    ``copy=True`` gives every parameter private, contiguous memory from torch's allocator, whatever the
    layout: two models built so from the same tensors compute bit for bit the same on any CPU."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(layout.params)
    maps: dict = {}  # this model's own file maps: its weights are private to it
    state = {name: tensor_for(t, device, dtype, maps, copy) for name, t in layout.tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.file_maps = maps  # path -> the model's copy-on-write map of that file (its weights point into them)
    return model.eval().requires_grad_(False)


def load_model(src: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, copy: bool = False) -> tuple[Transformer, Layout]:
    """Open the checkpoint folder src (any layout open_layout reads) and build its model.
    dtype None keeps the checkpoint's. Raises FormatError naming a missing or broken file."""
    layout = open_checked(src)
    return build_model(layout, device, dtype, copy), layout
