"""One torrent as the daemon runs it (Managed), its status report, and the confinement of paths to --data."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from weightswarm.core.errors import Forbidden, InputError, NotFound
from weightswarm.core.paths import confined, inside
from weightswarm.distrib.daemon.state import Entry
from weightswarm.distrib.torrentfile import FileEntry, Torrent


class PathGuard:
    """Every data path the daemon touches lies under --data, symlinks resolved."""

    def __init__(self, data: Path):
        self.data = data.resolve()

    def confine_save_path(self, text: str) -> str:
        """A save path from a request, absolute or relative to --data, as the normalised posix path relative
        to --data it resolves to ('' = --data itself); Forbidden if it resolves anywhere else."""
        if "\\" in text:
            raise Forbidden(text, "backslashes are not path separators here")
        return inside(self.data, text)

    def save_dir(self, save_rel: str) -> Path:
        return self.data / save_rel if save_rel else self.data

    def payload(self, torrent: Torrent, save_rel: str) -> list[Path]:
        """The path of every payload file, each checked to stay inside --data."""
        fs = torrent.info.layout()
        out = []
        for f in torrent.payload_files():
            rel = fs.file_path(f.index).replace(os.sep, "/")
            out.append(self._confined(f"{save_rel}/{rel}" if save_rel else rel))
        return out

    def file(self, torrent: Torrent, save_rel: str, path_in_torrent: str) -> tuple[Path, FileEntry]:
        """A payload file named by a web seed request; NotFound unless the torrent has it."""
        parts = path_in_torrent.split("/") if path_in_torrent else []
        if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            raise Forbidden(path_in_torrent, "path escapes the torrent's folder")
        files = torrent.payload_files()
        single = len(files) == 1 and "/" not in torrent.info.layout().file_path(files[0].index).replace(os.sep, "/")
        if single and parts:
            raise NotFound(path_in_torrent, "this torrent is a single file")
        f = files[0] if single else next((f for f in files if f.path == "/".join(parts)), None)
        if f is None:
            raise NotFound(path_in_torrent, "no such file in the torrent")
        rel = torrent.name if single else f"{torrent.name}/{f.path}"
        return self._confined(f"{save_rel}/{rel}" if save_rel else rel), f

    def _confined(self, rel: str) -> Path:
        try:
            return confined(self.data, rel, rel)
        except InputError as e:
            raise Forbidden(rel, e.problem) from None


@dataclass(eq=False)
class Managed:
    """A registered torrent in the session, with what the daemon learnt about it from alerts."""

    entry: Entry
    handle: lt.torrent_handle
    torrent: Torrent | None  # None until a magnet's metadata arrives
    start: dict  # how it was started: {"mode": "resume" | "verify-on-upload" | "check" | "metadata", "reason"}
    lazy: bool = False  # in seed mode after a crash: pieces are hashed before they are first sent
    verified: set[int] = field(default_factory=set)  # of a lazy torrent: pieces hashed since it started
    state: str = "checking_resume_data"  # from state_changed alerts
    checks: int = 0  # full re-checks seen since start (checking_files states)
    hash_failures: int = 0  # downloaded pieces that failed their hash
    found_bad: set[int] = field(default_factory=set)  # corrupt pieces found by scrubs, until fetched again
    recheck_requested: bool = False
    scrubbing: dict | None = None
    resume_saved: float | None = None
    error: str | None = None
    removed: bool = False
    status_cache: lt.torrent_status | None = None  # from state_update alerts, refreshed every tick

    def __post_init__(self):
        self.status_cache = self.handle.status()
        self.state = self.status_cache.state.name

    @property
    def name(self) -> str:
        return self.torrent.name if self.torrent else self.entry.name

    def hashes(self) -> set[str]:
        ih = self.handle.info_hashes()
        return {self.entry.id} | {str(h) for h, has in ((ih.v1, ih.has_v1()), (ih.v2, ih.has_v2())) if has}

    def files_of_piece(self, piece: int) -> list[str]:
        if self.torrent is None:
            return []
        ti, fs = self.torrent.info, self.torrent.info.layout()
        return [fs.file_path(s.file_index).replace(os.sep, "/") for s in ti.map_block(piece, 0, ti.piece_size(piece))
                if not int(fs.file_flags(s.file_index)) & int(fs.flag_pad_file)]

    def pieces_of(self, offset: int, length: int) -> range:
        plen = self.torrent.info.piece_length()
        return range(offset // plen, (offset + length - 1) // plen + 1) if length > 0 else range(0)

    def serves(self, pieces: range) -> bool:
        """Whether every piece is had here, not found bad and not being re-checked (a lazy torrent's pieces
        must also be hashed first: Daemon.verify_for_upload)."""
        if not pieces:
            return True
        if self.torrent is None or self.recheck_requested or self.state not in ("seeding", "finished", "downloading"):
            return False
        have = self.status_cache.pieces
        return all(i < len(have) and have[i] and i not in self.found_bad for i in pieces)

    def scrub_due(self, interval: float) -> bool:
        if self.scrubbing is not None or self.torrent is None or self.state != "seeding":
            return False
        last = (self.entry.last_scrub or {}).get("finished", self.entry.added)
        return time.time() - last >= interval

    def status(self) -> dict:
        st = self.status_cache
        size = self.torrent.info.total_size() if self.torrent else 0
        ih = self.handle.info_hashes()
        return {
            "id": self.entry.id, "name": self.name, "save_path": self.entry.save_path,
            "info_hash": {"v1": str(ih.v1) if ih.has_v1() else None, "v2": str(ih.v2) if ih.has_v2() else None},
            "state": "error" if self.error else self.state, "error": self.error,
            "progress": round(st.progress, 6), "size": size,
            "pieces": {"have": st.num_pieces, "total": self.torrent.info.num_pieces() if self.torrent else 0},
            "peers": st.num_peers, "seeds": st.num_seeds,
            "upload_rate": st.upload_payload_rate, "download_rate": st.download_payload_rate,
            "uploaded": st.all_time_upload, "downloaded": st.all_time_download,
            "ratio": round(st.all_time_upload / size, 4) if size else 0.0,
            "start": self.start, "rechecks": self.checks, "hash_failures": self.hash_failures,
            "bad_pieces": sorted(self.found_bad), "scrub": dict(self.scrubbing) if self.scrubbing else None,
            "last_scrub": self.entry.last_scrub,
            "resume_saved": self.resume_saved, "added": self.entry.added, "limits": self.entry.limits,
        }
