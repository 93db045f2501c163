"""Paths: confinement of names from untrusted places (torrents, manifests, requests), the files of a folder
as every command sees them, and the checks on an output folder before anything is written."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from weightswarm.core.errors import Forbidden, InputError


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


def inside(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """PATH (absolute, or relative to root) as a normalised posix path relative to root ('' for root itself),
    after resolving symlinks; Forbidden if it lies outside root."""
    text = os.fspath(path).strip()
    if "\0" in text:
        raise Forbidden(text, "NUL byte in the path")
    root_real = Path(root).resolve()
    real = (root_real / text).resolve()  # an absolute text replaces root_real
    if real != root_real and root_real not in real.parents:
        raise Forbidden(text, f"outside the data folder {root_real}")
    return real.relative_to(root_real).as_posix() if real != root_real else ""


def hidden(name: str) -> bool:
    """Our temp files, resume state, pad folders and editors' files all start with a dot."""
    return name.startswith(".")


def walk_files(root: str | os.PathLike, follow_links: bool = False, strict: bool = False) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under root, sorted, hidden names left out.

    A FIFO or device is never listed (reading it would block or never end): it is skipped, or with
    ``strict`` refused, as is a broken symlink. ``follow_links`` also descends into symlinked folders
    (torrent creation takes what the links point to)."""
    root = Path(root)
    out = []
    for folder, dirs, files in os.walk(root, followlinks=follow_links):
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        here = Path(folder)
        for name in files:
            p = here / name
            if hidden(name):
                continue
            if p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
            elif strict:
                raise InputError(p, "broken symlink" if p.is_symlink() and not p.exists() else "not a regular file")
    return sorted(out)


def check_output_file(dest: str | os.PathLike) -> Path:
    """A file we are about to write: its folder exists and it is not itself a folder."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise InputError(dest.parent, "output folder does not exist")
    if dest.is_dir():
        raise InputError(dest, "is a folder: give the name of the file to write")
    return dest


def check_output_dir(out: str | os.PathLike, empty: bool = True, ignore: tuple[str, ...] = ()) -> Path:
    """A folder we are about to write into: its parent exists, it is absent or a folder, and (``empty``)
    holds nothing but the names in ``ignore`` (our own work folders, which a rerun continues)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(out.parent, "output parent folder does not exist",
                         hint="create it first, or choose another output folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(out, "exists and is not a folder")
        if empty and any(p.name not in ignore for p in out.iterdir()):
            raise InputError(out, "already exists and is not empty", hint="choose a new folder or empty this one")
    return out
