"""The checkpoint layouts a converter meets, seen as one canonical (Mistral-named) set of tensors.

open_layout(src) detects the layout, checks every tensor's presence and shape against the params (reading
headers and pickles only) and describes each canonical tensor as the byte range it is stored in plus, for
the two layouts that store tensors otherwise, a reordering of those bytes (HF q/k rows; the stacked
upload's transposed w2). ``read()`` gives the canonical bytes; no torch is needed to read, hash or copy
them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from weightswarm.core.errors import FormatError
from weightswarm.core.inputs import read_json
from weightswarm.formats import safetensors
from weightswarm.formats.dtypes import ITEMSIZE, nbytes
from weightswarm.formats.hf import (
    heads_of,
    hf_row_order,
    hf_to_mistral,
    mistral_to_hf,
    params_from_hf_config,
    reorder_rows,
)
from weightswarm.formats.params import ModelArgs
from weightswarm.formats.partial import Partial
from weightswarm.formats.splitfile import split_parts
from weightswarm.formats.tensorref import Extent, TensorRef
from weightswarm.formats.torchzip import locate, torch_zip_refs

KINDS = ("consolidated-pth", "consolidated-safetensors", "hf", "hf-stacked", "per-expert")
HINT = ("expected one of: consolidated.00.pth (or its -splitN parts) + params.json; consolidated.safetensors "
        "+ params.json; config.json + model.safetensors.index.json and its shards, or model.safetensors; "
        "consolidated.0N.pt with stacked experts; or the per-expert layout of weightswarm convert")
_STACKED_FILE = re.compile(r"^consolidated\.[0-9]{2}\.pt$")


@dataclass(frozen=True)
class RowOrder:
    """Rows of the stored matrix in another order (HF's q/k)."""

    order: tuple[int, ...]  # order[k]: the stored row that becomes row k

    def apply(self, data, itemsize: int) -> bytearray:
        return reorder_rows(data, len(self.order), list(self.order))


@dataclass(frozen=True)
class Transpose:
    """The stored [rows, cols] matrix transposed (the stacked upload keeps each expert's w2 as w2.T)."""

    rows: int
    cols: int

    def apply(self, data, itemsize: int) -> bytearray:
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[itemsize]
        src = memoryview(data).cast("B").cast(fmt)
        out = bytearray(src.nbytes)
        dst = memoryview(out).cast(fmt)
        for c in range(self.cols):  # output row c is input column c: one strided copy each
            dst[c * self.rows:(c + 1) * self.rows] = src[c::self.cols]
        return out


@dataclass(frozen=True)
class CanonTensor:
    name: str  # canonical Mistral name
    dtype: str  # safetensors code of the stored tensor
    shape: tuple[int, ...]  # canonical shape
    ref: TensorRef | Extent  # the stored bytes it is made from (an Extent in a partial layout, until located)
    transform: RowOrder | Transpose | None = None  # None: the stored bytes are the canonical tensor as is

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def read(self) -> bytearray:
        """The canonical tensor's raw little-endian C-order bytes (reads only its range of the file)."""
        data = self.ref.read()
        return data if self.transform is None else self.transform.apply(data, ITEMSIZE[self.dtype])


@dataclass(frozen=True)
class Layout:
    kind: str
    root: Path
    params: ModelArgs
    files: list[Path]  # source weight files; split parts themselves (in part order) when split
    tensors: dict[str, CanonTensor]  # in ModelArgs.tensor_shapes() order
    tokenizer: Path | None
    partial: Partial | None = None  # set when the files are only partly there: refs are Extents

    def size(self, path: Path) -> int:
        return self.partial.size(path) if self.partial else path.stat().st_size

    def located(self, name: str) -> CanonTensor:
        """The tensor with its exact byte range (in a partial layout, its bytes must be there)."""
        t = self.tensors[name]
        return t if isinstance(t.ref, TensorRef) else replace(t, ref=locate(t.ref, self.partial))


def open_layout(src: str | os.PathLike, partial: Partial | None = None) -> Layout:
    """Detect and validate the checkpoint in folder src (no tensor bytes are read). Raises FormatError.

    With ``partial`` (a download in progress, see formats.partial), the small files (params.json,
    config.json, the index) must be there; of the weight files only headers and archive metadata are
    read (Absent until they are there), and every tensor is an Extent (``Layout.located``). The per-expert
    layout and the stacked upload are opened whole even then (they are selected by file, or not at all)."""
    root = Path(src)
    if partial is None and not root.is_dir():
        raise FormatError(root, "not a folder" if root.exists() else "no such folder",
                          hint="give the folder that holds the checkpoint")
    is_file = partial.is_file if partial else Path.is_file
    tokenizer = root / "tokenizer.model"
    tokenizer = tokenizer if is_file(tokenizer) else None
    # HF repos may carry consolidated files too; without params.json beside them, the HF files win.
    hf = is_file(root / "config.json") and (is_file(root / "model.safetensors.index.json")
                                            or is_file(root / "model.safetensors"))
    consolidated_ok = is_file(root / "params.json") or not hf
    if is_file(root / "dense.safetensors"):  # selected by file, never partial: opened whole
        return _open_per_expert(root, tokenizer)
    pth = root / "consolidated.00.pth"
    parts = [] if is_file(pth) else [root / r for r, _ in partial.parts(pth)] if partial else split_parts(pth)
    if (is_file(pth) or parts) and consolidated_ok:
        args = _params(root / "params.json")
        tensors = _canonical(args, torch_zip_refs(pth, partial), "params.json implies", pth)
        return Layout("consolidated-pth", root, args, parts or [pth], tensors, tokenizer, partial)
    st = root / "consolidated.safetensors"
    if is_file(st) and consolidated_ok:
        args = _params(root / "params.json")
        tensors = _canonical(args, safetensors.refs(st, partial), "params.json implies", st)
        return Layout("consolidated-safetensors", root, args, [st], tensors, tokenizer, partial)
    if hf:
        return _open_hf(root, tokenizer, partial)
    # The stacked upload keeps eight experts in one member: it is opened whole, never partial.
    stacked = sorted(p for p in root.iterdir() if _STACKED_FILE.match(p.name) and p.is_file())
    if stacked:
        return _open_stacked(root, stacked, tokenizer)
    what = "the folder is empty" if not any(root.iterdir()) else "no known checkpoint layout"
    raise FormatError(root, what, hint=HINT)


def _open_per_expert(root: Path, tokenizer: Path | None) -> Layout:
    """weightswarm's own layout (FORMAT.md): dense.safetensors plus one file per expert (or layer and expert)."""
    args = _params(root / "params.json")
    files = [root / "dense.safetensors"] + sorted(p for p in (root / "experts").rglob("*.safetensors")
                                                  if p.is_file())
    tensors = _canonical(args, _merge(files, safetensors.refs), "params.json implies", root / "experts")
    return Layout("per-expert", root, args, files, tensors, tokenizer)


def _params(path: Path) -> ModelArgs:
    if not path.exists():
        raise FormatError(path, "no such file", hint="a consolidated checkpoint needs the params.json it came with")
    return ModelArgs.load(path)


def _open_hf(root: Path, tokenizer: Path | None, partial: Partial | None) -> Layout:
    args = params_from_hf_config(read_json(root / "config.json"), root / "config.json")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise FormatError(index, "weight_map must map tensor names to shard file names")
        files = []
        for shard in sorted(set(wmap.values())):
            if "/" in shard or "\\" in shard or shard.startswith(".") or "\0" in shard:  # the index is untrusted
                raise FormatError(index, f"shard name {shard!r:.80} is not a plain file name")
            if not (partial.is_file(root / shard) if partial else (root / shard).is_file()):
                raise FormatError(root / shard, f"listed in {index.name} but missing")
            files.append(root / shard)
    else:
        wmap, files = None, [root / "model.safetensors"]
    refs = _merge(files, lambda p: safetensors.refs(p, partial))
    if wmap is not None:
        for name, shard in wmap.items():
            if name not in refs or refs[name].path.name != shard:
                raise FormatError(root / shard, f"{name}: listed in {index.name} but not in this file")
        for name, ref in refs.items():
            if name not in wmap:
                raise FormatError(ref.path, f"{name}: not listed in {index.name}")
    transforms = {}
    for name, ref in refs.items():
        heads = heads_of(hf_to_mistral(name) or "", args)
        if heads and ref.shape and ref.shape[0] % (2 * heads) == 0:  # a wrong shape is refused below
            transforms[name] = RowOrder(tuple(hf_row_order(ref.shape[0], heads, to_hf=False)))
    tensors = _canonical(args, refs, "config.json implies", index if wmap is not None else files[0],
                         rename=hf_to_mistral, display=mistral_to_hf, transforms=transforms,
                         skip=lambda n: n.endswith("rotary_emb.inv_freq"))
    return Layout("hf", root, args, files, tensors, tokenizer, partial)


def _open_stacked(root: Path, files: list[Path], tokenizer: Path | None) -> Layout:
    refs = _merge(files, torch_zip_refs)
    if not any(re.fullmatch(r"layers\.[0-9]+\.block_sparse_moe\.w1", n) for n in refs):
        raise FormatError(root, "consolidated.0N.pt files without stacked experts (layers.N.block_sparse_moe.w1)",
                          hint=HINT)
    if (root / "params.json").exists():
        args, basis = ModelArgs.load(root / "params.json"), "params.json implies"
    elif (root / "config.json").exists():
        args = params_from_hf_config(read_json(root / "config.json"), root / "config.json")
        basis = "config.json implies"
    else:
        raise FormatError(root / "params.json", "no such file (nor config.json)",
                          hint="stacked checkpoints need params.json or config.json beside them")
    if not args.moe:
        raise FormatError(root, "stacked experts, but the params describe a model without experts")
    e_n, hid, dim = args.moe.num_experts, args.hidden_dim, args.dim
    sources: dict[str, TensorRef] = {}
    transforms: dict[str, Transpose] = {}
    stacks = 0
    for name, ref in refs.items():
        m = re.fullmatch(r"layers\.([0-9]+)\.block_sparse_moe\.(w[123])", name)
        if not m:
            sources[name] = ref
            continue
        if int(m[1]) >= args.n_layers:
            raise FormatError(ref.path, f"{name}: unexpected tensor (not in the model {basis.split()[0]} describes)")
        if ref.shape != (e_n * hid, dim):  # checked before the split, so the loop below is bounded by the file
            raise FormatError(ref.path, f"{name}: shape {list(ref.shape)}, {basis} {[e_n * hid, dim]}")
        stacks += 1
        for e in range(e_n):
            canon = f"layers.{m[1]}.feed_forward.experts.{e}.{m[2]}.weight"
            block = ref.rows(e * hid, (e + 1) * hid, name=name)
            if m[2] == "w2":  # stored transposed, [hidden, dim]: the ref takes the canonical shape it is read as
                block = TensorRef(name, block.dtype, (dim, hid), block.path, block.offset, block.nbytes)
                transforms[canon] = Transpose(hid, dim)
            sources[canon] = block
    if stacks != 3 * args.n_layers:
        for layer in range(args.n_layers):  # name the first missing stack as the upload has it
            for w in ("w1", "w2", "w3"):
                if f"layers.{layer}.feed_forward.experts.0.{w}.weight" not in sources:
                    raise FormatError(root, f"layers.{layer}.block_sparse_moe.{w}: missing, "
                                            f"{basis} shape {[e_n * hid, dim]}")
    tensors = _canonical(args, sources, basis, root, display=_stacked_name, transforms=transforms,
                         rename=lambda n: n.replace(".block_sparse_moe.gate.", ".feed_forward.gate."))
    return Layout("hf-stacked", root, args, files, tensors, tokenizer)


# --- validation ----------------------------------------------------------------------------------

def _merge(files: list[Path], reader: Callable[[Path], dict[str, TensorRef]]) -> dict[str, TensorRef]:
    """All files' tensors by source name; a name in two files is an error."""
    out: dict[str, TensorRef] = {}
    for path in files:
        for name, ref in reader(path).items():
            if name in out:
                raise FormatError(path, f"{name}: also in {out[name].path.name}")
            out[name] = ref
    return out


def _canonical(args: ModelArgs, sources: dict[str, TensorRef], basis: str, where: Path,
               rename: Callable[[str], str | None] = lambda n: n, display: Callable[[str], str] = lambda n: n,
               skip: Callable[[str], bool] = lambda n: False,
               transforms: dict[str, RowOrder | Transpose] | None = None) -> dict[str, CanonTensor]:
    """Canonical tensors in checkpoint order, checking names and shapes. A source name maps to the
    canonical one through rename; display names a missing canonical tensor as the source would."""
    if args.tensor_count() > len(sources):  # a tensor is missing (or the params lie): name the first
        canon = {rename(n) for n in sources}
        name, shape = args.missing(canon, 1)[0]
        raise FormatError(where, f"{display(name)}: missing, {basis} shape {list(shape)}")
    expected = dict(args.tensor_shapes())
    transforms = transforms or {}
    found: dict[str, tuple[str, TensorRef]] = {}
    for name, ref in sources.items():
        canon = rename(name)
        if canon not in expected:
            if skip(name):
                continue
            raise FormatError(ref.path, f"{name}: unexpected tensor (not in the model {basis.split()[0]} describes)")
        if ref.shape != expected[canon]:
            raise FormatError(ref.path, f"{name}: shape {list(ref.shape)}, {basis} {list(expected[canon])}")
        if canon in found:
            raise FormatError(ref.path, f"{name}: a second copy of {found[canon][0]}")
        found[canon] = (name, ref)
    out = {}
    for canon, shape in expected.items():
        if canon not in found:
            raise FormatError(where, f"{display(canon)}: missing, {basis} shape {list(shape)}")
        name, ref = found[canon]
        out[canon] = CanonTensor(canon, ref.dtype, shape, ref, transforms.get(name))
    return out


def _stacked_name(canon: str) -> str:
    """The stacked upload's name for a canonical tensor."""
    m = re.fullmatch(r"layers\.([0-9]+)\.feed_forward\.gate\.weight", canon)
    return f"layers.{m[1]}.block_sparse_moe.gate.weight" if m else canon
