"""What every command shares: turning errors into one line and an exit status, and the option types.

Exit status: 0 success, 1 verification failed (the data is wrong), 2 bad input or usage, 3 the swarm did not
deliver (a rerun continues), 130 interrupted.
"""
from __future__ import annotations

import errno
import functools
import json
import sys
import traceback
import warnings
from pathlib import Path

import click

from weightswarm.core.errors import WeightswarmError, one_line
from weightswarm.core.inputs import os_problem
from weightswarm.core.interrupt import Stop, install_stop_signals
from weightswarm.core.units import parse_bytes, parse_limit

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PATH = click.Path(path_type=Path)


def handle_errors(fn):
    """Every command: one ``Error: <what>: <problem>`` line and its exit status, traceback only with --verbose.
    A command running with --json also gets a final ``{"event": "error"}`` line on stdout."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        verbose = ctx.find_root().meta.get("verbose", False)
        if not verbose:
            # torch and friends warn on stderr about things the user cannot change; the Error line says it all.
            warnings.filterwarnings("ignore")
        try:
            install_stop_signals()
            return fn(*args, **kwargs)
        except WeightswarmError as e:
            _fail(ctx, verbose, e.subject, e.problem, e.hint, e.exit_code)
        except (Stop, KeyboardInterrupt):
            _json_error(ctx, {"exit_code": 130, "problem": "interrupted"})
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except OSError as e:
            hint = "free some space, then run the same command again: it continues" \
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
            _fail(ctx, verbose, e.filename or "I/O", os_problem(e), hint, 2)
        except Exception as e:  # a bug of ours: still one line, the traceback only on request
            _fail(ctx, verbose, "internal error", f"{type(e).__name__}: {e}", "run with --verbose for the traceback", 2)

    return wrapper


def _fail(ctx: click.Context, verbose: bool, subject, problem: str, hint: str | None, code: int):
    if verbose:
        traceback.print_exc()
    _json_error(ctx, {"exit_code": code, "subject": str(subject), "problem": problem, "hint": hint})
    click.echo(f"Error: {one_line(str(subject))}: {one_line(problem)}", err=True)
    if hint:
        click.echo(f"Hint: {one_line(hint)}", err=True)
    sys.exit(code)


def _json_error(ctx: click.Context, fields: dict) -> None:
    if ctx.params.get("as_json") and ctx.meta.get("events"):
        print(json.dumps({"event": "error", **fields}), flush=True)


def events(ctx: click.Context) -> None:
    """Mark the running command as one that prints JSON events (so a failure ends with an error event)."""
    ctx.meta["events"] = True


def size(option: str, text: str | None) -> int | None:
    return parse_bytes(text, option) if text is not None else None


def limit(option: str, text: str | None) -> int:
    return parse_limit(option, text) if text else 0
