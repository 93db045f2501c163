"""Model hyper-parameters read from Mistral's params.json, and the tensors they imply.

params.json is input like any other: every value is checked for type and range, and the tensor table it
implies is produced lazily and counted first (``tensor_count``), so ``"n_layers": 100000000`` is refused
by comparing one number with the files, not by building a table of three billion names.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from weightswarm.core.errors import FormatError
from weightswarm.core.inputs import read_json

# Mixtral's params.json omits rope_theta although the model was trained with 1e6; dense Mistral uses 1e4.
MOE_ROPE_THETA = 1e6
DENSE_ROPE_THETA = 1e4
MAX_INT = 2**31 - 1  # torch and libtorrent keep sizes in C ints here and there; no model comes near

_REQUIRED = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size")


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    moe: MoeArgs | None = None
    rope_theta: float | None = None
    sliding_window: int | None = None

    @property
    def theta(self) -> float:
        """RoPE theta, with the default the release implies when params.json leaves it out."""
        if self.rope_theta is not None:
            return self.rope_theta
        return MOE_ROPE_THETA if self.moe else DENSE_ROPE_THETA

    @classmethod
    def from_dict(cls, d: dict, path: str | os.PathLike = "params.json") -> ModelArgs:
        if not isinstance(d, dict):
            raise FormatError(path, "params must be a JSON object")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise FormatError(path, f"missing key(s): {', '.join(missing)}")
        moe = d.get("moe")
        if moe is not None and not (isinstance(moe, dict) and {"num_experts", "num_experts_per_tok"} <= set(moe)):
            raise FormatError(path, "moe must be an object with num_experts and num_experts_per_tok")
        args = cls(
            **{k: (_number(path, k, d[k]) if k == "norm_eps" else _int(path, k, d[k])) for k in _REQUIRED},
            moe=MoeArgs(_int(path, "moe.num_experts", moe["num_experts"]),
                        _int(path, "moe.num_experts_per_tok", moe["num_experts_per_tok"])) if moe else None,
            rope_theta=_number(path, "rope_theta", d["rope_theta"]) if d.get("rope_theta") is not None else None,
            sliding_window=_int(path, "sliding_window", d["sliding_window"]) if d.get("sliding_window") else None,
        )
        args.check(path)
        return args

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelArgs:
        return cls.from_dict(read_json(path), path)

    def check(self, path: str | os.PathLike = "params.json") -> None:
        for k in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            if not 0 < getattr(self, k) <= MAX_INT:
                raise FormatError(path, f"{k} must be between 1 and {MAX_INT}, not {getattr(self, k)}")
        if not (0 < self.norm_eps < 1):
            raise FormatError(path, f"norm_eps must be between 0 and 1, not {self.norm_eps}")
        if self.rope_theta is not None and not 1 < self.rope_theta < math.inf:
            raise FormatError(path, f"rope_theta must be a finite number above 1, not {self.rope_theta}")
        if self.sliding_window is not None and not 0 < self.sliding_window <= MAX_INT:
            raise FormatError(path, f"sliding_window must be between 1 and {MAX_INT}")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(path, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise FormatError(path, f"head_dim {self.head_dim} must be even for RoPE")
        if self.moe and not 0 < self.moe.num_experts <= MAX_INT:
            raise FormatError(path, f"moe.num_experts must be between 1 and {MAX_INT}")
        if self.moe and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise FormatError(path, "moe.num_experts_per_tok must be between 1 and moe.num_experts")

    def to_dict(self) -> dict:
        """params.json as Mistral writes it: optional keys only when set."""
        d = {k: getattr(self, k) for k in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads",
                                          "n_kv_heads", "norm_eps", "vocab_size")}
        if self.rope_theta is not None:
            d["rope_theta"] = self.rope_theta
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        if self.moe:
            d["moe"] = {"num_experts_per_tok": self.moe.num_experts_per_tok, "num_experts": self.moe.num_experts}
        return d

    def tensor_count(self) -> int:
        """How many tensors ``tensor_shapes`` yields, computed without listing them."""
        ffn = 1 + 3 * self.moe.num_experts if self.moe else 3
        return 3 + self.n_layers * (6 + ffn)

    def missing(self, have, limit: int = 5) -> list[tuple[str, tuple[int, ...]]]:
        """The first ``limit`` tensors these params imply that are not in ``have`` (a set of names).

        Bounded by the files, whatever the params claim: every step that is not a miss uses up one
        distinct name of ``have``, so at most len(have) + limit names are ever made."""
        out = []
        for name, shape in self.tensor_shapes():
            if name not in have:
                out.append((name, shape))
                if len(out) == limit:
                    break
        return out

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every tensor of the Mistral-named state dict and its shape, in checkpoint order, lazily: where the
        params are untrusted, list them whole only once tensor_count() is no more than the files hold."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        yield "tok_embeddings.weight", (self.vocab_size, self.dim)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            yield p + "attention.wq.weight", (q, self.dim)
            yield p + "attention.wk.weight", (kv, self.dim)
            yield p + "attention.wv.weight", (kv, self.dim)
            yield p + "attention.wo.weight", (self.dim, q)
            yield p + "attention_norm.weight", (self.dim,)
            yield p + "ffn_norm.weight", (self.dim,)
            if self.moe:
                yield p + "feed_forward.gate.weight", (self.moe.num_experts, self.dim)
                for e in range(self.moe.num_experts):
                    yield from _ffn(f"{p}feed_forward.experts.{e}.", self.dim, self.hidden_dim)
            else:
                yield from _ffn(f"{p}feed_forward.", self.dim, self.hidden_dim)
        yield "norm.weight", (self.dim,)
        yield "output.weight", (self.vocab_size, self.dim)


def _ffn(prefix: str, dim: int, hidden: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield prefix + "w1.weight", (hidden, dim)
    yield prefix + "w2.weight", (dim, hidden)
    yield prefix + "w3.weight", (hidden, dim)


def _int(path, key: str, v) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(path, f"{key} must be a whole number, not {v!r:.40}")
    return v


def _number(path, key: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise FormatError(path, f"{key} must be a finite number, not {v!r:.40}")
    return float(v)
