"""The runner's Mixtral against transformers' (an implementation we did not write), its KV cache against its
own full forward, and loading without copies."""
from __future__ import annotations

import ctypes
import warnings
from dataclasses import replace

import pytest
import torch

from weightswarm.convert.convert import convert
from weightswarm.formats.layouts import Layout, open_layout
from weightswarm.runner.generate import generate, sample
from weightswarm.runner.load import build_model, load_model
from weightswarm.runner.model import KVCache, attention_mask

PROMPTS = [[1], [1, 17, 42, 99, 250, 3, 7], [1, 5, 280, 33, 33, 190, 64, 2, 128, 77, 12, 240, 9, 150, 6, 71, 13, 299]]

# name: (heads, kv heads, experts, experts per token, sliding window)
CONFIGS = {
    "4 heads / 2 kv (2 per group), top-2 of 8": (4, 2, 8, 2, None),
    "6 heads / 2 kv (3 per group), top-1 of 4": (6, 2, 4, 1, None),
    "3 heads / 1 kv (3 per group), top-2 of 8, window 6": (3, 1, 8, 2, 6),
}


def hf_mixtral(heads: int, kv: int, experts: int, k: int, window: int | None, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=16, num_local_experts=experts, num_experts_per_tok=k,
        max_position_embeddings=256, rope_theta=1e6, sliding_window=window, tie_word_embeddings=False,
        initializer_range=0.1,  # larger than the default 0.02, so logits and routing are far from uniform
        eos_token_id=None)
    return transformers.MixtralForCausalLM(config).eval()


def with_window(layout: Layout, window: int | None) -> Layout:
    """The same tensors under params with another sliding window."""
    return replace(layout, params=replace(layout.params, sliding_window=window))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model from its save_pretrained converted to the per-expert layout, name)."""
    hf = hf_mixtral(*CONFIGS[request.param])
    base = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(base / "hf")
    convert(base / "hf", base / "experts")
    model, layout = load_model(base / "experts", dtype="float32")
    assert layout.kind == "per-expert"
    return hf, model, base


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    for prompt in PROMPTS:
        tokens = torch.tensor([prompt])
        with torch.no_grad():
            want, got = hf(tokens).logits.float(), model(tokens)
        scale = want.abs().max()
        assert scale > 0.5  # a model whose logits are all ~0 would match anything
        assert (got - want).abs().max() <= 1e-4 * scale, prompt


def test_greedy_tokens_match_transformers(pair):
    hf, model, _ = pair
    for prompt in PROMPTS[1:]:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = generate(model, prompt, 12)
        assert got.tokens == want[0, len(prompt):].tolist()
        assert generate(model, prompt, 12, keep_logits=True).tokens == got.tokens  # all logits or the last only


def test_hf_layout_direct_equals_per_expert_bit_for_bit(pair):
    """Bit equality holds for the same ops on the same memory layout: both models as aligned copies.
    (Mapped, each tensor starts where its file puts it, and AVX2 kernels round differently there.)"""
    _, _, base = pair
    direct, layout = load_model(base / "hf", dtype="float32", copy=True)
    experts, _ = load_model(base / "experts", dtype="float32", copy=True)
    assert layout.kind == "hf"
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(direct(tokens), experts(tokens))


def test_sliding_window_changes_the_answer(tmp_path):
    """The window config is not vacuous: the same weights without a window give other logits."""
    hf = hf_mixtral(*CONFIGS["3 heads / 1 kv (3 per group), top-2 of 8, window 6"])
    hf.save_pretrained(tmp_path)
    windowed, layout = load_model(tmp_path, dtype="float32")
    full = build_model(with_window(layout, None), dtype="float32")
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        a, b = windowed(tokens), full(tokens)
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-5)  # within the window: the same keys
    assert not torch.allclose(a[0, 6:], b[0, 6:], atol=1e-2)


def test_attention_mask():
    assert attention_mask(0, 5, None, "cpu") == {"is_causal": True}
    assert attention_mask(7, 1, None, "cpu") == {}
    m = attention_mask(0, 5, 3, "cpu")["attn_mask"]
    assert m.tolist() == [[j <= i and j > i - 3 for j in range(5)] for i in range(5)]
    m = attention_mask(5, 1, 3, "cpu")["attn_mask"]  # decode at position 5 sees 3, 4, 5
    assert m.tolist() == [[False, False, False, True, True, True]]
    m = attention_mask(4, 2, None, "cpu")["attn_mask"]  # a chunk after a cached prefix
    assert m.tolist() == [[True] * 5 + [False], [True] * 6]


@pytest.mark.parametrize("window", [None, 4])
def test_kv_cache_chunks_and_steps_equal_full_forward(converted, window):
    model = build_model(with_window(open_layout(converted), window), dtype="float32")
    seq = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.args, 1, seq.shape[1], "cpu", torch.float32)
        parts = [model(seq[:, :7], cache), model(seq[:, 7:12], cache)]  # prefill in two chunks
        parts += [model(seq[:, i:i + 1], cache) for i in range(12, seq.shape[1])]  # then one at a time
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5 * full.abs().max()


def test_routing_weights_and_expert_grouping(converted):
    model, _ = load_model(converted, dtype="float32")
    moe = model.layers[0].feed_forward
    x = torch.randn(11, model.args.dim)
    weights, experts = moe.route(x)
    assert torch.allclose(weights.sum(-1), torch.ones(11))
    assert (experts[:, 0] != experts[:, 1]).all()
    # The grouped computation equals the per-token definition: sum_k w_k * expert_k(x).
    want = torch.stack([sum(weights[t, j] * moe.experts[int(experts[t, j])](x[t]) for j in range(moe.k))
                        for t in range(11)])
    with torch.no_grad():
        assert torch.allclose(moe(x), want, atol=1e-6)


def test_dense_mistral_matches_transformers(tmp_path):
    import transformers

    torch.manual_seed(1)
    config = transformers.MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=1e4, sliding_window=None,
        tie_word_embeddings=False, initializer_range=0.1)
    hf = transformers.MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model, layout = load_model(tmp_path, dtype="float32")
    assert layout.params.moe is None
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want, got = hf(tokens).logits, model(tokens)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _inside_map(t: torch.Tensor, model, path) -> bool:
    mm = model.file_maps.get(path)
    if mm is None:
        return False
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    return base <= t.data_ptr() < base + len(mm)


def test_loading_maps_the_files_without_a_copy(converted):
    model, layout = load_model(converted)  # bf16 files, bf16 model: every tensor a view of its file
    params = dict(model.named_parameters())
    assert set(params) == set(layout.tensors)
    for name, t in layout.tensors.items():
        assert t.transform is None and params[name].dtype == torch.bfloat16
        assert _inside_map(params[name], model, t.ref.path), name
    expert = "layers.1.feed_forward.experts.6.w2.weight"
    assert layout.tensors[expert].ref.path.name == "expert-06.safetensors"
    # Copy-on-write: writing to a parameter never reaches the file.
    before = layout.tensors[expert].ref.path.read_bytes()
    params[expert].add_(1)
    assert layout.tensors[expert].ref.path.read_bytes() == before
    # Another load has maps of its own: the write above does not show there.
    again, _ = load_model(converted)
    assert not torch.equal(again.get_parameter(expert), params[expert])
    # Another dtype is one converted copy, not a view.
    model32, _ = load_model(converted, dtype="float32")
    w = model32.get_parameter(expert)
    assert w.dtype == torch.float32 and not _inside_map(w, model32, layout.tensors[expert].ref.path)


def test_transformed_tensors_are_read(pair):
    _, _, base = pair
    layout = open_layout(base / "hf")
    assert layout.tensors["layers.0.attention.wq.weight"].transform is not None  # q/k come un-permuted: read
    assert layout.tensors["layers.0.attention.wv.weight"].transform is None  # the rest as stored: mapped


def test_sampling_is_seeded(converted):
    model, _ = load_model(converted, dtype="float32")
    runs = [generate(model, PROMPTS[1], 8, temperature=1.0, top_p=0.9, seed=s).tokens for s in (3, 3, 4)]
    assert runs[0] == runs[1] and len(runs[0]) == 8
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, None) == 1
    # top_p 0.5: only the most likely token is in the nucleus.
    assert {sample(logits, 1.0, 0.5, gen) for _ in range(50)} == {1}
    assert {sample(logits, 1.0, 1.0, gen) for _ in range(200)} >= {1, 2}


def test_mapping_a_truncated_file_is_an_error_not_a_crash(tmp_path):
    from weightswarm.core.errors import FormatError
    from weightswarm.formats.tensorref import TensorRef
    from weightswarm.runner.load import mapped

    path = tmp_path / "short.bin"
    path.write_bytes(bytes(24))
    assert mapped(TensorRef("w", "F32", (4,), path, 8, 16)).tolist() == [0.0] * 4
    with pytest.raises(FormatError, match="truncated") as e:
        mapped(TensorRef("w", "F32", (8,), path, 8, 32))  # a page past the end would be SIGBUS
    assert e.value.path == str(path)
