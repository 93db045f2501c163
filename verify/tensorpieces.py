"""The tensor -> piece map of a release torrent in its original layout, and what a node serving some experts
needs of it: the small files whole, the pieces the map was read from, and the pieces of the dense tensors
and of its experts' tensors.

A map is read from the torrent and from the bytes on disk known to be good: ``have(piece)`` says which
(fetch: libtorrent hashed them on arrival; verify: hashed here, on demand). Until the headers and archive
metadata it reads are there, ``map_release`` raises formats.partial.Absent; ``pieces_of`` turns its ranges
into the pieces to fetch first. The map is checked like any input (formats.layouts, formats.torchzip).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from weightswarm.core.errors import FormatError, VerificationError
from weightswarm.core.units import plural
from weightswarm.formats.layouts import Layout, open_layout
from weightswarm.formats.partial import Absent, Partial, Range
from weightswarm.formats.perexpert import check_experts, expert_of_tensor
from weightswarm.formats.splitfile import split_base
from weightswarm.formats.tensorref import WEIGHT_SUFFIXES
from weightswarm.formats.torchzip import check_crcs
from weightswarm.verify.pieces import check_pieces
from weightswarm.verify.report import Finding, first_few

if TYPE_CHECKING:  # verify needs no BitTorrent code at run time; distrib imports verify
    from weightswarm.distrib.torrentfile import Torrent

# The layouts whose tensors can be fetched one by one, by the files that mark them.
_MARKS = ("consolidated.00.pth", "consolidated.safetensors", "model.safetensors.index.json", "model.safetensors")


def is_weight_file(path: str) -> bool:
    name = path.rpartition("/")[2]
    return (split_base(name) or name).endswith(WEIGHT_SUFFIXES)


def selectable(torrent: Torrent) -> bool:
    """Whether the torrent holds a layout whose tensors map to byte ranges (consolidated or HF)."""
    names = {split_base(f.path) or f.path for f in torrent.payload_files()}
    return any(m in names for m in _MARKS)


def small_files(torrent: Torrent) -> list[str]:
    """The payload files that are not weights (params, tokenizer, RELEASE, configs): always fetched whole."""
    return [f.path for f in torrent.payload_files() if not is_weight_file(f.path)]


def metadata_guess(torrent: Torrent) -> set[int]:
    """The pieces a map almost surely reads, to ask for with the small files: each weight file's first piece
    (a safetensors header; a torch zip's data.pkl) and a torch zip's last (its end records and, mostly, its
    central directory). Split parts count as the file they make."""
    files = [f for f in torrent.payload_files() if is_weight_file(f.path) and f.size]
    plen = torrent.info.piece_length()
    out: set[int] = set()
    for f in files:
        folder, _, name = f.path.rpartition("/")
        base = split_base(name)
        n = int(name.rpartition("-split")[2]) if base else 0
        parts = [int(g.path.rpartition("-split")[2]) for g in files
                 if base and g.path.rpartition("/")[0] == folder and split_base(g.path.rpartition("/")[2]) == base]
        if base is None or n == min(parts):
            out.add(f.offset // plen)
        if (base or name).endswith((".pth", ".pt")) and (base is None or n == max(parts)):
            out.add((f.offset + f.size - 1) // plen)
    return out


def pieces_of(torrent: Torrent, ranges: list[Range]) -> set[int]:
    """The pieces that hold these byte ranges of payload files."""
    by_path = {f.path: f for f in torrent.payload_files()}
    plen = torrent.info.piece_length()
    out: set[int] = set()
    for rel, lo, hi in ranges:
        f = by_path[rel]
        if hi > lo:
            out.update(range((f.offset + lo) // plen, (f.offset + hi - 1) // plen + 1))
    return out


def payload_bytes(torrent: Torrent, pieces: set[int]) -> int:
    """The file bytes (pad files left out) these pieces hold."""
    plen = torrent.info.piece_length()
    total = 0
    for f in torrent.payload_files():
        first, last = f.offset // plen, (f.offset + f.size - 1) // plen
        for p in pieces:
            if f.size and first <= p <= last:
                total += min(f.offset + f.size, (p + 1) * plen) - max(f.offset, p * plen)
    return total


def file_pieces(torrent: Torrent, paths: list[str]) -> set[int]:
    by_path = {f.path: f for f in torrent.payload_files()}
    return pieces_of(torrent, [(p, 0, by_path[p].size) for p in paths])


@dataclass
class PieceMap:
    """A release's tensors as pieces, and the pieces its map was read from."""

    torrent: Torrent
    layout: Layout  # partial: every tensor an Extent
    meta: set[int] = field(default_factory=set)
    tensor_pieces: dict[str, set[int]] = field(default_factory=dict)

    @property
    def experts(self) -> list[int]:
        moe = self.layout.params.moe
        return list(range(moe.num_experts)) if moe else []

    def tensors(self, experts: tuple[int, ...]) -> list[str]:
        """The canonical tensors a node serving ``experts`` needs: the dense ones and those experts'."""
        check_experts(experts, self.experts)
        return [n for n in self.layout.tensors if (le := expert_of_tensor(n)) is None or le[1] in experts]

    def wanted(self, experts: tuple[int, ...]) -> set[int]:
        out = self.meta | file_pieces(self.torrent, small_files(self.torrent))
        for name in self.tensors(experts):
            out |= self.tensor_pieces[name]
        return out

    def files_of(self, names: list[str]) -> dict[str, list[str]]:
        """Weight file (relative, logical) -> the named tensors in it."""
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(self.layout.partial.rel(self.layout.tensors[name].ref.path), []).append(name)
        return out


def partial_of(root: Path, torrent: Torrent, have: Callable[[int], bool],
               seen: set[int] | None = None) -> Partial:
    """The release at root as a Partial whose present bytes are those of pieces ``have`` says are good;
    every piece found present is added to ``seen``."""
    def present(rel: str, lo: int, hi: int) -> bool:
        pieces = pieces_of(torrent, [(rel, lo, hi)])
        ok = all(have(p) for p in pieces)
        if ok and seen is not None:
            seen.update(pieces)
        return ok

    return Partial(root, {f.path: f.size for f in torrent.payload_files()}, present)


def map_release(root: str | os.PathLike, torrent: Torrent, have: Callable[[int], bool]) -> PieceMap:
    """The tensor -> piece map of the release at root (Absent until its metadata is there)."""
    root = Path(root)
    meta: set[int] = set()
    layout = open_layout(root, partial_of(root, torrent, have, meta))
    pm = PieceMap(torrent, layout, meta)
    for name, t in layout.tensors.items():
        pm.tensor_pieces[name] = pieces_of(torrent, layout.partial.ranges(t.ref.path, t.ref.lo, t.ref.hi))
    return pm


def check_selection(pm: PieceMap, names: list[str], experts: tuple[int, ...], workers: int = 2) -> list[Finding]:
    """One "structure" Finding per weight file: the named tensors located (a torch zip member's local
    header read and checked) and, for torch zips, their members' CRCs. Their bytes must be there."""
    findings = []
    which = f"the dense tensors and experts {','.join(map(str, experts))}"
    for rel, tensors in pm.files_of(names).items():
        path = pm.layout.root / rel
        try:
            members = set()
            for name in tensors:
                pm.layout.located(name)
                if pm.layout.tensors[name].ref.member:
                    members.add(pm.layout.tensors[name].ref.member)
            if members:
                check_crcs(path, workers, members, pm.layout.partial)
        except FormatError as e:
            findings.append(Finding("structure", rel, False, e.problem, refused=True))
            continue
        except VerificationError as e:
            findings.append(Finding("structure", rel, False, e.problem))
            continue
        crcs = ", zip CRCs ok" if members else ""
        findings.append(Finding("structure", rel, True, f"{plural(len(tensors), 'tensor')} of "
                                f"{len(pm.layout.tensors)} here ({which}){crcs}"))
    return findings


class _Hashed:
    """have(piece) for a folder: the piece hashed here on first ask, remembered after."""

    def __init__(self, root: Path, torrent: Torrent):
        self.root, self.torrent, self.good = root, torrent, {}

    def __call__(self, piece: int) -> bool:
        if piece not in self.good:
            self.good[piece] = not check_pieces(self.root, self.torrent, [piece], workers=1).bad
        return self.good[piece]

    def check(self, pieces: set[int], workers: int, progress: Callable[[int], None] | None) -> None:
        todo = sorted(p for p in pieces if p not in self.good)
        bad = set(check_pieces(self.root, self.torrent, todo, workers, progress=progress).bad)
        self.good |= {p: p not in bad for p in todo}


def verify_selection(root: str | os.PathLike, torrent: Torrent, experts: tuple[int, ...], workers: int = 2,
                     progress: Callable[[int], None] | None = None) -> list[Finding]:
    """A release fetched for some experts: every piece they need here and right (the small files whole),
    then the structure of what is there. The other pieces are not looked at."""
    root = Path(root)
    have = _Hashed(root, torrent)
    try:
        pm = map_release(root, torrent, have)
    except Absent as e:
        where = ", ".join(f"{rel} bytes {lo}-{hi}" for rel, lo, hi in e.ranges[:3])
        return [Finding("pieces", e.ranges[0][0], False, f"the tensor map cannot be read: {where} missing or wrong")]
    except FormatError as e:
        return [Finding("structure", Path(str(e.path)).name, False, e.problem, refused=True)]
    wanted = pm.wanted(experts)
    have.check(wanted, workers, progress)
    findings = []
    for f in torrent.payload_files():
        mine = file_pieces(torrent, [f.path])
        need = mine & wanted
        bad = sorted(p for p in need if not have.good[p])
        whole = "" if need == mine else f" (of {len(mine)}; the others are not needed)"
        detail = (f"{plural(len(need), 'wanted piece')} ok{whole}" if not bad
                  else first_few([f"piece {p} missing or failed" for p in bad]))
        findings.append(Finding("pieces", f.path, not bad, detail))
    if all(f.ok for f in findings):
        findings += check_selection(pm, pm.tensors(experts), experts, workers)
    return findings
