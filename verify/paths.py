"""Confinement of paths that come from untrusted places (torrents, checksum files, requests)."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from weightswarm.errors import InputError


def check_components(parts: list[str], source: str | os.PathLike) -> None:
    """Refuse path components that could leave the root or mean something else on some OS."""
    if not parts:
        raise InputError(source, "empty file path")
    for p in parts:
        if p in ("", ".", "..") or "/" in p or "\\" in p or "\0" in p or (len(p) >= 2 and p[1] == ":"):
            shown = "/".join(parts)
            raise InputError(source, f"unsafe file path {shown!r}: it could escape the download folder")


def confined(root: str | os.PathLike, rel: str, source: str | os.PathLike) -> Path:
    """``root/rel`` after checking that neither the name nor a symlink on the way leads outside root."""
    if rel.startswith(("/", "\\")):
        raise InputError(source, f"unsafe file path {rel!r}: absolute paths are not allowed")
    check_components(list(PurePosixPath(rel).parts), source)
    root_real = Path(root).resolve()
    target = Path(root) / rel
    real = target.resolve()
    if real != root_real and root_real not in real.parents:
        raise InputError(source, f"unsafe file path {rel!r}: it resolves outside {root}")
    return target
