import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from weightswarm.core.errors import FormatError, VerificationError
from weightswarm.formats.params import ModelArgs, MoeArgs
from weightswarm.verify.report import Finding
from weightswarm.verify.structure import check_structure, pth_tensors, safetensors_tensors

ARGS = ModelArgs(dim=16, n_layers=2, head_dim=4, hidden_dim=32, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=10, moe=MoeArgs(num_experts=2, num_experts_per_tok=1))
N_TENSORS = ARGS.tensor_count()  # 2 layers * (6 + 1 + 2*3) + 3 = 29


def state_dict(args=ARGS):
    return {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in dict(args.tensor_shapes()).items()}


def release(folder, sd=None, fmt="pth"):
    folder.mkdir(exist_ok=True)
    (folder / "params.json").write_text(json.dumps(ARGS.to_dict()))
    sd = state_dict() if sd is None else sd
    if fmt == "pth":
        torch.save(sd, folder / "consolidated.00.pth")
    else:
        save_file(sd, folder / "consolidated.safetensors")
    return folder


def test_good_pth(tmp_path):
    release(tmp_path)
    assert pth_tensors(tmp_path / "consolidated.00.pth") == {k: ("BF16", s) for k, s in dict(ARGS.tensor_shapes()).items()}
    assert check_structure(tmp_path) == [
        Finding("structure", "consolidated.00.pth", True, f"zip CRCs ok, {N_TENSORS} tensors"),
        Finding("params", "params.json", True, f"{N_TENSORS} tensors match consolidated.00.pth"),
    ]


def test_good_safetensors_in_subfolder(tmp_path):
    release(tmp_path / "m", fmt="safetensors")
    (tmp_path / "m" / "tokenizer.model").write_bytes(b"not a weight file")
    assert check_structure(tmp_path) == [
        Finding("structure", "m/consolidated.safetensors", True, f"header ok, {N_TENSORS} tensors"),
        Finding("params", "m/params.json", True, f"{N_TENSORS} tensors match consolidated.safetensors"),
    ]


def test_split_pth_is_read_without_joining(tmp_path):
    release(tmp_path)
    data = (tmp_path / "consolidated.00.pth").read_bytes()
    (tmp_path / "consolidated.00.pth").unlink()
    cuts = [0, 1000, 5000, len(data)]
    for i in range(3):
        (tmp_path / f"consolidated.00.pth-split{i}").write_bytes(data[cuts[i]:cuts[i + 1]])
    assert check_structure(tmp_path) == [
        Finding("structure", "consolidated.00.pth", True, f"zip CRCs ok, {N_TENSORS} tensors (3 split parts)"),
        Finding("params", "params.json", True, f"{N_TENSORS} tensors match consolidated.00.pth"),
    ]
    assert not (tmp_path / "consolidated.00.pth").exists()


def flip_in_member(path: Path) -> str:
    """Flip one byte inside the data of the biggest zip member; returns the member's name."""
    with zipfile.ZipFile(path) as z:
        m = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[m.header_offset + 26:m.header_offset + 30])
    start = m.header_offset + 30 + name_len + extra_len
    data[start + m.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return m.filename


def test_flipped_byte_names_the_member(tmp_path):
    release(tmp_path)
    member = flip_in_member(tmp_path / "consolidated.00.pth")
    with pytest.raises(VerificationError) as e:  # wrong bytes, not a malformed file: exit 1
        pth_tensors(tmp_path / "consolidated.00.pth")
    assert e.value.problem == f"bad CRC-32 in member {member}"
    assert check_structure(tmp_path) == [
        Finding("structure", "consolidated.00.pth", False, f"bad CRC-32 in member {member}"),
        Finding("params", "params.json", False, "cannot compare: consolidated.00.pth failed its structure check"),
    ]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(FormatError) as e:
        pth_tensors(tmp_path / "evil.pth")
    # The converter's restricted reader: verify refuses what the converter refuses, in the same words.
    assert e.value.problem == f"unsafe pickle refused: global {os.system.__module__}.system"
    [f] = check_structure(tmp_path)
    assert not f.ok and f.detail == e.value.problem
    assert not marker.exists()


def test_top_level_must_be_a_dict_of_tensors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"a": torch.zeros(2), "b": 3}, tmp_path / "int.pt")
    with pytest.raises(FormatError) as e:
        pth_tensors(tmp_path / "list.pt")
    assert e.value.problem == "top-level object is a list, expected a dict of tensors"
    with pytest.raises(FormatError) as e:
        pth_tensors(tmp_path / "int.pt")
    assert e.value.problem == "'b': expected a str key and a tensor, got int"


def test_not_a_zip(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"\x80\x02not a zip" * 10)
    with pytest.raises(FormatError) as e:
        pth_tensors(tmp_path / "x.pth")
    assert e.value.problem == "not a valid zip archive (torch.save format): File is not a zip file"


def test_big_pth_is_checked_in_bounded_memory(tmp_path):
    size = 256 << 20
    torch.save({"w": torch.zeros(size, dtype=torch.uint8)}, tmp_path / "big.pth")
    # ru_maxrss would carry over the parent's peak through fork+exec: reset the peak (VmHWM) instead,
    # after importing torch, so only the check itself is measured.
    script = ("import sys, torch\nfrom weightswarm.verify.structure import pth_tensors\n"
              "def kib(key):\n"
              "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
              "    return int(line.split()[1])\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              "before = kib('VmRSS:')\n"
              "info = pth_tensors(sys.argv[1])\n"
              "print(info['w'][1][0], kib('VmHWM:') - before)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.pth")], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, check=True).stdout.split()
    assert int(out[0]) == size
    assert int(out[1]) < 48 << 10  # peak RSS grew by less than 48 MiB (ru_maxrss is in KiB)


def test_hidden_folders_and_broken_files(tmp_path):
    (tmp_path / ".weightswarm").mkdir()
    (tmp_path / ".weightswarm" / "junk.pth").write_bytes(b"junk")
    (tmp_path / ".pad").mkdir()
    (tmp_path / ".pad" / "0.safetensors").write_bytes(b"junk")
    (tmp_path / "a.safetensors").write_bytes(b"junk")
    save_file({"x": torch.zeros(3)}, tmp_path / "b.safetensors")
    assert check_structure(tmp_path) == [
        Finding("structure", "a.safetensors", False, "file is 4 bytes, too small for a safetensors header",
                refused=True),
        Finding("structure", "b.safetensors", True, "header ok, 1 tensors"),
    ]


# --- safetensors rules, on hand-built bytes ---------------------------------------------------

def st_bytes(header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(begin, end, shape=None):
    return {"dtype": "F32", "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


def test_hand_built_file_matches_the_library(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": f32(8, 16, [2]), "a": f32(0, 8, [1, 2]),
              "e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [16, 16]}}
    (tmp_path / "x.safetensors").write_bytes(st_bytes(header, bytes(16)))
    expected = {"b": ("F32", (2,)), "a": ("F32", (1, 2)), "e": ("BF16", (0, 3))}
    assert safetensors_tensors(tmp_path / "x.safetensors") == expected
    with safetensors.safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {k: v[1] for k, v in expected.items()}


BAD = [
    ("too small", b"\x01\x02", "file is 2 bytes, too small for a safetensors header"),
    ("header too big", st_bytes(b"{}", length=100_000_001), "header length 100000001 exceeds the 100000000-byte limit"),
    ("header past end", st_bytes(b"{}", bytes(8), length=50), "header length 50 runs past the end of the file (18 bytes)"),
    ("not utf-8", st_bytes(b"{\xff}"), "header is not valid UTF-8"),
    ("not an object", st_bytes(b"[1]"), "header does not start with '{'"),
    ("not json", st_bytes(b"{nope"), "header is not valid JSON: Expecting property name enclosed in double quotes at byte 1"),
    ("duplicate", st_bytes(b'{"a": 1, "a": 2}'), "a: appears twice in the header"),
    ("metadata", st_bytes({"__metadata__": {"k": 1}}), "__metadata__: must map strings to strings"),
    ("entry", st_bytes({"a": [1]}), "a: entry is not an object"),
    ("no dtype", st_bytes({"a": {"shape": [], "data_offsets": [0, 0]}}), "a: missing dtype"),
    ("dtype", st_bytes({"a": {**f32(0, 4), "dtype": "F12"}}, bytes(4)), "a: unknown dtype 'F12'"),
    ("shape", st_bytes({"a": f32(0, 4, [-1])}, bytes(4)), "a: shape must be a list of non-negative integers, got [-1]"),
    ("bool shape", st_bytes({"a": f32(0, 4, [True])}, bytes(4)),
     "a: shape must be a list of non-negative integers, got [True]"),
    ("offsets", st_bytes({"a": f32(8, 4, [1])}, bytes(8)),
     "a: data_offsets must be [begin, end] with 0 <= begin <= end, got [8, 4]"),
    ("wrong size", st_bytes({"a": f32(0, 8, [3])}, bytes(8)), "a: F32 [3] needs 12 bytes, data_offsets span 8"),
    ("past the end", st_bytes({"a": f32(0, 8)}, bytes(4)), "a: data_offsets end 8 is past the end of the data (4 bytes)"),
    ("overlap", st_bytes({"a": f32(0, 8), "b": f32(4, 12)}, bytes(12)), "b: starts at byte 4, overlapping a which ends at 8"),
    ("gap", st_bytes({"a": f32(0, 8), "b": f32(12, 20)}, bytes(20)), "b: starts at byte 12, leaving a 4-byte gap after a"),
    ("gap at start", st_bytes({"a": f32(4, 12)}, bytes(12)),
     "a: starts at byte 4, leaving a 4-byte gap at the start of the data"),
    ("trailing", st_bytes({"a": f32(0, 8)}, bytes(10)), "2 trailing bytes after the last tensor"),
]


@pytest.mark.parametrize("raw,problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_lying_safetensors_header(tmp_path, raw, problem):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    with pytest.raises(FormatError) as e:
        safetensors_tensors(path)
    assert e.value.problem == problem
    assert e.value.path == str(path)
    # the reference loader refuses these files too: our rules are not stricter than the format's
    with pytest.raises(Exception), safetensors.safe_open(path, "pt") as f:  # noqa: B017 (whatever it raises)
        [f.get_tensor(k) for k in f.keys()]


# --- params.json against the checkpoint --------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_params_mismatch(tmp_path, fmt):
    sd = state_dict()
    del sd["layers.1.ffn_norm.weight"]
    sd["foo"] = torch.zeros(1)
    sd["layers.0.attention.wq.weight"] = torch.zeros(8, 16)
    release(tmp_path, sd, fmt)
    name = "consolidated.00.pth" if fmt == "pth" else "consolidated.safetensors"
    assert check_structure(tmp_path)[1] == Finding(
        "params", "params.json", False,
        "missing layers.1.ffn_norm.weight; unexpected foo; layers.0.attention.wq.weight has shape [8, 16], "
        "params imply [16, 16]")
    assert check_structure(tmp_path)[0].path == name


def test_params_only_first_five_problems(tmp_path):
    sd = state_dict()
    for k in list(sd)[:7]:
        del sd[k]
    release(tmp_path, sd)
    detail = check_structure(tmp_path)[1].detail
    assert detail.count("missing ") == 5 and detail.endswith("; and 2 more")


def test_params_without_checkpoint_or_broken(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(ARGS.to_dict()))
    assert check_structure(tmp_path) == [
        Finding("params", "params.json", True,
                "valid; no consolidated.00.pth or consolidated.safetensors beside it to compare with")]
    release(tmp_path)
    (tmp_path / "params.json").write_text("{")
    [_, f] = check_structure(tmp_path)
    assert not f.ok and f.detail.startswith("not valid JSON")
