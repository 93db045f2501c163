"""Text generation: one prefill of the prompt into the KV cache, then one forward per new token."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from weightswarm.runner.model import KVCache, Transformer


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    logits: torch.Tensor | None  # (P + n - 1, V) float32 on CPU: the logits at every position fed, if kept
    prefill_seconds: float  # the prompt's forward, including the first token's choice
    decode_seconds: float  # every later token


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token from (V,) float32 logits: argmax when temperature is 0, else from the top-p nucleus."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, ids = probs.sort(descending=True)
        p = p * (p.cumsum(0) - p < top_p)  # keep tokens until the mass before them reaches top_p
        return int(ids[torch.multinomial(p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time the work, not the launches


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, keep_logits: bool = False) -> Generation:
    """Greedy (temperature 0) or sampled continuation of prompt (token ids), seeded; stops at eos_id."""
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    param = model.output.weight
    device = param.device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.args, 1, len(prompt) + max_new_tokens, device, param.dtype)
    kept: list[torch.Tensor] = []
    new: list[int] = []

    _sync(device)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), cache, last_only=not keep_logits)[0]  # (P or 1, V)
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(logits.float().cpu())
        token = sample(logits[-1].float(), temperature, top_p, generator)  # .item() inside: a host sync
        new.append(token)
        if step == 0:
            t1 = time.perf_counter()
        if token == eos_id or step == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[token]], device=device), cache)[0]  # (1, V)
    _sync(device)
    t2 = time.perf_counter()
    if not new:
        t1 = t2
    return Generation(new, torch.cat(kept) if keep_logits and kept else None, t1 - t0, t2 - t1)
