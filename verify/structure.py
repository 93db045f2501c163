"""Structural checks of weight files: the torch.save zip rules and every member's CRC for .pth, the header
rules for .safetensors, and params.json against the checkpoint's tensors. Nothing is materialised and
nothing is unpickled but by formats.torchzip's restricted reader: a 93 GB checkpoint is checked with memory
bounded by a few read buffers, and a file the converter would refuse is refused here too.
"""
from __future__ import annotations

import os
from pathlib import Path

from weightswarm.core.errors import FormatError, InputError, VerificationError
from weightswarm.core.inputs import os_problem
from weightswarm.core.paths import confined, walk_files
from weightswarm.formats import safetensors
from weightswarm.formats.params import ModelArgs
from weightswarm.formats.splitfile import split_base, split_parts
from weightswarm.formats.tensorref import WEIGHT_SUFFIXES
from weightswarm.formats.torchzip import check_crcs, torch_zip_refs
from weightswarm.verify.report import Finding, first_few

TensorInfo = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype code, shape)

# The checkpoint params.json describes, first match wins.
CHECKPOINTS = ("consolidated.00.pth", "consolidated.safetensors")


def pth_tensors(path: str | os.PathLike, workers: int = 2) -> TensorInfo:
    """Tensors of a torch.save zip (or its split parts), after checking the archive's rules and every
    member's CRC. Raises FormatError (the file breaks the format) or VerificationError (a bad CRC)."""
    refs = torch_zip_refs(path)
    check_crcs(path, workers)
    return {name: (r.dtype, r.shape) for name, r in refs.items()}


def safetensors_tensors(path: str | os.PathLike) -> TensorInfo:
    """Tensors of a .safetensors file (or its split parts), its header checked (formats.safetensors)."""
    entries, _ = safetensors.read_header(path)
    return {name: (dtype, shape) for name, (dtype, shape, _b, _e) in entries.items()}


def params_problems(args: ModelArgs, tensors: TensorInfo) -> list[str]:
    """What differs between the tensors params.json implies and the checkpoint's: missing names
    (checkpoint order), unexpected names (file order), then wrong shapes."""
    if args.tensor_count() > 4 * len(tensors) + 64:  # counted first: params may claim a hundred million layers
        return [f"missing {name}" for name, _ in args.missing(tensors)] + \
            [f"params imply {args.tensor_count()} tensors, the checkpoint has {len(tensors)}"]
    expected = dict(args.tensor_shapes())
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k} has shape {list(tensors[k][1])}, params imply {list(shape)}"
                 for k, shape in expected.items() if k in tensors and tuple(tensors[k][1]) != tuple(shape)]
    return problems


def _weight_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Weight files (real, or logical names of split groups) and params.json files, relative posix."""
    weights: dict[str, Path] = {}
    params = []
    for rel, path in walk_files(root):  # hidden names (.weightswarm, .pad, temp files) are left out
        logical = split_base(path.name) or path.name
        if logical.endswith(WEIGHT_SUFFIXES):
            # A real file sorts before its parts, and wins over them.
            weights.setdefault(rel.removesuffix(path.name) + logical, path.with_name(logical))
        elif path.name == "params.json":
            params.append(rel)
    return dict(sorted(weights.items())), params


def _check_weight(path: Path, rel: str, workers: int) -> tuple[Finding, TensorInfo | None]:
    """The file's Finding, and its tensors (None when it is broken). A file that breaks its format
    or is unsafe is refused (bad input); one whose bytes fail a CRC is wrong data."""
    try:
        parts = [] if path.is_file() else split_parts(path)
        suffix = f" ({len(parts)} split parts)" if parts else ""
        if path.name.endswith(".safetensors"):
            tensors = safetensors_tensors(path)
            return Finding("structure", rel, True, f"header ok, {len(tensors)} tensors{suffix}"), tensors
        tensors = pth_tensors(path, workers)
        return Finding("structure", rel, True, f"zip CRCs ok, {len(tensors)} tensors{suffix}"), tensors
    except FormatError as e:
        return Finding("structure", rel, False, e.problem, refused=True), None
    except VerificationError as e:
        return Finding("structure", rel, False, e.problem), None
    except InputError as e:  # unreadable, or no longer a regular file
        return Finding("structure", rel, False, e.problem, refused=True), None
    except OSError as e:
        return Finding("structure", rel, False, f"unreadable: {os_problem(e)}"), None


def check_structure(root: str | os.PathLike, workers: int = 2) -> list[Finding]:
    """One Finding (check="structure") per weight file, then one (check="params") per params.json.

    Hidden folders and files are skipped; split groups count as their logical file. A file that
    breaks its format gives a failing Finding, never an exception.
    """
    root = Path(root)
    weights, params = _weight_files(root)
    findings, tensors_of = [], {}
    for rel, path in weights.items():
        try:
            confined(root, rel, rel)  # a symlink out of the folder is not ours to open
        except InputError as e:
            findings.append(Finding("structure", rel, False, e.problem, refused=True))
            tensors_of[rel] = None
            continue
        finding, tensors_of[rel] = _check_weight(path, rel, workers)
        findings.append(finding)
    for rel in params:
        findings.append(_check_params(root, rel, weights, tensors_of))
    return findings


def _check_params(root: Path, rel: str, weights: dict[str, Path], tensors_of: dict) -> Finding:
    folder = Path(rel).parent
    ckpt = next((c for c in ((folder / n).as_posix() for n in CHECKPOINTS) if c in weights), None)
    try:
        args = ModelArgs.load(root / rel)
    except FormatError as e:
        return Finding("params", rel, False, e.problem, refused=True)
    if ckpt is None:
        # A partial fetch (say, only params.json) is not wrong: there is just nothing to compare with.
        return Finding("params", rel, True, f"valid; no {' or '.join(CHECKPOINTS)} beside it to compare with")
    tensors = tensors_of[ckpt]
    if tensors is None:
        return Finding("params", rel, False, f"cannot compare: {Path(ckpt).name} failed its structure check")
    problems = params_problems(args, tensors)
    if problems:
        return Finding("params", rel, False, first_few(problems))
    return Finding("params", rel, True, f"{len(tensors)} tensors match {Path(ckpt).name}")
