"""The ``weightswarm`` command: parses options, delegates, and turns errors into exit codes (cli.common).

Exit status: 0 success, 1 verification failed (the data is wrong), 2 bad input or usage, 3 the swarm did not
deliver (a rerun continues), 130 interrupted.
"""
from __future__ import annotations

import importlib

import click

from weightswarm import __version__
from weightswarm.cli.common import CONTEXT

GLOBAL_FLAGS = ("--verbose",)
# Each command's module is imported only when that command runs (or for --help): `verify --manifest` is
# measured against b3sum, start-up included, and need not load the daemon, the converter or aiohttp.
COMMANDS = dict.fromkeys(("synth", "catalog", "create", "seed", "fetch"), "release") | \
    dict.fromkeys(("verify", "join"), "checks") | \
    dict.fromkeys(("convert", "manifest", "export", "smoke"), "weights") | {"daemon": "daemon", "demo": "demo"}


class Root(click.Group):
    """Takes the global flags wherever they stand (``weightswarm verify DIR --verbose`` works too) and
    loads a command's module when the command is used."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        ctx.meta["verbose"] = "--verbose" in args[:end]
        return super().parse_args(ctx, [a for i, a in enumerate(args) if i >= end or a not in GLOBAL_FLAGS])

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module = importlib.import_module(f"weightswarm.cli.{COMMANDS[name]}")
        return getattr(module, name)


@click.group(cls=Root, context_settings=CONTEXT)
@click.option("--verbose", is_flag=True, help="Show tracebacks (anywhere on the command line).")
@click.version_option(__version__, package_name="weightswarm")
def main(verbose: bool) -> None:
    """Fetch, verify, convert and seed open model weights released over BitTorrent."""
