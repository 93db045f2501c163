"""The command line, the top layer: parse, delegate, turn errors into exit codes. Commands on releases and
torrents (release), on weight files (weights), the daemon and its client (daemon); console output (console)."""
from weightswarm.cli.main import main

__all__ = ["main"]
