"""Mixtral (and dense Mistral) in plain PyTorch, the forward pass of mistral-inference and transformers'
MixtralForCausalLM: ``h = x + attention(attention_norm(x))``, ``out = h + moe(ffn_norm(h))``, then ``norm``
and ``output``; RMSNorm in float32; causal grouped-query attention with Mistral's interleaved-pair RoPE; a
router that softmaxes the top-k gate logits in float32; SwiGLU experts ``w2(silu(w1 x) * w3 x)``.

Module names are Mistral's checkpoint names, so a canonical tensor name is a state-dict key as is
(``layers.3.feed_forward.experts.5.w1.weight``) and the per-expert files map one to one onto modules.

Dimensions used in the shape comments:
    B batch             T new tokens this step       S keys in view (cached + new)     D model dim
    H query heads       K kv heads                   G = H // K query heads per kv     Hd head dim
    E experts           k experts per token          F expert (or FFN) hidden dim      V vocab
    nh heads of a tensor (H for queries, K for keys and values)
    N = B * T tokens, flattened for the experts
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weightswarm.formats.params import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 whatever the model dtype: a bf16 mean of squares over 4096 values loses too much.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(T, Hd/2) complex64: the unit rotation of each position for each frequency pair."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, Hd/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, nh, Hd) by position. Mistral pairs interleaved dims (2i, 2i+1) as one complex number,
    unlike HF's halves: the checkpoint's wq/wk rows are ordered for this. float32, as mistral-inference;
    one complex multiply is ~4x faster on CPU than the same rotation spelled out in real ops."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, nh, Hd/2)
    return torch.view_as_real(xc * freqs[:, None, :]).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every layer for positions [0, max_len), written as tokens arrive.

    Preallocated, so a decode step writes one slot instead of concatenating the whole history; with a
    sliding window the old keys stay and the mask hides them (simple, and memory is prompt + new tokens)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)  # (L, B, K, max_len, Hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already in the cache
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, K, T, Hd) at [pos, pos+T) and return every key and value so far, (B, K, S, Hd)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, freqs, mask: dict, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, Hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, Hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, Hd)
        # enable_gqa: query head h reads kv head h // G, as repeat_interleave (Mistral) and repeat_kv (HF) do.
        y = F.scaled_dot_product_attention(q, k, v, **mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). One expert, or the whole FFN of a dense model."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # Plain functions on the weights, in place, output written straight into the caller's buffer: a MoE
        # layer makes 3 calls per expert on few tokens each, where per-call overhead shows on CPU.
        h = F.silu(F.linear(x, self.w1.weight)).mul_(F.linear(x, self.w3.weight))  # (..., F)
        return torch.matmul(h, self.w2.weight.t(), out=out)  # (..., D)


class MoE(nn.Module):
    """Top-k router over E SwiGLU experts, each kept as its own module (its own file's tensors)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))
        # When a list, every forward appends (tokens per expert (E,), max |sum of weights - 1|): for smoke.
        self.record: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> weights (N, k) float32 and expert ids (N, k): softmax over the k largest logits."""
        top, experts = torch.topk(self.gate(x), self.k, dim=-1)  # (N, k)
        return F.softmax(top.float(), dim=-1), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, experts = self.route(x)
        # Group the N*k (token, slot) pairs by expert, so each expert runs once on all its tokens.
        flat = experts.flatten()  # (N*k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts))  # (E,)
        tokens = order // self.k  # the token of each pair, pairs sorted by expert
        if self.record is not None:
            self.record.append((counts, (weights.sum(-1) - 1).abs().max()))
        ys = x.new_empty((len(flat), shape[-1]))  # (N*k, D) expert outputs, by expert
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync per layer, not one per expert
            if n:
                self.experts[e](x[tokens[start:start + n]], out=ys[start:start + n])
            start += n
        pairs = torch.empty_like(ys)
        pairs[order] = ys  # back to (token, slot) order: (N*k, D)
        # Weighted sum over the k experts in float32, rounded once (transformers' grouped path does the same).
        out = (pairs.view(-1, self.k, shape[-1]) * weights[..., None]).sum(1)  # (N, D) float32
        return out.type_as(x).view(shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = MoE(args) if args.moe else FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs, mask: dict, cache: KVCache | None, layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, mask, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V) in the model dtype (as transformers returns them; cast to float32
    to sample). With a cache, the tokens continue what it holds."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Weights are always loaded: skip Embedding's normal_ init (on the meta device its first call
        # imports torch's Python decompositions, ~1 s of every cold start).
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"{start + T} tokens do not fit a cache of {cache.max_len}")
        positions = torch.arange(start, start + T, device=tokens.device)
        freqs = rope_freqs(positions, self.args.head_dim, self.args.theta)  # (T, Hd/2), shared by every layer
        mask = attention_mask(start, T, self.args.sliding_window, tokens.device)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, mask, cache, i)
        if cache is not None:
            cache.pos += T
        if last_only:  # generation needs only the next token's logits: skip T-1 rows of the largest matmul
            h = h[:, -1:]
        return self.output(self.norm(h))  # (B, T, V), or (B, 1, V) with last_only

    def moe_layers(self) -> list[MoE]:
        return [b.feed_forward for b in self.layers if isinstance(b.feed_forward, MoE)]


def attention_mask(start: int, T: int, window: int | None, device) -> dict:
    """scaled_dot_product_attention's mask arguments for queries at [start, start+T) over keys [0, start+T).

    Query i sees key j when j <= i and, with a sliding window W, i - W < j (W keys, itself included, as
    transformers applies it). The common cases need no mask tensor, which keeps the fused kernels."""
    S = start + T
    if window is None or window >= S:
        if T == 1:
            return {}  # one query sees every key
        if start == 0:
            return {"is_causal": True}
    i = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    j = torch.arange(S, device=device)[None, :]  # (1, S)
    ok = j <= i
    if window is not None:
        ok &= j > i - window
    return {"attn_mask": ok}  # (T, S) bool, True where attention is allowed
