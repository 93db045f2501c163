"""Checksum files as users ran them by hand (``md5sum -c RELEASE``), verified in parallel.

Reads GNU ``md5sum``/``sha1sum``/``sha256sum``/``b3sum`` lines and BSD ``--tag`` lines. A listed
file that only exists as Hugging Face split parts is hashed as their concatenation, which is what
``cat parts | md5sum`` checked.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from weightswarm.core.errors import FormatError, InputError
from weightswarm.core.hashing import DIGEST_HEX_LEN, copy_hashing, hash_file, new_hasher
from weightswarm.core.inputs import os_problem, read_regular
from weightswarm.formats.splitfile import SplitReader, split_parts
from weightswarm.verify.report import Finding

MAX_CHECKSUM_FILE = 64 << 20  # a sums file lists files, a line each: a million lines are ~100 MB of names

# BSD tags as md5/shasum/cksum --tag write them.
_TAGS = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA2-256": "sha256", "SHA512": "sha512",
         "SHA2-512": "sha512", "BLAKE3": "blake3"}
# A leading backslash marks a line whose name has escapes (coreutils does this for names with \ or newline).
_BSD = re.compile(r"^(?P<esc>\\?)(?P<tag>[A-Z0-9][A-Za-z0-9-]*) ?\((?P<name>.+)\) ?= (?P<hex>[0-9a-fA-F]+)$")
# coreutils also accepts a single space between digest and name, so we do too.
_GNU = re.compile(r"^(?P<esc>\\?)(?P<hex>[0-9a-fA-F]+) [ *]?(?P<name>.+)$")
_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}
# Most specific first: "sha256" must not be read as "sha1"-something, and "b3" is the loosest hint.
_NAME_HINTS = (("blake3", "blake3"), ("sha512", "sha512"), ("sha256", "sha256"), ("sha1", "sha1"),
               ("md5", "md5"), ("b3", "blake3"))
_BY_LENGTH = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}


@dataclass(frozen=True)
class Entry:
    line: int
    name: str  # normalised relative posix path
    algo: str
    digest: str  # lower-case hex


def algo_from_filename(path: str | os.PathLike) -> str | None:
    """The algorithm a checksum file's name announces (``B3SUMS``, ``sha256sums.txt``), if any."""
    name = Path(path).name.lower()
    return next((algo for hint, algo in _NAME_HINTS if hint in name), None)


def parse_checksums(path: str | os.PathLike, algo: str | None = None, lenient: bool = False) -> list[Entry]:
    """Entries of a checksum file. The algorithm is ``algo`` if given, else a BSD line's tag, else
    the file name's hint, else the digest length (so a RELEASE file of 32-digit lines is md5).

    Raises InputError for an unreadable file, an unknown ``algo`` or a name leaving the folder
    (absolute or with ``..``); FormatError ``line N: ...`` for a line in no known format, unless
    ``lenient`` (a release's RELEASE file may carry prose around its sums: those lines are skipped).
    """
    path = Path(path)
    if algo is not None and algo.lower() not in DIGEST_HEX_LEN:
        raise InputError(path, f"unsupported hash algorithm {algo!r}; use one of {', '.join(DIGEST_HEX_LEN)}")
    hinted = algo.lower() if algo else algo_from_filename(path)
    # surrogateescape keeps non-UTF-8 names byte-exact, the way os.fsdecode maps them.
    data = read_regular(path, MAX_CHECKSUM_FILE, "checksum file")
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    entries = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(_parse_line(path, n, line, algo.lower() if algo else None, hinted))
        except FormatError:
            if not lenient:
                raise
    return entries


def _parse_line(path: Path, n: int, line: str, explicit: str | None, hinted: str | None) -> Entry:
    if m := _BSD.match(line):
        tagged = _TAGS.get(m["tag"].upper())
        if tagged is None:
            raise FormatError(path, f"line {n}: unsupported algorithm tag {m['tag']!r}")
        if explicit and explicit != tagged:
            raise FormatError(path, f"line {n}: tagged {m['tag']} but {explicit} was requested")
        algo = tagged
    elif m := _GNU.match(line):
        algo = hinted or _BY_LENGTH.get(len(m["hex"]))
        if algo is None:
            raise FormatError(path, f"line {n}: cannot tell the algorithm of a {len(m['hex'])}-digit digest")
    else:
        raise FormatError(path, f"line {n}: not a checksum line: {line[:80]!r}")
    digest = m["hex"].lower()
    if len(digest) != DIGEST_HEX_LEN[algo]:
        raise FormatError(path, f"line {n}: {algo} digests have {DIGEST_HEX_LEN[algo]} hex digits, got {len(digest)}")
    name = _unescape(path, n, m["name"]) if m["esc"] else m["name"]
    return Entry(n, _safe_name(path, n, name), algo, digest)


def _unescape(path: Path, n: int, name: str) -> str:
    out, chars = [], iter(name)
    for c in chars:
        if c == "\\":
            c = _ESCAPES.get(next(chars, ""))
            if c is None:
                raise FormatError(path, f"line {n}: bad escape in name {name!r}")
        out.append(c)
    return "".join(out)


def _safe_name(path: Path, n: int, name: str) -> str:
    """The name as a clean relative path; InputError if it would reach outside the folder."""
    if "\0" in name:
        raise InputError(path, f"line {n}: unsafe name {name!r}: NUL byte")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InputError(path, f"line {n}: unsafe name {name!r}: absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise InputError(path, f"line {n}: unsafe name {name!r}: '..' component")
    if not parts:
        raise FormatError(path, f"line {n}: empty file name")
    return "/".join(parts)


def _inside(root: Path, target: Path) -> None:
    """Symlinks (of the file or a folder on its way) must not lead outside root."""
    real = target.resolve()
    if not real.is_relative_to(root.resolve()):
        raise InputError(target, f"resolves outside the verified folder (to {real})")


def locate(root: Path, checksum_file: str | os.PathLike) -> Path:
    """A checksum file as given, or else relative to root (``verify DIR --checksums RELEASE``)."""
    given = Path(checksum_file)
    if given.is_file() or given.is_absolute():
        return given
    return root / given


def verify_checksums(root: str | os.PathLike, checksum_file: str | os.PathLike, algo: str | None = None,
                     workers: int = 2, lenient: bool = False) -> list[Finding]:
    """One Finding (check="checksum") per listed file, in the checksum file's order.

    Details: ``md5 ok``, ``md5 mismatch: expected X, got Y``, ``missing``, with `` (N split parts)``
    appended when the file was hashed from its parts. Raises what parse_checksums raises, and
    InputError for a listed file that is a symlink leading outside root (before hashing anything).
    """
    root = Path(root)
    return verify_entries(root, parse_checksums(locate(root, checksum_file), algo, lenient), workers)


def verify_entries(root: Path, entries: list[Entry], workers: int = 2) -> list[Finding]:
    """verify_checksums for entries from anywhere (a checksum file, or sums published in the catalog)."""
    jobs: dict[int, tuple[Entry, Path, list[Path]]] = {}  # entry, file, its split parts if it has none
    findings: dict[int, Finding] = {}
    for i, e in enumerate(entries):
        target = root / e.name
        _inside(root, target)
        if target.is_file():
            jobs[i] = (e, target, [])
            continue
        try:
            parts = [] if target.exists() else split_parts(target)
        except FormatError as err:  # a gap in the parts
            findings[i] = Finding("checksum", e.name, False, err.problem)
            continue
        for p in parts:
            _inside(root, p)
        if parts:
            jobs[i] = (e, target, parts)
        else:
            findings[i] = Finding("checksum", e.name, False, "not a regular file" if target.exists() else "missing")
    # Biggest first, so the last file hashed is a small one and no core idles at the end.
    order = sorted(jobs, key=lambda i: -sum(p.stat().st_size for p in jobs[i][2] or [jobs[i][1]]))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {i: pool.submit(_check_one, *jobs[i]) for i in order}
        findings.update({i: f.result() for i, f in futures.items()})
    return [findings[i] for i in range(len(entries))]


def _check_one(entry: Entry, target: Path, parts: list[Path]) -> Finding:
    suffix = f" ({len(parts)} split parts)" if parts else ""
    try:
        if parts:
            hasher = new_hasher(entry.algo)
            with SplitReader(parts) as src:
                copy_hashing(src, hasher)
            got = hasher.hexdigest()
        else:
            got = hash_file(target, entry.algo)
    except OSError as e:
        return Finding("checksum", entry.name, False, f"unreadable: {os_problem(e)}")
    except InputError as e:  # replaced by something that is not a regular file since it was listed
        return Finding("checksum", entry.name, False, f"unreadable: {e.problem}")
    if got != entry.digest:
        return Finding("checksum", entry.name, False,
                       f"{entry.algo} mismatch: expected {entry.digest}, got {got}{suffix}")
    return Finding("checksum", entry.name, True, f"{entry.algo} ok{suffix}")
