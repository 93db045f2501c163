"""The checkpoint layouts a converter meets, seen as one canonical (Mistral-named) set of tensors.

open_layout(src) detects the layout, checks every tensor's presence and shape against the params
(reading headers and pickles only) and gives each canonical tensor a load() that reads only its bytes.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from runner.config import ModelArgs, MoeArgs
from runner.tensorfile import FLOAT_NAMES, TensorRef, safetensors_refs, torch_zip_refs
from verify.splits import split_parts
from verify.structure import ITEMSIZE
from weightswarm.errors import FormatError
from weightswarm.jsonfile import read_json

KINDS = ("consolidated-pth", "consolidated-safetensors", "hf", "hf-stacked")
HINT = ("expected one of: consolidated.00.pth (or its -splitN parts) + params.json; consolidated.safetensors "
        "+ params.json; config.json + model.safetensors.index.json and its shards, or model.safetensors; "
        "consolidated.0N.pt with stacked experts; or the per-expert layout of weightswarm convert")
_STACKED_FILE = re.compile(r"^consolidated\.[0-9]{2}\.pt$")


@dataclass(frozen=True)
class CanonTensor:
    name: str  # canonical Mistral name
    dtype: str  # safetensors code of the source tensor
    shape: tuple[int, ...]  # canonical shape
    load: Callable[[], torch.Tensor]  # reads only this tensor's bytes; canonical orientation
    ref: TensorRef | None = None  # set when the stored bytes are the canonical tensor as is (can be mapped)

    @property
    def nbytes(self) -> int:
        """Size of the loaded tensor in bytes (source dtype, canonical shape)."""
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Layout:
    kind: str
    root: Path
    params: ModelArgs
    files: list[Path]  # source weight files; split parts themselves (in part order) when split
    tensors: dict[str, CanonTensor]  # in ModelArgs.tensor_shapes() order
    tokenizer: Path | None


# --- names and the q/k permutation ---------------------------------------------------------------

_HF_FIXED = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
_HF_LAYER = {"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
             "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
             "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
             # dense Mistral (no experts)
             "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
             "mlp.up_proj.weight": "feed_forward.w3.weight"}
_HF_EXPERT = re.compile(r"^block_sparse_moe\.experts\.([0-9]+)\.(w[123])\.weight$")
_MI_EXPERT = re.compile(r"^feed_forward\.experts\.([0-9]+)\.(w[123])\.weight$")
_LAYER = re.compile(r"^(model\.)?layers\.([0-9]+)\.(.+)$")


def hf_to_mistral(name: str) -> str | None:
    """The Mistral name of a Hugging Face tensor name, or None for a name HF's Mixtral/Mistral never has."""
    if name in _HF_FIXED:
        return _HF_FIXED[name]
    m = _LAYER.match(name)
    if not m or not m[1]:
        return None
    layer, rest = m[2], m[3]
    if rest in _HF_LAYER:
        return f"layers.{layer}.{_HF_LAYER[rest]}"
    e = _HF_EXPERT.match(rest)
    return f"layers.{layer}.feed_forward.experts.{e[1]}.{e[2]}.weight" if e else None


def mistral_to_hf(name: str) -> str | None:
    """The Hugging Face name of a Mistral tensor name, or None for an unknown name."""
    inverse = {v: k for k, v in _HF_FIXED.items()}
    if name in inverse:
        return inverse[name]
    m = _LAYER.match(name)
    if not m or m[1]:
        return None
    layer, rest = m[2], m[3]
    for hf, mi in _HF_LAYER.items():
        if rest == mi:
            return f"model.layers.{layer}.{hf}"
    e = _MI_EXPERT.match(rest)
    return f"model.layers.{layer}.block_sparse_moe.experts.{e[1]}.{e[2]}.weight" if e else None


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral's wq/wk rows (interleaved RoPE pairs) -> HF's q_proj/k_proj rows (rotate_half halves)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_for_hf."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim).contiguous()


# --- config.json <-> params ----------------------------------------------------------------------

_TORCH_NAME = {code: name for name, code in FLOAT_NAMES.items()}


def params_from_hf_config(config: dict, path: str | os.PathLike = "config.json") -> ModelArgs:
    """ModelArgs from a Mixtral (or dense Mistral) config.json; rope theta from rope_parameters or rope_theta."""
    if not isinstance(config, dict):
        raise FormatError(path, "config must be a JSON object")
    if config.get("model_type") not in ("mixtral", "mistral"):
        raise FormatError(path, f"model_type {config.get('model_type')!r} is not mixtral or mistral")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise FormatError(path, f"RoPE scaling {rope!r} has no Mistral params.json equivalent")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    try:
        heads = int(config["num_attention_heads"])
        experts = config.get("num_local_experts")
        args = ModelArgs(
            dim=int(config["hidden_size"]), n_layers=int(config["num_hidden_layers"]),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            hidden_dim=int(config["intermediate_size"]), n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)), vocab_size=int(config["vocab_size"]),
            moe=MoeArgs(int(experts), int(config["num_experts_per_tok"])) if experts else None,
            rope_theta=float(theta) if theta is not None else None,
            sliding_window=int(config["sliding_window"]) if config.get("sliding_window") else None)
    except KeyError as e:
        raise FormatError(path, f"missing key {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(path, f"bad value: {e}") from None
    args.check(path)
    return args


def hf_config_from_params(args: ModelArgs, dtype: str) -> dict:
    """A config.json for transformers (5.x, and the older top-level rope_theta) describing args."""
    cfg = {
        "architectures": ["MixtralForCausalLM" if args.moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.moe else "mistral",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        "rope_theta": args.theta, "rope_parameters": {"rope_theta": args.theta, "rope_type": "default"},
        "sliding_window": args.sliding_window, "max_position_embeddings": 32768, "tie_word_embeddings": False,
        "torch_dtype": _TORCH_NAME.get(dtype, dtype), "dtype": _TORCH_NAME.get(dtype, dtype),
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if args.moe:
        cfg["num_local_experts"] = args.moe.num_experts
        cfg["num_experts_per_tok"] = args.moe.num_experts_per_tok
    return cfg


# --- detection -----------------------------------------------------------------------------------

def open_layout(src: str | os.PathLike) -> Layout:
    """Detect and validate the checkpoint in folder src (no tensor bytes are read). Raises FormatError."""
    root = Path(src)
    if not root.is_dir():
        raise FormatError(root, "not a folder" if root.exists() else "no such folder",
                          hint="give the folder that holds the checkpoint")
    tokenizer = root / "tokenizer.model"
    tokenizer = tokenizer if tokenizer.is_file() else None
    # HF repos may carry consolidated files too; without params.json beside them, the HF files win.
    hf = (root / "config.json").is_file() and ((root / "model.safetensors.index.json").is_file()
                                               or (root / "model.safetensors").is_file())
    consolidated_ok = (root / "params.json").is_file() or not hf
    if (root / "dense.safetensors").is_file():
        return _open_per_expert(root, tokenizer)
    pth = root / "consolidated.00.pth"
    parts = [] if pth.is_file() else split_parts(pth)
    if (pth.is_file() or parts) and consolidated_ok:
        args = _params(root / "params.json")
        refs, basis = torch_zip_refs(pth), "params.json implies"
        tensors = _canonical(args, {n: (r, _direct(r)) for n, r in refs.items()}, basis, pth)
        return Layout("consolidated-pth", root, args, parts or [pth], tensors, tokenizer)
    st = root / "consolidated.safetensors"
    if st.is_file() and consolidated_ok:
        args = _params(root / "params.json")
        refs = safetensors_refs(st)
        tensors = _canonical(args, {n: (r, _direct(r)) for n, r in refs.items()}, "params.json implies", st)
        return Layout("consolidated-safetensors", root, args, [st], tensors, tokenizer)
    if hf:
        return _open_hf(root, tokenizer)
    stacked = sorted(p for p in root.iterdir() if _STACKED_FILE.match(p.name) and p.is_file())
    if stacked:
        return _open_stacked(root, stacked, tokenizer)
    what = "the folder is empty" if not any(root.iterdir()) else "no known checkpoint layout"
    raise FormatError(root, what, hint=HINT)


def _open_per_expert(root: Path, tokenizer: Path | None) -> Layout:
    """weightswarm's own layout (FORMAT.md): dense.safetensors plus one file per expert (or layer and expert)."""
    args = _params(root / "params.json")
    files = [root / "dense.safetensors"] + sorted((root / "experts").rglob("*.safetensors"))
    refs = _merge(files, safetensors_refs)
    tensors = _canonical(args, {n: (r, _direct(r)) for n, r in refs.items()}, "params.json implies",
                         root / "experts")
    return Layout("per-expert", root, args, files, tensors, tokenizer)


def _params(path: Path) -> ModelArgs:
    if not path.is_file():
        raise FormatError(path, "no such file", hint="a consolidated checkpoint needs the params.json it came with")
    return ModelArgs.load(path)


def _open_hf(root: Path, tokenizer: Path | None) -> Layout:
    args = params_from_hf_config(read_json(root / "config.json"), root / "config.json")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise FormatError(index, "weight_map must map tensor names to shard file names")
        files = []
        for shard in sorted(set(wmap.values())):
            if "/" in shard or "\\" in shard or shard.startswith("."):  # the index is untrusted
                raise FormatError(index, f"shard name {shard!r} is not a plain file name")
            if not (root / shard).is_file():
                raise FormatError(root / shard, f"listed in {index.name} but missing")
            files.append(root / shard)
    else:
        wmap, files = None, [root / "model.safetensors"]
    refs = _merge(files, safetensors_refs)
    if wmap is not None:
        for name, shard in wmap.items():
            if name not in refs or refs[name].path.name != shard:
                raise FormatError(root / shard, f"{name}: listed in {index.name} but not in this file")
        for name, ref in refs.items():
            if name not in wmap:
                raise FormatError(ref.path, f"{name}: not listed in {index.name}")
    sources = {}
    for name, ref in refs.items():
        load = _direct(ref)
        if name.endswith((".q_proj.weight", ".k_proj.weight")):
            heads = args.n_heads if name.endswith("q_proj.weight") else args.n_kv_heads
            load = _unpermuted(ref, heads)
        sources[name] = (ref, load)
    tensors = _canonical(args, sources, "config.json implies", index if wmap is not None else files[0],
                         rename=hf_to_mistral, display=mistral_to_hf,
                         skip=lambda n: n.endswith("rotary_emb.inv_freq"))
    return Layout("hf", root, args, files, tensors, tokenizer)


def _open_stacked(root: Path, files: list[Path], tokenizer: Path | None) -> Layout:
    refs = _merge(files, torch_zip_refs)
    if not any(re.fullmatch(r"layers\.[0-9]+\.block_sparse_moe\.w1", n) for n in refs):
        raise FormatError(root, "consolidated.0N.pt files without stacked experts (layers.N.block_sparse_moe.w1)",
                          hint=HINT)
    if (root / "params.json").is_file():
        args, basis = ModelArgs.load(root / "params.json"), "params.json implies"
    elif (root / "config.json").is_file():
        args = params_from_hf_config(read_json(root / "config.json"), root / "config.json")
        basis = "config.json implies"
    else:
        raise FormatError(root / "params.json", "no such file (nor config.json)",
                          hint="stacked checkpoints need params.json or config.json beside them")
    if not args.moe:
        raise FormatError(root, "stacked experts, but the params describe a model without experts")
    e_n, hid, expected = args.moe.num_experts, args.hidden_dim, args.tensor_shapes()
    sources: dict[str, tuple] = {}
    expert_parts: dict[str, tuple] = {}  # canonical expert name -> (stacked ref, loader)
    for name, ref in refs.items():
        m = re.fullmatch(r"layers\.([0-9]+)\.block_sparse_moe\.(w[123])", name)
        if m and f"layers.{m[1]}.feed_forward.gate.weight" not in expected:
            raise FormatError(ref.path, f"{name}: unexpected tensor (not in the model {basis.split()[0]} describes)")
        if m:
            if ref.shape != (e_n * hid, args.dim):
                raise FormatError(ref.path, f"{name}: shape {list(ref.shape)}, {basis} {[e_n * hid, args.dim]}")
            for e in range(e_n):
                canon = f"layers.{m[1]}.feed_forward.experts.{e}.{m[2]}.weight"
                expert_parts[canon] = (ref, _expert_rows(ref, e * hid, (e + 1) * hid, m[2] == "w2"))
            continue
        sources[name] = (ref, _direct(ref))
    for layer in range(args.n_layers):  # missing stacks, named and shaped as the upload has them
        for w in ("w1", "w2", "w3"):
            if f"layers.{layer}.feed_forward.experts.0.{w}.weight" not in expert_parts:
                raise FormatError(root, f"layers.{layer}.block_sparse_moe.{w}: missing, "
                                        f"{basis} shape {[e_n * hid, args.dim]}")
    tensors = _canonical(args, sources, basis, root, stacked=expert_parts, display=_stacked_name,
                         rename=lambda n: n.replace(".block_sparse_moe.gate.", ".feed_forward.gate."))
    return Layout("hf-stacked", root, args, files, tensors, tokenizer)


# --- validation and loaders ----------------------------------------------------------------------

def _merge(files: list[Path], reader: Callable[[Path], dict[str, TensorRef]]) -> dict[str, TensorRef]:
    """All files' tensors by source name; a name in two files is an error."""
    out: dict[str, TensorRef] = {}
    for path in files:
        for name, ref in reader(path).items():
            if name in out:
                raise FormatError(path, f"{name}: also in {out[name].path.name}")
            out[name] = ref
    return out


def _canonical(args: ModelArgs, sources: dict[str, tuple[TensorRef, Callable]], basis: str, where: Path,
               rename: Callable[[str], str | None] = lambda n: n, display: Callable[[str], str] = lambda n: n,
               skip: Callable[[str], bool] = lambda n: False,
               stacked: dict[str, tuple[TensorRef, Callable]] | None = None) -> dict[str, CanonTensor]:
    """Canonical tensors in checkpoint order, checking names and shapes. A source name maps to the
    canonical one through rename (shapes agree, since the q/k permutation keeps them); display names
    a missing canonical tensor as the source would."""
    expected = args.tensor_shapes()
    found: dict[str, tuple[TensorRef, Callable]] = dict(stacked or {})
    for name, (ref, load) in sources.items():
        canon = rename(name)
        if canon not in expected:
            if skip(name):
                continue
            raise FormatError(ref.path, f"{name}: unexpected tensor (not in the model {basis.split()[0]} describes)")
        if ref.shape != expected[canon]:
            raise FormatError(ref.path, f"{name}: shape {list(ref.shape)}, {basis} {list(expected[canon])}")
        if canon in found:
            raise FormatError(ref.path, f"{name}: a second copy of {found[canon][0].name}")
        found[canon] = (ref, load)
    out = {}
    for canon, shape in expected.items():
        if canon not in found:
            raise FormatError(where, f"{display(canon)}: missing, {basis} shape {list(shape)}")
        ref, load = found[canon]
        # A bare ref.tensor loader (_direct) means no transform: the ref's bytes are the canonical tensor.
        out[canon] = CanonTensor(canon, ref.dtype, shape, load, ref if load == ref.tensor else None)
    return out


def _stacked_name(canon: str) -> str:
    """The stacked upload's name for a canonical tensor."""
    m = re.fullmatch(r"layers\.([0-9]+)\.feed_forward\.gate\.weight", canon)
    return f"layers.{m[1]}.block_sparse_moe.gate.weight" if m else canon


def _direct(ref: TensorRef) -> Callable[[], torch.Tensor]:
    return ref.tensor


def _unpermuted(ref: TensorRef, heads: int) -> Callable[[], torch.Tensor]:
    return lambda: unpermute_from_hf(ref.tensor(), heads)


def _expert_rows(ref: TensorRef, start: int, stop: int, transposed: bool) -> Callable[[], torch.Tensor]:
    """One expert's block of a stacked tensor; w2 is stored transposed ([hidden, dim] per expert)."""
    if transposed:
        return lambda: ref.tensor((start, stop)).t().contiguous()
    return lambda: ref.tensor((start, stop))
