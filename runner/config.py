"""Model hyper-parameters read from Mistral's params.json, and the tensors they imply."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weightswarm.errors import FormatError
from weightswarm.jsonfile import read_json

# Mixtral's params.json omits rope_theta although the model was trained with 1e6; dense Mistral uses 1e4.
MOE_ROPE_THETA = 1e6
DENSE_ROPE_THETA = 1e4

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
    def from_dict(cls, d: dict, path: str | Path = "params.json") -> "ModelArgs":
        if not isinstance(d, dict):
            raise FormatError(path, "params must be a JSON object")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise FormatError(path, f"missing key(s): {', '.join(missing)}")
        moe = d.get("moe")
        try:
            args = cls(
                **{k: (float(d[k]) if k == "norm_eps" else int(d[k])) for k in _REQUIRED},
                moe=MoeArgs(int(moe["num_experts"]), int(moe["num_experts_per_tok"])) if moe else None,
                rope_theta=float(d["rope_theta"]) if d.get("rope_theta") is not None else None,
                sliding_window=int(d["sliding_window"]) if d.get("sliding_window") else None,
            )
        except (TypeError, ValueError, KeyError) as e:
            raise FormatError(path, f"bad value: {e}") from None
        args.check(path)
        return args

    @classmethod
    def load(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(read_json(path), path)

    def check(self, path: str | Path = "params.json") -> None:
        ints = [getattr(self, k) for k in _REQUIRED if k != "norm_eps"]
        if any(v <= 0 for v in ints):
            raise FormatError(path, "dimensions must be positive")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(path, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise FormatError(path, f"head_dim {self.head_dim} must be even for RoPE")
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

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the Mistral-named state dict and its shape, in checkpoint order."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab_size, self.dim)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "attention.wq.weight"] = (q, self.dim)
            shapes[p + "attention.wk.weight"] = (kv, self.dim)
            shapes[p + "attention.wv.weight"] = (kv, self.dim)
            shapes[p + "attention.wo.weight"] = (self.dim, q)
            shapes[p + "attention_norm.weight"] = (self.dim,)
            shapes[p + "ffn_norm.weight"] = (self.dim,)
            if self.moe:
                shapes[p + "feed_forward.gate.weight"] = (self.moe.num_experts, self.dim)
                for e in range(self.moe.num_experts):
                    shapes.update(_ffn(f"{p}feed_forward.experts.{e}.", self.dim, self.hidden_dim))
            else:
                shapes.update(_ffn(f"{p}feed_forward.", self.dim, self.hidden_dim))
        shapes["norm.weight"] = (self.dim,)
        shapes["output.weight"] = (self.vocab_size, self.dim)
        return shapes


def _ffn(prefix: str, dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "w1.weight": (hidden, dim), prefix + "w2.weight": (dim, hidden), prefix + "w3.weight": (hidden, dim)}
