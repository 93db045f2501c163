"""The manifest file (FORMAT.md): every file's size and blake3, and optionally every tensor's, as JSON.

Here: the schema, its validation and its one serialisation. Building and checking manifests against files
is verify's work (verify.manifest).
"""
from __future__ import annotations

import json
import os

from weightswarm.core.errors import FormatError
from weightswarm.core.inputs import read_json
from weightswarm.core.paths import check_components
from weightswarm.formats.dtypes import ITEMSIZE

FORMAT = "weightswarm-manifest"
VERSION = 1
NAME = "manifest.json"
_FIELDS = {"files": {"path": str, "size": int, "blake3": str},
           "tensors": {"name": str, "file": str, "dtype": str, "shape": list, "blake3": str}}
_HEX64 = frozenset("0123456789abcdef")


def manifest_bytes(manifest: dict) -> bytes:
    """One serialisation for every writer, so equal manifests are equal files."""
    return (json.dumps(manifest, indent=1) + "\n").encode()


def load_manifest(path: str | os.PathLike) -> dict:
    """A manifest whose every entry has the fields and types FORMAT.md gives; FormatError otherwise."""
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise FormatError(path, f"not a {FORMAT} file")
    if m.get("version") != VERSION:
        raise FormatError(path, f"manifest version {m.get('version')!r:.20} is not supported (this reads {VERSION})")
    for key, fields in _FIELDS.items():
        entries = m.get(key, [])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(f), t) and not isinstance(e.get(f), bool)
                                            for f, t in fields.items()) for e in entries):
            shown = ", ".join(f"{f} ({t.__name__})" for f, t in fields.items())
            raise FormatError(path, f"'{key}' must be a list of objects with {shown}")
    for e in m.get("files", []):
        check_components(e["path"].split("/"), path)
        if e["size"] < 0 or len(e["blake3"]) != 64 or not set(e["blake3"]) <= _HEX64:
            raise FormatError(path, f"{e['path']:.100}: bad size or blake3")
    for e in m.get("tensors", []):
        if e["dtype"] not in ITEMSIZE or not all(type(d) is int and d >= 0 for d in e["shape"]):  # bool is no dim
            raise FormatError(path, f"{e['name']:.100}: bad dtype or shape")
    return m
