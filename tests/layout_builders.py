"""Write the same canonical (Mistral-named) state dict in each checkpoint layout a converter meets.

Used by the layout and converter tests: every layout built from one state dict must read back as it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from weightswarm.formats.hf import hf_config_from_params, mistral_to_hf
from weightswarm.formats.params import ModelArgs

Sd = dict[str, torch.Tensor]


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral's wq/wk rows -> HF's, as transformers' conversion script does it (not our byte-level code)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _params(folder: Path, args: ModelArgs) -> None:
    (folder / "params.json").write_text(json.dumps(args.to_dict()))


def _split(path: Path, n: int) -> list[Path]:
    """Cut path into n parts path-split0..n-1 (as the HF mirrors did) and remove it."""
    data = path.read_bytes()
    step = -(-len(data) // n)
    parts = []
    for i in range(n):
        parts.append(path.with_name(f"{path.name}-split{i}"))
        parts[-1].write_bytes(data[i * step:(i + 1) * step])
    path.unlink()
    return parts


def write_consolidated_pth(folder: Path, sd: Sd, args: ModelArgs, split: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _params(folder, args)
    torch.save(sd, folder / "consolidated.00.pth")
    if split:
        _split(folder / "consolidated.00.pth", split)
    return folder


def write_consolidated_safetensors(folder: Path, sd: Sd, args: ModelArgs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _params(folder, args)
    save_file(sd, folder / "consolidated.safetensors")
    return folder


def to_hf(sd: Sd, args: ModelArgs) -> Sd:
    """HF names, q/k rows permuted for rotate_half."""
    out = {}
    for name, t in sd.items():
        if name.endswith("attention.wq.weight"):
            t = permute_for_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_for_hf(t, args.n_kv_heads)
        out[mistral_to_hf(name)] = t.contiguous()
    return out


def write_hf(folder: Path, sd: Sd, args: ModelArgs, shards: int = 3) -> Path:
    """config.json plus model-0000k-of-0000n.safetensors and the index (shards > 1) or model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_from_params(args, "BF16"), indent=2))
    hf = to_hf(sd, args)
    if shards == 1:
        save_file(hf, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = list(hf)
    step = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: hf[n] for n in names[k * step:(k + 1) * step]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def to_stacked(sd: Sd, args: ModelArgs) -> Sd:
    """The first HF upload's names: experts stacked per layer, w2 stored transposed."""
    out, e_n = {}, args.moe.num_experts
    for name, t in sd.items():
        if ".experts." in name:
            continue
        if name.endswith("feed_forward.gate.weight"):
            name = name.replace("feed_forward.gate", "block_sparse_moe.gate")
        out[name] = t
        if name.endswith("ffn_norm.weight"):  # after a layer's dense tensors, its stacks
            layer = name.split(".")[1]
            ex = f"layers.{layer}.feed_forward.experts"
            out[f"layers.{layer}.block_sparse_moe.w1"] = torch.cat([sd[f"{ex}.{e}.w1.weight"] for e in range(e_n)])
            out[f"layers.{layer}.block_sparse_moe.w2"] = torch.cat([sd[f"{ex}.{e}.w2.weight"].t() for e in range(e_n)])
            out[f"layers.{layer}.block_sparse_moe.w3"] = torch.cat([sd[f"{ex}.{e}.w3.weight"] for e in range(e_n)])
    return out


def write_stacked(folder: Path, sd: Sd, args: ModelArgs, files: int = 2, params: str = "params.json") -> Path:
    """consolidated.00.pt .. 0N.pt with stacked experts, and params.json (or config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    if params == "params.json":
        _params(folder, args)
    else:
        (folder / "config.json").write_text(json.dumps(hf_config_from_params(args, "BF16")))
    st = to_stacked(sd, args)
    names = list(st)
    step = -(-len(names) // files)
    for k in range(files):
        torch.save({n: st[n] for n in names[k * step:(k + 1) * step]}, folder / f"consolidated.{k:02d}.pt")
    return folder
