#!/usr/bin/env python3
"""Runner speed: our Mixtral against transformers' MixtralForCausalLM on the same weights, dtype and device.

Setup (not timed): a random MixtralForCausalLM of the given dims, save_pretrained in bf16 (the HF layout), and
`weightswarm convert` of it to the per-expert layout; every file is read once so the page cache holds it.
Timed, in rounds that alternate the two implementations so drifting machine load hits both alike:
- load: our load_model(per-expert folder) against from_pretrained(HF folder) (+ .to(device) off CPU);
  also load plus the first prefill, since our load maps the files and pages are touched on first use;
- prefill: one forward of --prefill tokens into an empty KV cache (what generation does first);
- decode: per-token time of --decode greedy steps with the KV cache (each implementation's own cache).
Ratios are ours / transformers: below 1 means ours is faster. A report only: nothing is asserted,
except that the two models agree on the prefill logits (a benchmark of a wrong model is worthless).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from weightswarm.convert.convert import convert
from weightswarm.runner.load import load_model, resolve_dtype
from weightswarm.runner.model import KVCache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def setup(work: Path, a) -> tuple[Path, Path]:
    """The HF folder (bf16, like the release) and its per-expert conversion, reused when the workdir has
    them for these dims."""
    import transformers

    dims = dict(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.hidden, num_hidden_layers=a.layers,
                num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                num_local_experts=a.experts, num_experts_per_tok=a.top_k)
    stamp = work / "dims.json"
    key = json.dumps(dims, sort_keys=True)
    hf_dir, experts = work / "hf", work / "experts"
    if stamp.is_file() and stamp.read_text() == key and (experts / "manifest.json").is_file():
        print(f"setup: reusing {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t = time.perf_counter()
        torch.manual_seed(0)
        config = transformers.MixtralConfig(**dims, max_position_embeddings=4096, rope_theta=1e6,
                                            sliding_window=None, tie_word_embeddings=False,
                                            initializer_range=0.02, eos_token_id=None)
        with torch.device("cpu"):
            model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(hf_dir)
        del model
        convert(hf_dir, experts)
        stamp.write_text(key)
        print(f"setup: random model saved and converted in {time.perf_counter() - t:.1f} s")
    for p in [*hf_dir.rglob("*"), *experts.rglob("*")]:  # page cache: measure loading, not the disk
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
    return hf_dir, experts


def load_ours(experts: Path, device, dtype):
    return load_model(experts, device, dtype)[0]


def load_hf(hf_dir: Path, device, dtype):
    import transformers

    model = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    return model.to(device).eval()


def prefill_ours(model, tokens, extra: int):
    cache = KVCache(model.args, 1, tokens.shape[1] + extra, tokens.device, model.output.weight.dtype)
    return model(tokens, cache), cache


def prefill_hf(model, tokens, extra: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=tokens, past_key_values=cache, use_cache=True)
    return out.logits, cache


def step_ours(model, cache, tok: torch.Tensor) -> torch.Tensor:
    """One greedy decode step: the next token (a 0-d tensor)."""
    return model(tok.view(1, 1), cache)[0, -1].argmax()


def step_hf(model, cache, tok: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1].argmax()


def check_float32(hf_dir: Path, experts: Path, device, tokens) -> None:
    """Both models on the same weights in float32 agree: a benchmark of a wrong model is worthless."""
    ours, hf = load_ours(experts, device, torch.float32), load_hf(hf_dir, device, torch.float32)
    want, got = hf(tokens).logits.float(), ours(tokens)
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    print(f"check: float32 logits max |diff| {diff:.3g} (max |logit| {scale:.3g})")
    if diff > 1e-4 * scale:
        sys.exit("the two models disagree in float32: not benchmarking a wrong model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16, float32 or float16 (default: bfloat16)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=3584, help="expert hidden dim (default: 3584)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens (default: 128)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps per round (default: 32)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default: 3)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/runner"), help="default: bench-out/runner")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), resolve_dtype(a.dtype)
    torch.set_grad_enabled(False)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # 5.x renames past_key_values; both work

    hf_dir, experts = setup(a.workdir, a)
    size = sum(p.stat().st_size for p in experts.rglob("*.safetensors"))
    print(f"model: dim {a.dim}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv, head_dim {a.head_dim}, "
          f"hidden {a.hidden}, top-{a.top_k} of {a.experts} experts, vocab {a.vocab}; files {size / 1e9:.2f} GB "
          f"bf16; run in {a.dtype} on {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, a.vocab, (1, a.prefill), generator=gen).to(device)
    check_float32(hf_dir, experts, device, tokens[:, :32])

    names = ["ours", "transformers"]
    load = {"ours": lambda: load_ours(experts, device, dtype), "transformers": lambda: load_hf(hf_dir, device, dtype)}
    prefill = {"ours": prefill_ours, "transformers": prefill_hf}
    step = {"ours": step_ours, "transformers": step_hf}
    times: dict[str, dict[str, list[float]]] = {k: {} for k in names}

    def add(impl: str, row: str, t: float) -> None:
        times[impl].setdefault(row, []).append(t)

    def order(i: int) -> list[str]:  # alternate who goes first
        return names if i % 2 == 0 else names[::-1]

    models = {}
    for r in range(a.repeat):  # each load from scratch, then its first forward (our pages fault in there)
        for name in order(r):
            models.pop(name, None)
            gc.collect()
            t_load, model = timed(load[name], device)
            t_first, _ = timed(lambda: prefill[name](model, tokens, a.decode), device)
            add(name, "load", t_load)
            add(name, "load + first prefill", t_load + t_first)
            models[name] = model
    row = f"prefill {a.prefill} tokens"
    for r in range(2 * a.repeat):
        for name in order(r):
            add(name, row, timed(lambda: prefill[name](models[name], tokens, a.decode), device)[0])
    # Decode one step of each in turn, so load bursts from other processes hit both alike.
    steps: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.repeat):
        state, logits = {}, {}
        for name in names:
            lg, cache = prefill[name](models[name], tokens, a.decode)
            state[name] = [cache, lg[0, -1].argmax()]
            logits[name] = lg[0].float().cpu()
        greedy = {n: [int(state[n][1])] for n in names}
        per = dict.fromkeys(names, 0.0)
        for i in range(a.decode):
            for name in order(i):
                cache, tok = state[name]
                t, tok = timed(lambda: step[name](models[name], cache, tok), device)
                state[name][1] = tok
                greedy[name].append(int(tok))
                steps[name].append(t)
                per[name] += t
        for name in names:
            add(name, "decode, per token", per[name] / a.decode)

    diff = float((logits["ours"] - logits["transformers"]).abs().max())
    same = greedy["ours"] == greedy["transformers"]
    why = "" if same else " (expected in bf16/f16: a random model's near-tied routing flips experts on rounding)"
    print(f"{a.dtype}: prefill logits max |diff| ours vs transformers {diff:.3g}; greedy tokens "
          f"{'identical' if same else 'differ'}{why}")

    rows = list(times["ours"])
    print(f"\n| {'measure':<24} | ours (best / median) | transformers (best / median) "
          "| ours/transformers (best / median) |")
    print(f"|{'-' * 26}|---|---|---|")
    results = {}
    for row in rows:
        o, h = times["ours"][row], times["transformers"][row]
        ratio = min(o) / min(h)
        if row.startswith("decode"):  # best: the best round's mean; median: of every single step
            o_med, h_med = statistics.median(steps["ours"]), statistics.median(steps["transformers"])
        else:
            o_med, h_med = statistics.median(o), statistics.median(h)
        results[row] = {"ours": o, "transformers": h, "ratio_best": ratio, "ratio_median": o_med / h_med}
        print(f"| {row:<24} | {_ms(min(o))} / {_ms(o_med)} | {_ms(min(h))} / {_ms(h_med)} | "
              f"{ratio:.2f}x / {o_med / h_med:.2f}x |")
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "args": {k: str(v) for k, v in vars(a).items()}, "results": results,
            "check": {"max_abs_diff_bench_dtype": diff, "greedy_identical": same}}
    if a.json:
        a.json.write_text(json.dumps(info, indent=1) + "\n")


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


if __name__ == "__main__":
    main()
