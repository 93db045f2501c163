"""An output folder built in a hidden work folder inside it, then moved up at once.

Every command that writes a folder of results (synth, convert, export) builds them as ``OUT/<work>/files/``
(each file written atomically) beside ``job.json``, the command's own description of what it makes. When
all are done the list of names to move is written to ``publish.json`` and only then are they renamed into
OUT. A run killed during those renames leaves that list, and the next run of the same job finishes the
moves before anything else (``resume``): OUT never keeps part of a result that no record accounts for.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from weightswarm.core.atomic import atomic_write_bytes, fsync_dir
from weightswarm.core.errors import FormatError, InputError
from weightswarm.core.inputs import read_json
from weightswarm.core.paths import check_output_dir, confined

JOB, PLAN, FILES = "job.json", "publish.json", "files"


def same_job(work: Path, job: dict) -> bool:
    """Whether WORK's job.json describes JOB (as JSON: a tuple and a list of the same items are equal)."""
    try:
        return read_json(work / JOB) == json.loads(json.dumps(job))
    except (OSError, InputError):
        return False


def resume(out: Path, name: str, job: dict, keep_job: bool = False) -> list[Path] | None:
    """Finish the publish of JOB a killed run left in OUT/NAME; the published paths, or None if none was left.
    The list is read like any input: names that are not plain paths inside the work folder are refused."""
    work = out / name
    if not (work / PLAN).exists() or not same_job(work, job):
        return None
    rels = read_json(work / PLAN)
    if not isinstance(rels, list) or not all(isinstance(r, str) for r in rels):
        raise FormatError(work / PLAN, "not a list of file names", hint=f"remove {work} and run the command again")
    for rel in rels:
        confined(out, rel, work / PLAN)
        confined(work / FILES, rel, work / PLAN)
    return _move(work, out, rels, keep_job)


def prepare(out: Path, name: str, job: dict, reuse: bool = True) -> Path:
    """OUT/NAME/files, ready for JOB. OUT must hold nothing but the work folder. A leftover of the same job
    is kept when ``reuse`` (its finished files spare work); one of another job is removed."""
    check_output_dir(out, ignore=(name,))
    work = out / name
    if not (reuse and same_job(work, job)):
        shutil.rmtree(work, ignore_errors=True)
    (work / FILES).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / JOB, json.dumps(job, sort_keys=True).encode())
    return work / FILES


def publish(files: Path, rels: list[str], keep_job: bool = False) -> list[Path]:
    """Move FILES/rel for each rel (in that order) into OUT, two levels up; the work folder then goes, or
    keeps only job.json (``keep_job``: a rerun of the finished job can then tell it is done)."""
    work = files.parent
    atomic_write_bytes(work / PLAN, json.dumps(rels).encode())
    return _move(work, work.parent, rels, keep_job)


def _move(work: Path, out: Path, rels: list[str], keep_job: bool) -> list[Path]:
    for rel in rels:
        src = work / FILES / rel
        if src.is_file():  # else an earlier run moved it already
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, out / rel)
    for folder in sorted({(out / rel).parent for rel in rels}):
        fsync_dir(folder)
    # The record goes last: a run killed while clearing up leaves a work folder the next run can still read.
    for p in work.iterdir():
        if p.name not in (PLAN, JOB):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (work / PLAN).unlink()
    if not keep_job:
        (work / JOB).unlink()
        work.rmdir()
    fsync_dir(out)
    return [out / rel for rel in rels]
