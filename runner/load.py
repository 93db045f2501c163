"""Assemble a Transformer from a checkpoint folder of any supported layout, without copying its weights.

The model is built on the meta device (no memory), then each canonical tensor is assigned: a view of a
memory map of its file when the stored bytes are the tensor as is and the dtype and device match, so a
bf16 checkpoint run in bf16 on CPU costs page cache, not a second copy; otherwise one converted copy.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from weightswarm.core.errors import FormatError, OptionError
from weightswarm.formats.dtypes import FLOAT_NAMES, NAMES
from weightswarm.formats.layouts import CanonTensor, Layout, open_layout
from weightswarm.formats.manifest import NAME, load_manifest
from weightswarm.formats.params import ModelArgs
from weightswarm.formats.perexpert import DENSE, output_file
from weightswarm.formats.tensorref import TensorRef
from weightswarm.runner.model import Transformer
from weightswarm.verify.manifest import check_files


def torch_dtype(code: str) -> torch.dtype:
    return getattr(torch, NAMES[code])


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (bfloat16, float32, float16); None stays None (the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in FLOAT_NAMES:
        raise OptionError("--dtype", dtype, f"choose from {', '.join(FLOAT_NAMES)}")
    return torch_dtype(FLOAT_NAMES[dtype])


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device", str(device), "CUDA is not available in this torch build or on this machine",
                          hint="use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise OptionError("--device", str(device), "unsupported device (choose cpu or cuda)")
    return device


def open_checked(src: str | os.PathLike) -> Layout:
    """open_layout, after checking a per-expert folder's files against its manifest (when it has one):
    a missing, truncated or corrupt expert file is named here, before anything is mapped."""
    root = Path(src)
    if (root / DENSE).is_file():
        check_per_expert_files(root)
    return open_layout(root)


def check_per_expert_files(root: Path) -> None:
    """Every file manifest.json lists exists with its size and blake3 (about 8 GB/s from the page cache).
    Without a manifest, every expert file the params imply exists."""
    manifest = root / NAME
    if manifest.is_file():
        for f in check_files(root, load_manifest(manifest), manifest):
            if f.absent:
                raise FormatError(root / f.path, f"missing (listed in {NAME})",
                                  hint="fetch it again, e.g. weightswarm fetch --experts")
            if not f.ok:  # a flipped bit keeps the size: only the hash tells, and a wrong answer must not be silent
                raise FormatError(root / f.path, f"{f.detail}: the file is corrupt", hint="fetch or convert it again")
        return
    args = ModelArgs.load(root / "params.json")
    if not args.moe:
        return
    granularity = "layer-expert" if (root / "experts" / "layer-00").is_dir() else "expert"
    layers = range(args.n_layers) if granularity == "layer-expert" else [0]
    for layer in layers:  # stops at the first missing file: bounded by the files there, whatever params say
        for e in range(args.moe.num_experts):
            rel = output_file(f"layers.{layer}.feed_forward.experts.{e}.w1.weight", granularity)
            if not (root / rel).is_file():
                raise FormatError(root / rel, "missing: the per-expert layout needs every expert's file to run")


def _file_map(path: Path, maps: dict) -> mmap.mmap:
    mm = maps.get(path)
    if mm is None:
        if not path.stat().st_size:
            raise FormatError(path, "empty file")
        with open(path, "rb") as f:
            mm = maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return mm


def mapped(ref: TensorRef, maps: dict | None = None) -> torch.Tensor:
    """The tensor as a view of a private (copy-on-write) memory map of its file: nothing is read or copied
    until a page is touched, and those pages are the page cache's, shared with other readers. Split files
    (a tensor may cross parts) are read instead. Writes to it never reach the file. ``maps`` (path -> map)
    lets the tensors of one model share one map per file; two models must not share one, or a write to
    one would show in the other."""
    dtype = torch_dtype(ref.dtype)
    if not ref.path.is_file():
        return from_bytes(ref.read(), ref.dtype, ref.shape)
    if not ref.nbytes:  # frombuffer refuses an empty range
        return torch.empty(ref.shape, dtype=dtype)
    mm = _file_map(ref.path, {} if maps is None else maps)
    if ref.offset + ref.nbytes > len(mm):  # a mapped page past the end would be SIGBUS, not an error
        raise FormatError(ref.path, f"{ref.name}: truncated: needs {ref.nbytes} bytes at offset "
                                    f"{ref.offset}, the file has {len(mm)}")
    # frombuffer holds a reference to mm, so the mapping lives as long as any tensor made from it.
    return torch.frombuffer(mm, dtype=dtype, count=ref.nbytes // dtype.itemsize, offset=ref.offset).view(ref.shape)


def from_bytes(data: bytearray, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A writable CPU tensor over these bytes, without a copy."""
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=torch_dtype(code))
    return torch.frombuffer(data, dtype=torch_dtype(code)).reshape(shape)


def tensor_for(t: CanonTensor, device: torch.device, dtype: torch.dtype | None, maps: dict,
               copy: bool = False) -> torch.Tensor:
    """One canonical tensor on device in dtype: mapped without a copy when nothing needs to change, unless
    ``copy`` asks for a private one in memory the allocator aligned."""
    # Tensors stored otherwise (HF q/k, the stacked upload's w2) are read and reordered.
    x = mapped(t.ref, maps) if t.transform is None else from_bytes(t.read(), t.dtype, t.shape)
    want = dtype or x.dtype
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
