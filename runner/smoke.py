"""`weightswarm smoke MODEL_DIR`: generate from a fixed prompt and prove the assembled model is right.

Checks, each reported with its numbers:
- the KV-cache decode gives the logits of a full forward pass over the same tokens (within rounding);
- the router's weights sum to one for every token of every layer;
- with a reference checkpoint (any layout), its logits on the same tokens. In float32 both models hold
  private, aligned copies of their weights, so they are the same tensors through the same ops on the same
  memory layout and must agree bit for bit on any CPU. In other dtypes the weights stay memory-mapped where
  the files put them (a 93 GB model need not fit in RAM twice), kernels may round differently for other
  alignments, and the logits must agree within a bound, with the same top-1 token wherever the reference's
  top two are further apart than that bound.
The models run one after the other, so only one is ever in memory.
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from weightswarm.core.errors import InputError, OptionError
from weightswarm.runner.generate import generate
from weightswarm.runner.load import build_model, load_model, open_checked, resolve_device, resolve_dtype, torch_dtype
from weightswarm.runner.model import Transformer
from weightswarm.runner.tokenizer import Tokenizer, printable

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_NEW_TOKENS = 16
# KV-cache vs full forward: allowed max |diff|, relative to the largest |logit|. The two paths multiply
# matrices of different shapes, so they round differently: ~1e-6 in float32, a few bf16 ulps otherwise.
KV_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
WEIGHT_SUM_TOLERANCE = 1e-5  # the routing weights are a float32 softmax
# Reference in bf16/f16 (the float32 check is exact): allowed max |diff| relative to the largest |logit|.
# The same tensors through the same ops; only the kernels' rounding may differ, by a few ulps of the dtype
# (bf16 has 8 bits, 2**-8 = 0.004) per rounding step: 1e-2 holds that and is far below what a wrong tensor does.
REFERENCE_TOLERANCE = 1e-2


def parse_tokens(text: str) -> list[int]:
    """``--tokens 1,2,3`` -> [1, 2, 3]."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError("--tokens", text, "not a comma-separated list of token ids (e.g. 1,415,2936)") from None
    if not ids:
        raise OptionError("--tokens", text, "no token ids given")
    return ids


def _prompt(model_dir: Path, tokenizer: Path | None, vocab: int, prompt: str | None,
            tokens: list[int] | None) -> tuple[list[int], Tokenizer | None]:
    """The prompt's token ids, and the tokenizer when the folder has tokenizer.model."""
    if prompt is not None and tokens is not None:
        raise OptionError("--tokens", ",".join(map(str, tokens)), "give a prompt or token ids, not both")
    tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tokens is None:
        if tok is None:
            raise InputError(model_dir / "tokenizer.model", "no such file, so a text prompt cannot be encoded",
                             hint="give token ids instead, e.g. --tokens 1,415,2936")
        tokens = tok.encode(DEFAULT_PROMPT if prompt is None else prompt)
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise OptionError("--tokens", ",".join(map(str, tokens)), f"token id(s) {bad[:5]} outside the vocabulary "
                          f"[0, {vocab})")
    return list(tokens), tok


def smoke(model_dir, prompt: str | None = None, tokens: list[int] | None = None,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, reference=None, device: str = "cpu",
          dtype: str | None = None, seed: int = 0, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """Run the smoke test on model_dir (any layout; dtype None keeps the checkpoint's) and return its
    report as a JSON-ready dict; "passed" is the verdict. Raises InputError/FormatError on bad input or
    a missing or broken weight file."""
    model_dir = Path(model_dir)
    if max_new_tokens < 1:
        raise OptionError("--max-new-tokens", max_new_tokens, "must be at least 1")
    device = resolve_device(device)
    t0 = time.perf_counter()
    layout = open_checked(model_dir)
    run_dtype = resolve_dtype(dtype) or torch_dtype(layout.tensors["output.weight"].dtype)
    exact = reference is not None and run_dtype == torch.float32  # see the module docstring
    model = build_model(layout, device, run_dtype, copy=exact)
    load_seconds = time.perf_counter() - t0
    ids, tok = _prompt(model_dir, layout.tokenizer, layout.params.vocab_size, prompt, tokens)

    moe = model.moe_layers()
    for m in moe:
        m.record = []
    gen = generate(model, ids, max_new_tokens, temperature, top_p, seed, keep_logits=True)
    routing = [torch.stack([c for c, _ in m.record]).sum(0).tolist() for m in moe]
    weight_error = max((float(e) for m in moe for _, e in m.record), default=0.0)
    for m in moe:
        m.record = None

    seq = ids + gen.tokens[:-1]  # every token the cached run fed, in one full forward
    full = _logits(model, seq, device)
    scale = max(float(full.abs().max()), 1.0)
    kv_diff = float((full - gen.logits).abs().max())
    kv_tol = KV_TOLERANCE[run_dtype] * scale
    n = len(gen.tokens)
    result = {
        "model": str(model_dir), "layout": layout.kind, "device": str(device),
        "dtype": str(run_dtype).removeprefix("torch."),
        "prompt": (DEFAULT_PROMPT if prompt is None else prompt) if tokens is None else None,  # text, if any
        "prompt_tokens": ids, "generated_tokens": gen.tokens,
        "load_seconds": load_seconds, "prefill_seconds": gen.prefill_seconds, "decode_seconds": gen.decode_seconds,
        "prefill_tokens_per_second": len(ids) / gen.prefill_seconds if gen.prefill_seconds else None,
        # Decode speed: the first token comes out of the prefill, so it is not counted here.
        "tokens_per_second": (n - 1) / gen.decode_seconds if n > 1 and gen.decode_seconds else None,
        "routing_counts": routing,  # [layer][expert]: (token, slot) pairs routed there, prefill + decode
        "checks": {
            "kv_cache": {"max_abs_diff": kv_diff, "tolerance": kv_tol, "positions": len(seq),
                         "passed": kv_diff <= kv_tol},
            "routing_weights": {"max_error": weight_error, "tolerance": WEIGHT_SUM_TOLERANCE,
                                "passed": weight_error <= WEIGHT_SUM_TOLERANCE},
        },
    }
    if tok is not None:
        result["text"] = tok.decode(gen.tokens)  # bytes that are not (yet) valid UTF-8 shown escaped
    if reference is not None:
        del model, gen
        _free(device)
        result["checks"]["reference"] = _compare(Path(reference), layout.params, seq, full, device, run_dtype,
                                                 exact)
        result["max_abs_diff"] = result["checks"]["reference"]["max_abs_diff"]
        result["top1_agreement"] = result["checks"]["reference"]["top1_agreement"]
    result["passed"] = all(c["passed"] for c in result["checks"].values())
    return result


def _logits(model: Transformer, seq: list[int], device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([seq], device=device))[0].float().cpu()  # (len(seq), V)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare(reference: Path, params, seq: list[int], full: torch.Tensor, device, dtype, exact: bool) -> dict:
    ref_model, ref_layout = load_model(reference, device, dtype, copy=exact)
    # Same model whatever the layout says about rope_theta: Mixtral's params.json omits it (1e6 implied).
    if replace(ref_layout.params, rope_theta=ref_layout.params.theta) != replace(params, rope_theta=params.theta):
        raise InputError(reference, f"a different model: {ref_layout.params} vs {params}")
    ref = _logits(ref_model, seq, device)
    del ref_model
    _free(device)
    diff = float((full - ref).abs().max())
    tol = 0.0 if exact else REFERENCE_TOLERANCE * max(float(ref.abs().max()), 1.0)
    agree = full.argmax(-1) == ref.argmax(-1)  # (positions,)
    top2 = ref.topk(2, dim=-1).values  # (positions, 2)
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol  # where rounding within the bound cannot swap the top token
    return {"source": str(reference), "layout": ref_layout.kind, "positions": len(seq),
            "max_abs_diff": diff, "tolerance": tol, "exact": exact,
            "comparison": "bit for bit (aligned copies, same ops on the same memory layout)" if exact
            else "within the bound (memory-mapped weights)",
            "top1_agreement": float(agree.float().mean()),
            "passed": diff <= tol and bool(agree[clear].all())}


def print_report(r: dict, file=None) -> None:
    """The human-readable form of a smoke() result."""
    out = file or sys.stdout

    def line(label: str, text: str) -> None:
        print(f"{label:<9}{text}", file=out)

    line("model", f"{r['model']} ({r['layout']}, {r['dtype']} on {r['device']}, loaded in {r['load_seconds']:.2f} s)")
    prompt = f"{r['prompt']!r}, " if r.get("prompt") is not None else ""
    line("prompt", f"{prompt}{len(r['prompt_tokens'])} tokens: {_ids(r['prompt_tokens'])}")
    if "text" in r:
        line("output", printable(r["text"]))
    line("tokens", _ids(r["generated_tokens"]))
    decode = f"{r['tokens_per_second']:.1f} tokens/s" if r["tokens_per_second"] else "-"
    line("speed", f"prefill {len(r['prompt_tokens'])} tokens in {r['prefill_seconds']:.3f} s; decode {decode}")
    if r["routing_counts"]:
        line("routing", "tokens per expert, prefill + decode (layer: e0 e1 ...)")
        for i, counts in enumerate(r["routing_counts"]):
            line("", f"{i:>5}: " + " ".join(f"{c:>4}" for c in counts))
    c = r["checks"]
    kv = c["kv_cache"]
    _check(out, f"KV-cache decode = full forward over {kv['positions']} positions: max |diff| "
                f"{kv['max_abs_diff']:.3g} (tolerance {kv['tolerance']:.3g})", kv["passed"])
    w = c["routing_weights"]
    _check(out, f"routing weights sum to one: max error {w['max_error']:.3g}", w["passed"])
    if "reference" in c:
        ref = c["reference"]
        bound = "must be 0: aligned copies, same ops" if ref["exact"] else \
            f"bound {ref['tolerance']:.3g}: mapped weights"
        _check(out, f"reference {ref['source']} ({ref['layout']}): max |diff| {ref['max_abs_diff']:.3g} ({bound}), "
                    f"top-1 agreement {100 * ref['top1_agreement']:.1f}% over {ref['positions']} positions",
               ref["passed"])
    print("PASS" if r["passed"] else "FAIL", file=out)


def _check(out, text: str, ok: bool) -> None:
    print(f"{'check':<9}{text}: {'ok' if ok else 'FAILED'}", file=out)


def _ids(ids: list[int], limit: int = 24) -> str:
    s = ",".join(map(str, ids[:limit]))
    return s + (f",... ({len(ids)} in all)" if len(ids) > limit else "")
