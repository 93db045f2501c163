"""Tests of weightswarm.convert.synth: the synthetic Mixtral-shaped release."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from weightswarm.convert import synth
from weightswarm.convert.presets import PRESETS, preset_args
from weightswarm.convert.synth import CHECKPOINT, synthesize
from weightswarm.core.errors import InputError
from weightswarm.formats.params import ModelArgs

REPO = Path(__file__).resolve().parents[1]
FILES = {"params.json", CHECKPOINT, "tokenizer.model", "RELEASE"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "mixtral-8x7b-32kseqlen"
    synthesize(out)
    return out


def test_layout_and_returned_paths(tmp_path):
    out = tmp_path / "rel"
    paths = synthesize(out)
    assert {p.name for p in paths} == FILES
    assert all(p.parent == out and p.is_file() for p in paths)
    assert {p.name for p in out.iterdir()} == FILES  # no temp files left behind


def test_params_json_like_the_shipped_one(release):
    text = (release / "params.json").read_text()
    assert text.endswith("}\n") and text.count("\n") == 1
    d = json.loads(text)
    assert list(d) == ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
                       "vocab_size", "moe"]
    assert list(d["moe"]) == ["num_experts_per_tok", "num_experts"]
    assert d["moe"] == {"num_experts_per_tok": 2, "num_experts": 8}
    assert ModelArgs.load(release / "params.json") == preset_args("tiny", d["vocab_size"])


def test_checkpoint_matches_params(release):
    args = ModelArgs.load(release / "params.json")
    sd = torch.load(release / CHECKPOINT, weights_only=True, mmap=True)
    shapes = dict(args.tensor_shapes())
    assert list(sd) == list(shapes)  # same names, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for name, t in sd.items():
        t = t.float()
        assert torch.isfinite(t).all()
        if name.endswith("norm.weight"):
            assert (t - 1).abs().max() < 0.2
        else:
            assert t.std().item() == pytest.approx(t.shape[-1] ** -0.5, rel=0.25)


def test_every_tensor_has_its_own_storage(release):
    with zipfile.ZipFile(release / CHECKPOINT) as z:
        records = [n for n in z.namelist() if re.fullmatch(r"[^/]+/data/\d+", n)]
    assert len(records) == preset_args("tiny").tensor_count()
    for t in synth.make_state_dict(preset_args("tiny")).values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_deterministic_across_processes(release, tmp_path):
    # A second run in a fresh process, with another hash seed, must give the same bytes for every file.
    other = tmp_path / "again"
    code = f"from weightswarm.convert.synth import synthesize; synthesize({str(other)!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    for name in FILES:
        assert (other / name).read_bytes() == (release / name).read_bytes(), name


def test_seed_changes_weights_only(release, tmp_path):
    other = tmp_path / "seed1"
    synthesize(other, seed=1)
    assert (other / CHECKPOINT).read_bytes() != (release / CHECKPOINT).read_bytes()
    for name in ("params.json", "tokenizer.model"):
        assert (other / name).read_bytes() == (release / name).read_bytes()


def test_release_md5s(release):
    lines = (release / "RELEASE").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == [CHECKPOINT, "tokenizer.model"]
    for line in lines:
        digest, name = re.fullmatch(r"([0-9a-f]{32})  (\S+)", line).groups()
        assert digest == hashlib.md5((release / name).read_bytes()).hexdigest()
    if shutil.which("md5sum"):
        subprocess.run(["md5sum", "--quiet", "-c", "RELEASE"], cwd=release, check=True)


def test_split_parts_concatenate_to_the_whole(release, tmp_path):
    whole = (release / CHECKPOINT).read_bytes()
    size = len(whole)
    divisor = next((k for k in range(2, size) if size % k == 0), 1)
    # Exact fits (one part, several parts), one byte over and under, and an uneven cut.
    for split in (size, size // divisor, size - 1, size + 1, 100_000):
        out = tmp_path / f"split{split}"
        paths = synthesize(out, split=split)
        count = math.ceil(size / split)
        parts = [out / f"{CHECKPOINT}-split{i}" for i in range(count)]
        assert [p for p in paths if p.name.startswith(CHECKPOINT)] == parts
        assert {p.name for p in out.iterdir()} == FILES - {CHECKPOINT} | {p.name for p in parts}
        assert [p.stat().st_size for p in parts] == [split] * (count - 1) + [size - split * (count - 1)]
        assert b"".join(p.read_bytes() for p in parts) == whole
        assert (out / "RELEASE").read_bytes() == (release / "RELEASE").read_bytes()


def test_tokenizer_like_mistrals(release):
    sp = spm.SentencePieceProcessor(model_file=str(release / "tokenizer.model"))
    assert sp.get_piece_size() == json.loads((release / "params.json").read_text())["vocab_size"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    text = "Weights über alles ✓ 2023"
    pieces = sp.encode(text, out_type=str)
    assert "<0xE2>" in pieces and "<unk>" not in pieces  # byte fallback, never unknown
    assert sp.decode(sp.encode(text)) == text


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def crash(obj, f):
        f.write(b"x" * 250)
        raise OSError("disk full")

    monkeypatch.setattr(synth.torch, "save", crash)
    out = tmp_path / "rel"
    with pytest.raises(OSError):
        synthesize(out, split=100)
    # Nothing under a final name: the run wrote into its hidden work folder, where the third part was
    # never given its name either.
    assert [p.name for p in out.iterdir()] == [".synth"]
    assert sorted(p.name for p in (out / ".synth" / "files").iterdir()) == [
        f"{CHECKPOINT}-split0", f"{CHECKPOINT}-split1", "params.json", "tokenizer.model"]
    monkeypatch.undo()
    synthesize(out, split=100)  # the same command completes once the cause is gone
    assert ".synth" not in {p.name for p in out.iterdir()} and (out / "RELEASE").is_file()


def test_empty_existing_folder_is_accepted(tmp_path):
    synthesize(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FILES


def test_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists and is not empty") as e:
        synthesize(tmp_path)
    assert e.value.path == str(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"keep.txt"}


def test_refuses_missing_parent(tmp_path):
    with pytest.raises(InputError) as e:
        synthesize(tmp_path / "no" / "out")
    assert e.value.path == str(tmp_path / "no") and e.value.hint
    assert not (tmp_path / "no").exists()


def test_refuses_file_as_output(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        synthesize(tmp_path / "f")


@pytest.mark.parametrize("kwargs", [{"preset": "huge"}, {"split": 0}, {"split": -5}])
def test_refuses_bad_options(tmp_path, kwargs):
    with pytest.raises(InputError):
        synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_presets_are_valid_and_sized():
    sizes = {"tiny": (0.5e6, 2e6), "small": (20e6, 40e6), "medium": (200e6, 300e6), "1g": (0.9e9, 1.2e9),
             "4g": (3.6e9, 4.6e9)}
    assert set(PRESETS) == set(sizes)
    for name, (low, high) in sizes.items():
        args = preset_args(name)
        args.check()
        assert (args.moe.num_experts, args.moe.num_experts_per_tok) == (8, 2)
        nbytes = 2 * sum(math.prod(s) for s in dict(args.tensor_shapes()).values())
        assert low < nbytes < high, name
