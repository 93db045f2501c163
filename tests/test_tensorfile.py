"""weightswarm.formats.torchzip: byte ranges of tensors in .pth zips and .safetensors, the restricted unpickler,
and the streaming safetensors writer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import blake3
import pytest
import torch
from safetensors.torch import load_file, save_file

from weightswarm.convert.presets import preset_args
from weightswarm.convert.synth import make_state_dict
from weightswarm.core.errors import FormatError
from weightswarm.formats.dtypes import CODE_OF_NAME, DTYPES, NAMES
from weightswarm.formats.safetensors import refs as safetensors_refs
from weightswarm.formats.safetensors import write_safetensors
from weightswarm.formats.tensorref import TensorRef
from weightswarm.formats.torchzip import torch_zip_refs
from weightswarm.runner.load import from_bytes


def code(t: torch.Tensor) -> str:
    return CODE_OF_NAME[str(t.dtype).removeprefix("torch.")]


def tensor(ref: TensorRef) -> torch.Tensor:
    return from_bytes(ref.read(), ref.dtype, ref.shape)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

SD = make_state_dict(preset_args("tiny"))


def odd_state_dict() -> dict[str, torch.Tensor]:
    """Tensors that exercise every path torch.save takes: views with an offset, shared storage,
    a 0-d tensor, an empty one, a Parameter, and the dtypes pickled with _rebuild_tensor_v3."""
    base = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    return {"bf16": torch.randn(3, 5).to(torch.bfloat16), "view": base[2:4], "whole": base,
            "scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0, 3, dtype=torch.float16),
            "param": torch.nn.Parameter(torch.ones(2, 2)), "u16": torch.arange(5).to(torch.uint16),
            "f8": torch.ones(4).to(torch.float8_e4m3fn), "row": torch.zeros(4, 4)[1:2]}


def test_pth_refs_read_every_kind_of_tensor(tmp_path):
    sd = odd_state_dict()
    torch.save(sd, tmp_path / "x.pth")
    refs = torch_zip_refs(tmp_path / "x.pth")
    assert list(refs) == list(sd)
    for name, ref in refs.items():
        want = sd[name].detach()
        assert (ref.name, ref.dtype, ref.shape, ref.nbytes) == (name, code(want), tuple(want.shape),
                                                                want.numel() * want.element_size())
        t = tensor(ref)
        assert t.dtype == want.dtype and raw(t) == raw(want)
        t.view(torch.uint8).fill_(0xAB) if t.dim() else None  # writable...
        assert raw(tensor(ref)) == raw(want)  # ...and a fresh copy each time
    assert refs["view"].offset == refs["whole"].offset + 2 * 4 * 4  # shared storage, element offset 8
    assert torch.equal(tensor(refs["whole"].rows(1, 3)), sd["whole"][1:3])
    assert refs["whole"].rows(2, 4).read() == refs["view"].read()


def test_archive_folder_name_comes_from_data_pkl(tmp_path):
    torch.save(SD, tmp_path / "consolidated.00.pth")  # torch names the folder after the file: consolidated.00/
    assert zipfile.ZipFile(tmp_path / "consolidated.00.pth").namelist()[0] == "consolidated.00/data.pkl"
    refs = torch_zip_refs(tmp_path / "consolidated.00.pth")
    assert all(torch.equal(tensor(refs[k]), v) for k, v in SD.items())


def test_split_parts_read_in_place(tmp_path):
    torch.save(SD, tmp_path / "consolidated.00.pth")
    whole = torch_zip_refs(tmp_path / "consolidated.00.pth")
    data = (tmp_path / "consolidated.00.pth").read_bytes()
    cut = [0, 1000, 300_000, 301_000, len(data)]  # a part boundary inside a tensor and inside the zip header
    for i in range(4):
        (tmp_path / f"consolidated.00.pth-split{i}").write_bytes(data[cut[i]:cut[i + 1]])
    (tmp_path / "consolidated.00.pth").unlink()
    parts = torch_zip_refs(tmp_path / "consolidated.00.pth")
    assert {k: (r.offset, r.nbytes) for k, r in parts.items()} == {k: (r.offset, r.nbytes) for k, r in whole.items()}
    for name, ref in parts.items():
        assert ref.read() == data[ref.offset:ref.offset + ref.nbytes]
        assert torch.equal(tensor(ref), SD[name])
    assert not (tmp_path / "consolidated.00.pth").exists()


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


MARKER = Path("/nonexistent")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    global MARKER
    MARKER = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "evil.pth")
    assert e.value.problem == f"unsafe pickle refused: global {os.system.__module__}.system"
    assert not MARKER.exists()


def test_only_tensor_rebuilders_are_callable(tmp_path):
    """Globals that torch.load's weights_only would allow but a state dict never needs are refused too."""
    torch.save({"w": torch.zeros(2), "shape": torch.Size([2])}, tmp_path / "x.pth")
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "x.pth")
    assert e.value.problem == "unsafe pickle refused: global torch.Size"
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "list.pth")
    assert e.value.problem == "top-level object is a list, expected a dict of tensors"


def test_build_cannot_rewrite_a_checked_stand_in(tmp_path):
    # GLOBAL torch.FloatStorage; {"code": "XX"}; BUILD; STOP
    evil = b"\x80\x02ctorch\nFloatStorage\n}X\x04\x00\x00\x00codeX\x02\x00\x00\x00XXsb."
    with zipfile.ZipFile(tmp_path / "x.pth", "w") as z:
        z.writestr("archive/data.pkl", evil)
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "x.pth")
    assert e.value.problem.startswith("data.pkl is not a valid pickle: ")


def rezip(src: Path, dest: Path, deflate: str | None) -> None:
    """Copy a torch zip, compressing the members whose name ends with deflate."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for m in zin.infolist():
            kind = zipfile.ZIP_DEFLATED if deflate and m.filename.endswith(deflate) else zipfile.ZIP_STORED
            zout.writestr(m.filename, zin.read(m), compress_type=kind)


def test_compressed_member_is_refused(tmp_path):
    torch.save({"a": torch.ones(8), "b": torch.zeros(8)}, tmp_path / "x.pth")
    rezip(tmp_path / "x.pth", tmp_path / "plain.pth", None)  # python's zip writer: no alignment padding
    assert torch.equal(tensor(torch_zip_refs(tmp_path / "plain.pth")["b"]), torch.zeros(8))
    rezip(tmp_path / "x.pth", tmp_path / "deflated.pth", "/data/1")
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "deflated.pth")
    assert e.value.problem == "member x/data/1 is compressed or encrypted; torch.save stores every member as is"


def test_non_contiguous_tensor_is_refused(tmp_path):
    torch.save({"ok": torch.zeros(2), "t": torch.zeros(4, 4)[:, :2]}, tmp_path / "x.pth")
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "x.pth")
    assert e.value.problem == "t: not contiguous (shape [4, 2], stride [4, 1])"


def test_not_a_zip(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"not a zip at all")
    with pytest.raises(FormatError) as e:
        torch_zip_refs(tmp_path / "x.pth")
    assert e.value.problem == "not a valid zip archive (torch.save format): File is not a zip file"


def test_safetensors_refs(tmp_path):
    sd = {k: v for k, v in odd_state_dict().items() if k not in ("view", "param", "f8", "u16")}
    save_file(sd, tmp_path / "x.safetensors", metadata={"format": "pt"})
    refs = safetensors_refs(tmp_path / "x.safetensors")
    assert set(refs) == set(sd)
    for name, ref in refs.items():
        assert torch.equal(tensor(ref), sd[name])
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(FormatError) as e:  # the header rules verify applies
        safetensors_refs(tmp_path / "bad.safetensors")
    assert e.value.problem == "file is 2 bytes, too small for a safetensors header"


def test_read_past_a_truncated_file(tmp_path):
    ref = TensorRef("w", "F32", (4,), tmp_path / "short.bin", 8, 16)
    (tmp_path / "short.bin").write_bytes(bytes(20))
    with pytest.raises(FormatError) as e:
        ref.read()
    assert (e.value.path, e.value.problem) == (str(tmp_path / "short.bin"),
                                               "w: truncated: needs 16 bytes at offset 8, got 12")
    with pytest.raises(ValueError):
        ref.rows(3, 5)


# --- write_safetensors ---------------------------------------------------------------------------

PLAN = [(k, code(v), tuple(v.shape)) for k, v in SD.items()]
RAW = {k: raw(v) for k, v in SD.items()}


def test_write_round_trip_and_hashes(tmp_path):
    out = write_safetensors(tmp_path / "a.safetensors", PLAN, iter(RAW.values()), {"format": "pt"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert out["size"] == len(raw) and out["blake3"] == blake3.blake3(raw).hexdigest()
    loaded = load_file(tmp_path / "a.safetensors")
    assert set(loaded) == set(SD) and all(torch.equal(loaded[k], v) for k, v in SD.items())
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header) == ["__metadata__", *SD] and header["__metadata__"] == {"format": "pt"}
    assert (8 + len(raw[8:8 + int.from_bytes(raw[:8], "little")])) % 8 == 0
    for name, ref in safetensors_refs(tmp_path / "a.safetensors").items():
        assert out["tensors"][name] == blake3.blake3(ref.read()).hexdigest()
        assert out["tensors"][name] == blake3.blake3(RAW[name]).hexdigest()
    # the same input gives the same bytes
    assert write_safetensors(tmp_path / "b.safetensors", PLAN, (RAW[k] for k, *_ in PLAN), {"format": "pt"}) == out
    assert (tmp_path / "b.safetensors").read_bytes() == raw


def test_write_matches_the_library_byte_for_byte(tmp_path):
    """With names sorted and one dtype the safetensors library lays a file out as we do."""
    sd = {k: SD[k] for k in sorted(SD)}
    save_file(sd, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", [(k, "BF16", tuple(v.shape)) for k, v in sd.items()],
                      (raw(v) for v in sd.values()), {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_write_checks_against_the_plan_and_leaves_nothing(tmp_path):
    dest = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"^tok_embeddings.weight: got 256000 bytes, the plan says 128000"):
        write_safetensors(dest, PLAN, (raw(v.float()) for v in SD.values()))
    with pytest.raises(ValueError, match="the tensors ran out before the plan did"):
        write_safetensors(dest, PLAN, list(RAW.values())[:3])
    with pytest.raises(ValueError, match="more tensors than the plan's 1"):
        write_safetensors(dest, PLAN[:1], RAW.values())
    with pytest.raises(ValueError, match="at most one __metadata__ key"):
        write_safetensors(dest, PLAN, RAW.values(), {"a": "1", "b": "2"})
    assert list(tmp_path.iterdir()) == []  # no temp file, no partial file


def test_write_edge_tensors(tmp_path):
    sd = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
          "strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t()}  # made contiguous on write
    plan = [(k, code(v), tuple(v.shape)) for k, v in sd.items()]
    write_safetensors(tmp_path / "x.safetensors", plan, (raw(v) for v in sd.values()))
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    # the one dtype table names every dtype as torch does, with torch's element sizes
    assert all(getattr(torch, NAMES[c]).itemsize == size for c, (_, size) in DTYPES.items())


# --- memory ------------------------------------------------------------------------------------

RSS_SCRIPT = """
import sys
from weightswarm.formats.torchzip import torch_zip_refs
from weightswarm.runner.load import from_bytes
def status(key):  # VmRSS now, VmHWM peak since the last reset
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
for path in sys.argv[1:]:
    refs = torch_zip_refs(path)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    base = status("VmRSS")
    for ref in refs.values():
        t = from_bytes(ref.read(), ref.dtype, ref.shape)
        del t
    print(len(refs), sum(r.nbytes for r in refs.values()), max(r.nbytes for r in refs.values()),
          base, status("VmHWM"))
"""


def test_reading_tensor_by_tensor_keeps_memory_at_one_tensor(tmp_path):
    """Peak RSS while reading every tensor of a checkpoint one at a time grows by about the largest
    tensor, not by the checkpoint (measured in a fresh process, peak reset after opening)."""
    big = 2**25  # 64 MiB of bf16
    torch.save({f"small.{i}": torch.zeros(1000) for i in range(50)} | {"big": torch.zeros(big, dtype=torch.bfloat16),
               "big2": torch.ones(big, dtype=torch.bfloat16)}, tmp_path / "big.pth")
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big.pth")], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent.parent)
    n, total, largest, base, peak = run.stdout.split()
    assert int(largest) == 2 * big and int(total) > 2 * int(largest)
    assert int(peak) - int(base) < 1.5 * int(largest)
