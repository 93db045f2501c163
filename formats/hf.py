"""The Hugging Face side of a Mixtral checkpoint: tensor names, the q/k row order, and config.json.

transformers' Mixtral rotates query and key halves (``rotate_half``) where Mistral rotates interleaved
pairs, so HF checkpoints store wq/wk rows permuted. The permutation is a reordering of whole rows, done
here on raw bytes: no torch, the same bytes on every machine.
"""
from __future__ import annotations

import os
import re

from weightswarm.core.errors import FormatError
from weightswarm.formats.dtypes import FLOAT_NAMES
from weightswarm.formats.params import ModelArgs

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


def heads_of(name: str, args: ModelArgs) -> int | None:
    """The heads whose rows a Mistral-named wq/wk tensor holds (None for every other tensor)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def hf_row_order(rows: int, heads: int, to_hf: bool) -> list[int]:
    """For each row of the result, the row of the input it comes from.

    Mistral's row h*2*P + 2*i + j (head h, pair i, half j) is HF's row h*2*P + j*P + i, P = rows/heads/2."""
    half = rows // heads // 2
    order = [0] * rows
    for h in range(heads):
        for i in range(half):
            for j in (0, 1):
                mistral, hf = h * 2 * half + 2 * i + j, h * 2 * half + j * half + i
                order[hf if to_hf else mistral] = mistral if to_hf else hf
    return order


def reorder_rows(data, rows: int, order: list[int]) -> bytearray:
    """The rows of a C-order matrix in the given order (order[k]: the input row that becomes row k)."""
    src = memoryview(data).cast("B")
    n = src.nbytes // rows if rows else 0
    out = bytearray(src.nbytes)
    for dst, row in enumerate(order):
        out[dst * n:(dst + 1) * n] = src[row * n:(row + 1) * n]
    return out


# --- config.json <-> params ----------------------------------------------------------------------

_TORCH_NAME = {code: name for name, code in FLOAT_NAMES.items()}


def params_from_hf_config(config: dict, path: str | os.PathLike = "config.json") -> ModelArgs:
    """ModelArgs from a Mixtral (or dense Mistral) config.json; rope theta from rope_parameters or rope_theta."""
    if not isinstance(config, dict):
        raise FormatError(path, "config must be a JSON object")
    if config.get("model_type") not in ("mixtral", "mistral"):
        raise FormatError(path, f"model_type {config.get('model_type')!r:.40} is not mixtral or mistral")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise FormatError(path, f"RoPE scaling {rope!r:.80} has no Mistral params.json equivalent")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    try:
        heads = config["num_attention_heads"]
        experts = config.get("num_local_experts")
        d = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
             "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
             "hidden_dim": config["intermediate_size"], "n_heads": heads,
             "n_kv_heads": config.get("num_key_value_heads") or heads, "norm_eps": config.get("rms_norm_eps", 1e-5),
             "vocab_size": config["vocab_size"], "rope_theta": theta, "sliding_window": config.get("sliding_window")}
    except KeyError as e:
        raise FormatError(path, f"missing key {e.args[0]}") from None
    except (TypeError, ZeroDivisionError) as e:
        raise FormatError(path, f"bad value: {e}") from None
    if experts:
        d["moe"] = {"num_experts": experts, "num_experts_per_tok": config.get("num_experts_per_tok")}
    return ModelArgs.from_dict(d, path)


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
