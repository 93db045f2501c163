"""Everything ``verify`` and ``fetch`` check on a folder, in order: pieces, checksums, structure."""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from weightswarm.formats.perexpert import check_experts, expert_of_file, select_files
from weightswarm.verify.checksums import Entry, locate, parse_checksums, verify_entries
from weightswarm.verify.pieces import verify_pieces
from weightswarm.verify.report import Finding, Report
from weightswarm.verify.structure import check_structure
from weightswarm.verify.tensorpieces import selectable, small_files, verify_selection

# Where publishers put their sums: Mistral's RELEASE, `*.md5`, `SHA256SUMS`, `B3SUMS`...
CHECKSUM_GLOBS = ("RELEASE", "*.md5", "*SUMS", "*sums", "*SUMS.txt", "*sums.txt")

if TYPE_CHECKING:  # verify needs no BitTorrent code at run time; distrib imports verify
    from weightswarm.distrib.torrentfile import Torrent


def find_checksum_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in CHECKSUM_GLOBS))


def verify_folder(root: str | os.PathLike, torrent: Torrent | None = None,
                  checksum_files: list[Path] | None = None, algo: str | None = None,
                  published: list[tuple[str, str, str]] = (),
                  structure: bool = True, only: set[str] | None = None, workers: int = 2,
                  progress: Callable[[int], None] | None = None, experts: tuple[int, ...] | None = None) -> Report:
    """Run the checks that apply. ``checksum_files=None`` means the ones the payload carries (``[]``:
    none); ``published`` adds (path, algo, hex) sums known from elsewhere (the catalog); ``only``
    limits the checks to those payload paths (a partial fetch). ``experts`` (with a torrent): a release
    fetched for those experts only, by file (per-expert layout) or by tensor (verify.tensorpieces)."""
    root = Path(root)
    report = Report(str(root))
    if experts is not None:
        paths = [f.path for f in torrent.payload_files()]
        if not selectable(torrent) or any(expert_of_file(p) is not None for p in paths):
            have = sorted({e for p in paths if (e := expert_of_file(p)) is not None})
            check_experts(experts, have)
            only = set(select_files(paths, experts))
        else:
            # The weight files hold holes: their pieces and structure are checked tensor by tensor, and
            # the publisher's sums of them cannot match.
            report.extend(verify_selection(root, torrent, experts, workers, progress))
            torrent, structure, only = None, False, set(small_files(torrent))
    files = find_checksum_files(root) if checksum_files is None else checksum_files
    entries = []
    for cf in files:
        # Sums the payload carries may sit among prose (Mistral's RELEASE); ones the user names may not.
        entries += parse_checksums(locate(root, cf), algo, lenient=checksum_files is None)
    entries += [Entry(0, path, a, digest) for path, a, digest in published]
    # The catalog and RELEASE usually agree: hash a 93 GB file once, not once per list that names it.
    unique = [e for e in {(e.name, e.algo, e.digest): e for e in entries}.values() if only is None or e.name in only]
    # md5 runs on one core at ~0.5 GB/s, the pieces at ~1 GB/s per core: overlapped, the slower one sets the pace.
    with ThreadPoolExecutor(1) as side:
        sums = side.submit(verify_entries, root, unique, workers) if unique else None
        if torrent is not None:
            report.extend(_keep(verify_pieces(root, torrent, workers, progress), only))
        if sums is not None:
            report.extend(sums.result())
    if structure:
        report.extend(_keep(check_structure(root, workers), only))
    return report


def _keep(findings: list[Finding], only: set[str] | None) -> list[Finding]:
    return findings if only is None else [f for f in findings if f.path in only]
