"""``weightswarm join``: Hugging Face split parts concatenated into the file they were cut from, its
checksum checked on the way, so the file appears only complete and verified."""
from __future__ import annotations

import os
from pathlib import Path

from weightswarm.core.atomic import atomic_open
from weightswarm.core.errors import InputError, OptionError, VerificationError
from weightswarm.core.hashing import DIGEST_HEX_LEN, copy_hashing, new_hasher
from weightswarm.core.paths import check_output_file
from weightswarm.formats.splitfile import SplitReader, split_parts
from weightswarm.verify.checksums import parse_checksums


def join(parts: list[str | os.PathLike], dest: str | os.PathLike,
         expected: tuple[str, str] | None = None) -> str | None:
    """Concatenate parts into dest, checking ``expected = (algo, hexdigest)`` on the way.

    Writes to a hidden temporary file beside dest (atomic_open: fsync, rename), so dest only
    ever appears complete and verified. Returns the hex digest (None without expected). Raises
    InputError if dest exists or the algorithm is unknown, VerificationError (leaving nothing
    behind) on a digest mismatch.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise InputError(dest, "already exists; refusing to overwrite")
    hasher = None
    if expected:
        algo, want = expected[0].lower(), expected[1].lower()
        try:
            hasher = new_hasher(algo)
        except ValueError as e:
            raise InputError(dest, str(e)) from None
    with SplitReader(parts) as src, atomic_open(dest) as out:
        copy_hashing(src, hasher, out)
        # Raising here makes atomic_open delete its temp file, so dest never appears.
        if hasher is not None and hasher.hexdigest() != want:
            raise VerificationError(dest, f"{algo} mismatch: expected {want}, got {hasher.hexdigest()}")
        if dest.exists() or dest.is_symlink():  # appeared while we were copying
            raise InputError(dest, "already exists; refusing to overwrite")
    return hasher.hexdigest() if hasher is not None else None


def join_split_file(target: str | os.PathLike, dest: str | os.PathLike | None = None,
                    md5: str | None = None) -> tuple[Path, list[Path], tuple[str, str] | None]:
    """``weightswarm join``: TARGET's parts into DEST (default TARGET), checked against the ``md5`` given
    (``--md5``) or, without it, the sum a RELEASE file beside the parts gives for TARGET.
    Returns (dest, parts, (algo, digest) or None)."""
    expected = None
    if md5 is not None:
        if len(md5) != DIGEST_HEX_LEN["md5"] or not all(c in "0123456789abcdefABCDEF" for c in md5):
            raise OptionError("--md5", md5, "not an md5 digest (32 hex digits)")
        expected = ("md5", md5.lower())
    target = Path(target)
    parts = split_parts(target)
    if not parts:
        raise InputError(target, "no split parts found (expected NAME-split0, NAME-split1, ...)")
    release = target.parent / "RELEASE"
    if expected is None and release.is_file():
        match = [e for e in parse_checksums(release, lenient=True) if e.name == target.name]
        expected = (match[0].algo, match[0].digest) if match else None
    dest = check_output_file(Path(dest) if dest else target)
    join(parts, dest, expected)
    return dest, parts, expected
