"""convert: the per-expert layout, determinism, restart after kill -9, provenance and bad input."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
from safetensors import safe_open

from tests.support import WS, run_ws, tree_bytes


def test_layout_and_manifest(converted, tiny_release):
    files = sorted(tree_bytes(converted))
    assert files == ["dense.safetensors"] + [f"experts/expert-{e:02d}.safetensors" for e in range(8)] + [
        "manifest.json", "params.json", "tokenizer.model"]
    # Only the job's record stays behind, hidden: a rerun of the same job is a no-op.
    assert [p.name for p in (converted / ".convert").iterdir()] == ["job.json"]
    m = json.loads((converted / "manifest.json").read_text())
    assert (m["format"], m["version"]) == ("weightswarm-manifest", 1)
    assert m["source"]["layout"] == "consolidated-pth"
    assert [f["path"] for f in m["source"]["files"]] == ["consolidated.00.pth"]
    assert [f["path"] for f in m["files"]] == [f for f in files if f != "manifest.json"]
    with safe_open(converted / "experts/expert-03.safetensors", "pt") as f:
        assert list(f.keys()) == sorted(f"layers.{layer}.feed_forward.experts.3.w{w}.weight"
                                        for layer in range(2) for w in (1, 2, 3))
        assert f.metadata() is None
    with safe_open(converted / "dense.safetensors", "pt") as f:
        assert not any(".experts." in k for k in f.keys()) and "layers.1.feed_forward.gate.weight" in f.keys()
    by_name = {t["name"]: t for t in m["tensors"]}
    assert by_name["layers.0.feed_forward.experts.7.w2.weight"]["file"] == "experts/expert-07.safetensors"
    assert by_name["layers.0.feed_forward.experts.7.w2.weight"]["dtype"] == "BF16"
    assert (converted / "params.json").read_bytes() == (tiny_release / "params.json").read_bytes()


def test_conversion_is_deterministic(converted, tiny_release, tmp_path):
    again = tmp_path / "again"
    assert run_ws("convert", tiny_release, "-o", again).returncode == 0
    assert tree_bytes(again) == tree_bytes(converted)


@pytest.mark.parametrize("only", [[], ["--experts", "0,3"]])
def test_a_rerun_of_a_finished_job_is_a_no_op(tiny_release, tmp_path, only):
    out = tmp_path / "out"
    assert run_ws("convert", tiny_release, "-o", out, *only).returncode == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    r = run_ws("convert", tiny_release, "-o", out, *only)
    assert r.returncode == 0, r.stderr
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_layer_expert_granularity_and_dtype(tiny_release, tmp_path):
    out = tmp_path / "le"
    r = run_ws("convert", tiny_release, "-o", out, "--granularity", "layer-expert", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert (out / "experts/layer-01/expert-05.safetensors").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert {t["dtype"] for t in m["tensors"]} == {"F32"}
    r = run_ws("verify", out, "--manifest", out / "manifest.json", "--source", tiny_release, "--no-structure")
    assert r.returncode == 0, r.stdout + r.stderr  # bf16 -> f32 is exact, and provenance knows the dtype


def test_provenance_proves_the_conversion_and_names_a_changed_weight(converted, tiny_release, tmp_path):
    r = run_ws("verify", converted, "--manifest", converted / "manifest.json", "--source", tiny_release,
               "--json", "--no-structure")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["summary"]["provenance"]["passed"] == len(json.loads((converted / "manifest.json").read_text())["tensors"])
    # Change one weight in the source: exactly that tensor fails.
    import shutil

    import torch

    src = tmp_path / "src"
    shutil.copytree(tiny_release, src)
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    sd["layers.1.feed_forward.experts.2.w3.weight"][0, 0] += 1
    torch.save(sd, src / "consolidated.00.pth")
    r = run_ws("verify", converted, "--manifest", converted / "manifest.json", "--source", src, "--no-structure")
    assert r.returncode == 1
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith(
        "FAIL provenance: layers.1.feed_forward.experts.2.w3.weight: blake3 mismatch in the source")


def test_corrupt_output_is_named_by_file_and_tensor(converted, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(converted, out)
    path = out / "experts/expert-01.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte belongs to the last tensor of the file
    path.write_bytes(bytes(data))
    r = run_ws("verify", out, "--manifest", out / "manifest.json", "--no-structure")
    assert r.returncode == 1
    assert "FAIL manifest: experts/expert-01.safetensors: blake3 mismatch" in r.stdout
    assert "FAIL tensor: layers.1.feed_forward.experts.1.w3.weight: blake3 mismatch in experts/expert-01.safetensors" in r.stdout


def test_absent_files_are_absent_not_corrupt(converted, tmp_path):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(converted, out)
    for e in (1, 2, 4, 5, 6, 7):
        (out / f"experts/expert-{e:02d}.safetensors").unlink()
    r = run_ws("verify", out, "--manifest", out / "manifest.json", "--json", "--no-structure")
    assert r.returncode == 0, r.stdout
    summary = json.loads(r.stdout)["summary"]
    assert summary["manifest"] == {"passed": 5, "failed": 0, "absent": 6}


def _convert_killed_after_first_file(src, out) -> bool:
    """Start a conversion and SIGKILL it once one file is finished; False if it ended first."""
    p = subprocess.Popen(WS + ["convert", str(src), "-o", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    done = out / ".convert" / "done"
    try:
        while p.poll() is None and not (done.is_dir() and any(done.iterdir())):
            try:
                p.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    return p.returncode == -signal.SIGKILL


def test_kill_9_then_rerun_finishes_with_the_same_bytes(tmp_path, converted_small_reference):
    src, reference = converted_small_reference
    # On a loaded machine the whole conversion may slip between two polls: then try again, a few times.
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        if _convert_killed_after_first_file(src, out):
            break
    else:
        raise AssertionError("the conversion always finished before it could be killed")
    assert not (out / "manifest.json").exists()  # killed before the end
    assert not (out / "dense.safetensors").exists()  # nothing under a final name yet
    r = run_ws("convert", src, "-o", out)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (out / ".convert").iterdir()] == ["job.json"]
    assert tree_bytes(out) == tree_bytes(reference)


@pytest.fixture(scope="session")
def converted_small_reference(tmp_path_factory):
    from weightswarm.convert.synth import synthesize

    base = tmp_path_factory.mktemp("small")
    synthesize(base / "src", preset="small")
    assert run_ws("convert", base / "src", "-o", base / "ref").returncode == 0
    return base / "src", base / "ref"


def test_bad_inputs_exit_2_and_leave_nothing(tmp_path, tiny_release):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_ws("convert", empty, "-o", tmp_path / "o1")
    assert r.returncode == 2 and r.stderr.startswith(f"Error: {empty}: ")
    assert not (tmp_path / "o1").exists()

    import shutil

    import torch

    for case in ("missing", "shape"):
        src = tmp_path / case
        shutil.copytree(tiny_release, src)
        sd = torch.load(src / "consolidated.00.pth", weights_only=True)
        if case == "missing":
            del sd["layers.1.ffn_norm.weight"]
        else:
            sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:32].clone()
        torch.save(sd, src / "consolidated.00.pth")
        r = run_ws("convert", src, "-o", tmp_path / f"out-{case}")
        assert r.returncode == 2, r.stderr
        line = r.stderr.splitlines()[0]
        assert line.startswith(f"Error: {src / 'consolidated.00.pth'}: ")
        assert ("layers.1.ffn_norm.weight" if case == "missing" else "layers.0.attention.wq.weight") in line
        assert not (tmp_path / f"out-{case}").exists()

    r = run_ws("convert", tiny_release, "-o", tiny_release)  # not empty
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr


def test_manifest_of_any_folder_has_the_same_tensor_hashes(converted, tiny_release, tmp_path):
    out = tmp_path / "release.manifest.json"
    r = run_ws("manifest", tiny_release, "-o", out, "--tensors")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert [f["path"] for f in m["files"]] == ["RELEASE", "consolidated.00.pth", "params.json", "tokenizer.model"]
    assert "source" not in m
    converted_m = json.loads((converted / "manifest.json").read_text())
    # The same bytes in a torch.save zip and in the per-expert safetensors files: the same hashes.
    assert {t["name"]: t["blake3"] for t in m["tensors"]} == {t["name"]: t["blake3"] for t in converted_m["tensors"]}
    r = run_ws("verify", tiny_release, "--manifest", out, "--no-structure")
    assert r.returncode == 0, r.stdout + r.stderr


def test_truncated_source_names_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from weightswarm.convert.presets import preset_args
    from weightswarm.convert.synth import make_state_dict

    args = preset_args("tiny")
    src = tmp_path / "src"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(args.to_dict()))
    save_file(make_state_dict(args), src / "consolidated.safetensors")
    data = (src / "consolidated.safetensors").read_bytes()
    (src / "consolidated.safetensors").write_bytes(data[:-100])
    r = run_ws("convert", src, "-o", tmp_path / "out")
    assert r.returncode == 2
    line = r.stderr.splitlines()[0]
    assert line.startswith(f"Error: {src / 'consolidated.safetensors'}: ") and "past the end of the data" in line
    assert not (tmp_path / "out").exists()
