"""Every input layout, built from the same weights, converts to the same per-expert files; and the
Hugging Face export round-trips through transformers itself."""
from __future__ import annotations

import json

import pytest
import torch

from tests.layout_builders import write_consolidated_pth, write_consolidated_safetensors, write_hf, write_stacked
from tests.support import run_ws
from weightswarm.convert.presets import preset_args
from weightswarm.convert.synth import make_state_dict

BUILDERS = {
    "consolidated-pth": lambda d, sd, a: write_consolidated_pth(d, sd, a),
    "consolidated-pth split": lambda d, sd, a: write_consolidated_pth(d, sd, a, split=3),
    "consolidated-safetensors": write_consolidated_safetensors,
    "hf": lambda d, sd, a: write_hf(d, sd, a, shards=3),
    "hf single file": lambda d, sd, a: write_hf(d, sd, a, shards=1),
    "hf-stacked": lambda d, sd, a: write_stacked(d, sd, a, files=2),
}


def weight_files(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The per-expert files of the plain consolidated.00.pth source."""
    base = tmp_path_factory.mktemp("ref")
    args = preset_args("tiny")
    sd = make_state_dict(args, seed=7)
    write_consolidated_pth(base / "src", sd, args)
    assert run_ws("convert", base / "src", "-o", base / "out").returncode == 0
    return args, sd, base / "out"


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_every_layout_gives_the_same_files(reference, tmp_path, kind):
    args, sd, ref_out = reference
    src = tmp_path / "src"
    BUILDERS[kind](src, sd, args)
    out = tmp_path / "out"
    r = run_ws("convert", src, "-o", out)
    assert r.returncode == 0, r.stderr
    assert weight_files(out) == weight_files(ref_out)
    m, ref_m = (json.loads((d / "manifest.json").read_text()) for d in (out, ref_out))
    assert m["tensors"] == ref_m["tensors"]
    assert m["source"]["layout"] == kind.split()[0]
    r = run_ws("verify", out, "--manifest", out / "manifest.json", "--source", src, "--no-structure")
    assert r.returncode == 0, r.stdout + r.stderr


def test_export_consolidated_and_hf_round_trip(reference, tmp_path):
    args, sd, ref_out = reference
    r = run_ws("export", ref_out, "-o", tmp_path / "cons", "--format", "consolidated")
    assert r.returncode == 0, r.stderr
    back = torch.load(tmp_path / "cons" / "consolidated.00.pth", weights_only=True)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    r = run_ws("export", ref_out, "-o", tmp_path / "hf", "--shard-size", "300k")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    # HF -> per-expert again gives the very same files.
    assert run_ws("convert", tmp_path / "hf", "-o", tmp_path / "again").returncode == 0
    assert weight_files(tmp_path / "again") == weight_files(ref_out)


def test_transformers_save_pretrained_converts_and_exports_to_the_same_logits(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    assert run_ws("convert", tmp_path / "hf", "-o", tmp_path / "experts").returncode == 0
    r = run_ws("export", tmp_path / "experts", "-o", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.tensor([[1, 17, 42, 99, 250, 3, 7]])
    with torch.no_grad():
        want, got = model(tokens).logits, again(tokens).logits
    assert torch.equal(want, got)
