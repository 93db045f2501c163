"""``weightswarm demo``: the whole job on a local swarm."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from weightswarm.cli.common import CONTEXT, PATH, handle_errors
from weightswarm.convert.presets import PRESETS


@click.command(context_settings=CONTEXT, short_help="The whole job on a local swarm, in about 30 s.")
@click.option("--workdir", type=PATH, default=Path("weightswarm-demo"), show_default=True, metavar="PATH")
@click.option("--leechers", type=click.IntRange(1, 32), default=3, show_default=True, metavar="N",
              help="Fetch processes in the swarm.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="small", show_default=True,
              help="Size of the synthetic release (see synth).")
@click.option("--keep", is_flag=True, help="Keep the work folder afterwards.")
@click.option("--timeout", type=click.FloatRange(1), default=300, show_default=True, metavar="SECONDS",
              help="Give up after this long (exit 3).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def demo(workdir: Path, leechers: int, preset: str, keep: bool, timeout: float, as_json: bool) -> None:
    """Run the whole job on a local swarm: synthesize a release, seed it with the daemon, fetch it on N nodes
    that share with each other, verify every copy, convert one to the per-expert layout and publish it, serve
    two experts from it on another node, and smoke-test the assembled model against the original."""
    from weightswarm.demo import print_summary, run_demo

    existed = workdir.exists()
    show = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        stages = run_demo(workdir, leechers=leechers, preset=preset, timeout=timeout, show=show)
    finally:
        if not keep and not existed:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(stages, as_json)
    if not all(s.ok for s in stages):
        sys.exit(max(s.exit_code for s in stages))
