"""weightswarm.formats.layouts: the four input layouts, built from one state dict, read back bit-identically."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.layout_builders import (
    permute_for_hf,
    to_hf,
    to_stacked,
    write_consolidated_pth,
    write_consolidated_safetensors,
    write_hf,
    write_stacked,
)
from weightswarm.convert.presets import preset_args
from weightswarm.convert.synth import make_state_dict
from weightswarm.core.errors import FormatError
from weightswarm.formats import safetensors
from weightswarm.formats.hf import (
    hf_config_from_params,
    hf_row_order,
    hf_to_mistral,
    mistral_to_hf,
    params_from_hf_config,
    reorder_rows,
)
from weightswarm.formats.layouts import open_layout
from weightswarm.runner.load import from_bytes

ARGS = preset_args("tiny")
SD = make_state_dict(ARGS)
HF_ARGS = dataclasses.replace(ARGS, rope_theta=ARGS.theta)  # config.json states the theta params.json leaves out

BUILDS = {
    "pth": (lambda d: write_consolidated_pth(d, SD, ARGS), "consolidated-pth", ARGS),
    "pth-split": (lambda d: write_consolidated_pth(d, SD, ARGS, split=4), "consolidated-pth", ARGS),
    "safetensors": (lambda d: write_consolidated_safetensors(d, SD, ARGS), "consolidated-safetensors", ARGS),
    "hf-sharded": (lambda d: write_hf(d, SD, ARGS, shards=3), "hf", HF_ARGS),
    "hf-single": (lambda d: write_hf(d, SD, ARGS, shards=1), "hf", HF_ARGS),
    "stacked": (lambda d: write_stacked(d, SD, ARGS, files=2), "hf-stacked", ARGS),
    "stacked-config": (lambda d: write_stacked(d, SD, ARGS, files=3, params="config.json"), "hf-stacked", HF_ARGS),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def tensor(ct) -> torch.Tensor:
    return from_bytes(ct.read(), ct.dtype, ct.shape)


@pytest.mark.parametrize("build", BUILDS)
def test_every_layout_reads_back_the_same_weights(tmp_path, build):
    write, kind, args = BUILDS[build]
    src = write(tmp_path / "src")
    (src / "tokenizer.model").write_bytes(b"spm")
    layout = open_layout(src)
    assert (layout.kind, layout.root, layout.params, layout.tokenizer) == (kind, src, args, src / "tokenizer.model")
    assert list(layout.tensors) == [n for n, _ in ARGS.tensor_shapes()]
    for name, ct in layout.tensors.items():
        assert (ct.name, ct.dtype, ct.shape, ct.nbytes) == (name, "BF16", tuple(SD[name].shape), SD[name].nbytes)
        t = tensor(ct)
        assert t.is_contiguous() and t.dtype == torch.bfloat16 and t.shape == SD[name].shape
        assert torch.equal(bits(t), bits(SD[name])), name
    weight_files = sorted(p for p in src.iterdir() if p.suffix in (".pth", ".pt", ".safetensors") or "-split" in p.name)
    assert sorted(layout.files) == weight_files
    if build == "pth-split":
        assert [p.name for p in layout.files] == [f"consolidated.00.pth-split{i}" for i in range(4)]


def test_read_takes_only_its_own_bytes(tmp_path):
    """A stacked expert's bytes are that expert's rows of the stack, not the whole stack."""
    layout = open_layout(write_stacked(tmp_path / "s", SD, ARGS))
    ct = layout.tensors["layers.1.feed_forward.experts.5.w2.weight"]
    stack = next(r for r in layout.tensors.values() if r.ref.name == "layers.1.block_sparse_moe.w2")
    assert ct.ref.nbytes == ARGS.hidden_dim * ARGS.dim * 2 and ct.ref.offset > stack.ref.offset
    assert torch.equal(bits(tensor(ct)), bits(SD["layers.1.feed_forward.experts.5.w2.weight"]))


def test_transformers_save_pretrained_opens_as_hf(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                        num_experts_per_tok=2)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    layout = open_layout(tmp_path / "hf")
    assert layout.kind == "hf"
    assert layout.params == dataclasses.replace(ARGS, rope_theta=1e6)
    assert {n: ct.shape for n, ct in layout.tensors.items()} == dict(ARGS.tensor_shapes())
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    for name, ct in layout.tensors.items():
        t, hf = tensor(ct), saved[mistral_to_hf(name)]
        if name.endswith(("wq.weight", "wk.weight")):
            heads = ARGS.n_heads if "wq" in name else ARGS.n_kv_heads
            assert torch.equal(bits(permute_for_hf(t, heads)), bits(hf))
            assert not torch.equal(t, hf)  # the permutation did something
        else:
            assert torch.equal(bits(t), bits(hf))


def test_unpermuted_weights_give_the_same_attention_scores():
    """Mistral's interleaved RoPE on wq/wk equals transformers' rotate_half RoPE on the permuted weights."""
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    torch.manual_seed(0)
    n, kv, hd, dim, seq = ARGS.n_heads, ARGS.n_kv_heads, ARGS.head_dim, ARGS.dim, 5
    wq, wk, x = torch.randn(n * hd, dim), torch.randn(kv * hd, dim), torch.randn(seq, dim)
    inv = 1.0 / (ARGS.theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(seq).float(), inv)  # [seq, hd/2]

    def mistral(w, heads):  # rotate pairs (2i, 2i+1) as complex numbers
        q = torch.view_as_complex((x @ w.T).view(seq, heads, hd // 2, 2))
        return torch.view_as_real(q * torch.polar(torch.ones_like(ang), ang)[:, None]).reshape(seq, heads, hd)

    q_m, k_m = mistral(wq, n), mistral(wk, kv)
    emb = torch.cat([ang, ang], dim=-1)
    q_h = (x @ permute_for_hf(wq, n).T).view(1, seq, n, hd).transpose(1, 2)
    k_h = (x @ permute_for_hf(wk, kv).T).view(1, seq, kv, hd).transpose(1, 2)
    q_h, k_h = apply_rotary_pos_emb(q_h, k_h, emb.cos()[None], emb.sin()[None])
    rep = n // kv
    scores_m = torch.einsum("qhd,khd->hqk", q_m, k_m.repeat_interleave(rep, dim=1))
    scores_h = torch.einsum("hqd,hkd->hqk", q_h[0], k_h[0].repeat_interleave(rep, dim=0))
    assert torch.allclose(scores_m, scores_h, atol=1e-3)
    # The byte-level reordering the readers use is the same permutation, both ways.
    raw = bytearray(wq.numpy().tobytes())
    to_hf = reorder_rows(raw, n * hd, hf_row_order(n * hd, n, to_hf=True))
    assert bytes(to_hf) == permute_for_hf(wq, n).contiguous().numpy().tobytes()
    assert reorder_rows(to_hf, n * hd, hf_row_order(n * hd, n, to_hf=False)) == raw


def test_names_and_config_round_trip():
    for name, _ in ARGS.tensor_shapes():
        assert hf_to_mistral(mistral_to_hf(name)) == name
    assert mistral_to_hf("layers.0.feed_forward.experts.3.w2.weight") == \
        "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert hf_to_mistral("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    cfg = hf_config_from_params(ARGS, "BF16")
    assert params_from_hf_config(cfg) == HF_ARGS
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}  # pre-5.x config: top-level rope_theta only
    assert params_from_hf_config({**old, "rope_theta": 5e5}).rope_theta == 5e5
    from transformers import MixtralConfig

    mc = MixtralConfig(**cfg)
    assert (mc.hidden_size, mc.num_local_experts, mc.head_dim, mc.rope_parameters["rope_theta"]) == (64, 8, 16, 1e6)
    assert math.isclose(mc.rms_norm_eps, 1e-5)


# --- bad input -----------------------------------------------------------------------------------

def problem(src) -> tuple[str, str]:
    with pytest.raises(FormatError) as e:
        open_layout(src)
    return e.value.path, e.value.problem


def test_unknown_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    assert problem(tmp_path / "empty") == (str(tmp_path / "empty"), "the folder is empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FormatError) as e:
        open_layout(tmp_path / "other")
    assert e.value.problem == "no known checkpoint layout" and "consolidated.00.pth" in e.value.hint
    assert problem(tmp_path / "nope") == (str(tmp_path / "nope"), "no such folder")
    torch.save({"layers.0.attention.wq.weight": torch.zeros(2)}, tmp_path / "consolidated.00.pt")
    assert problem(tmp_path) == (str(tmp_path), "consolidated.0N.pt files without stacked experts "
                                                "(layers.N.block_sparse_moe.w1)")


def test_missing_params_json(tmp_path):
    write_consolidated_pth(tmp_path, SD, ARGS)
    (tmp_path / "params.json").unlink()
    assert problem(tmp_path) == (str(tmp_path / "params.json"), "no such file")


def test_missing_tensor(tmp_path):
    sd = {k: v for k, v in SD.items() if k != "layers.1.attention.wk.weight"}
    write_consolidated_pth(tmp_path / "a", sd, ARGS)
    assert problem(tmp_path / "a") == (str(tmp_path / "a" / "consolidated.00.pth"),
                                       "layers.1.attention.wk.weight: missing, params.json implies shape [32, 64]")
    write_hf(tmp_path / "b", sd, ARGS, shards=2)
    assert problem(tmp_path / "b") == (str(tmp_path / "b" / "model.safetensors.index.json"),
                                       "model.layers.1.self_attn.k_proj.weight: missing, "
                                       "config.json implies shape [32, 64]")
    st = to_stacked(SD, ARGS)
    del st["layers.0.block_sparse_moe.w2"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "params.json").write_text(json.dumps(ARGS.to_dict()))
    torch.save(st, tmp_path / "c" / "consolidated.00.pt")
    assert problem(tmp_path / "c") == (str(tmp_path / "c"),
                                       "layers.0.block_sparse_moe.w2: missing, params.json implies shape [1024, 64]")


def test_wrong_shape(tmp_path):
    sd = dict(SD, **{"layers.0.attention.wq.weight": torch.zeros(32, 64, dtype=torch.bfloat16)})
    write_hf(tmp_path / "hf", sd, ARGS, shards=1)
    assert problem(tmp_path / "hf") == (str(tmp_path / "hf" / "model.safetensors"),
                                        "model.layers.0.self_attn.q_proj.weight: shape [32, 64], "
                                        "config.json implies [64, 64]")
    write_consolidated_safetensors(tmp_path / "st", dict(SD, **{"norm.weight": torch.zeros(3)}), ARGS)
    assert problem(tmp_path / "st") == (str(tmp_path / "st" / "consolidated.safetensors"),
                                        "norm.weight: shape [3], params.json implies [64]")
    st = to_stacked(SD, ARGS)
    st["layers.1.block_sparse_moe.w3"] = st["layers.1.block_sparse_moe.w3"][:-1].clone()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "params.json").write_text(json.dumps(ARGS.to_dict()))
    torch.save(st, tmp_path / "s" / "consolidated.00.pt")
    assert problem(tmp_path / "s") == (str(tmp_path / "s" / "consolidated.00.pt"),
                                       "layers.1.block_sparse_moe.w3: shape [1023, 64], params.json implies [1024, 64]")


def test_unexpected_tensor(tmp_path):
    write_consolidated_pth(tmp_path / "a", dict(SD, **{"layers.2.attention.wq.weight": SD["norm.weight"]}), ARGS)
    assert problem(tmp_path / "a") == (str(tmp_path / "a" / "consolidated.00.pth"),
                                       "layers.2.attention.wq.weight: unexpected tensor "
                                       "(not in the model params.json describes)")
    hf = to_hf(SD, ARGS)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old transformers saved these: ignored
    hf["model.layers.0.mlp.experts.gate_up_proj"] = torch.ones(8)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(hf_config_from_params(ARGS, "BF16")))
    save_file(hf, tmp_path / "b" / "model.safetensors")
    assert problem(tmp_path / "b") == (str(tmp_path / "b" / "model.safetensors"),
                                       "model.layers.0.mlp.experts.gate_up_proj: unexpected tensor "
                                       "(not in the model config.json describes)")
    del hf["model.layers.0.mlp.experts.gate_up_proj"]
    save_file(hf, tmp_path / "b" / "model.safetensors")
    assert open_layout(tmp_path / "b").kind == "hf"


def test_missing_or_inconsistent_shard(tmp_path):
    src = write_hf(tmp_path, SD, ARGS, shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    assert problem(src) == (str(src / "model-00002-of-00003.safetensors"),
                            "listed in model.safetensors.index.json but missing")
    write_hf(tmp_path, SD, ARGS, shards=3)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert problem(src) == (str(src / "model-00001-of-00003.safetensors"),
                            "lm_head.weight: listed in model.safetensors.index.json but not in this file")
    index["weight_map"]["lm_head.weight"] = "../escape.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert problem(src) == (str(src / "model.safetensors.index.json"),
                            "shard name '../escape.safetensors' is not a plain file name")


def test_truncated_file_names_tensor_on_load(tmp_path):
    src = write_consolidated_safetensors(tmp_path, SD, ARGS)
    layout = open_layout(src)
    path = src / "consolidated.safetensors"
    last = max(safetensors.refs(path).values(), key=lambda r: r.offset)
    path.write_bytes(path.read_bytes()[:-10])  # cut after open: read() notices
    with pytest.raises(FormatError) as e:
        layout.tensors[last.name].read()
    assert (e.value.path, e.value.problem) == (
        str(path), f"{last.name}: truncated: needs {last.nbytes} bytes at offset {last.offset}, got {last.nbytes - 10}")


def test_hf_files_win_over_consolidated_without_params(tmp_path):
    write_hf(tmp_path, SD, ARGS, shards=2)
    save_file(SD, tmp_path / "consolidated.safetensors")  # as some HF repos carry, here without params.json
    assert open_layout(tmp_path).kind == "hf"
    (tmp_path / "params.json").write_text(json.dumps(ARGS.to_dict()))
    assert open_layout(tmp_path).kind == "consolidated-safetensors"
