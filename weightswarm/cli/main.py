"""The ``weightswarm`` command: parses options, delegates, and turns errors into exit codes (cli.common).

Exit status: 0 success, 1 verification failed (the data is wrong), 2 bad input or usage, 3 the swarm did not
deliver (a rerun continues), 130 interrupted.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from weightswarm import __version__
from weightswarm.cli import daemon, release, weights
from weightswarm.cli.common import CONTEXT, PATH, handle_errors
from weightswarm.convert.presets import PRESETS

GLOBAL_FLAGS = ("--verbose",)


class Root(click.Group):
    """Takes the global flags wherever they stand (``weightswarm verify DIR --verbose`` works too)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        ctx.meta["verbose"] = "--verbose" in args[:end]
        return super().parse_args(ctx, [a for i, a in enumerate(args) if i >= end or a not in GLOBAL_FLAGS])


@click.group(cls=Root, context_settings=CONTEXT)
@click.option("--verbose", is_flag=True, help="Show tracebacks (anywhere on the command line).")
@click.version_option(__version__, package_name="weightswarm")
def main(verbose: bool) -> None:
    """Fetch, verify, convert and seed open model weights released over BitTorrent."""


@main.command(context_settings=CONTEXT, short_help="The whole job on a local swarm, in about 30 s.")
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


for command in (*release.COMMANDS, *weights.COMMANDS, daemon.daemon):
    main.add_command(command)
