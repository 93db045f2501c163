"""``weightswarm daemon``: run the seeding daemon in the foreground, or talk to a running one through its API."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from weightswarm.cli.common import CONTEXT, PATH, events, handle_errors, limit
from weightswarm.core.units import duration_text, human, plural, size_text
from weightswarm.distrib.daemon.config import DEFAULTS, DaemonConfig, load_config

D = DEFAULTS


@click.group(context_settings=CONTEXT, invoke_without_command=True,
             short_help="Seed many torrents; or talk to the daemon.")
@click.option("--config", "config_file", type=PATH, metavar="PATH",
              help="TOML file with any of these settings (underscores or dashes); env: WEIGHTSWARM_CONFIG.")
@click.option("--data", metavar="PATH", help="Root folder: every torrent's data lies under it (required to run).")
@click.option("--state", metavar="PATH", help="Folder for the registry, resume data and the API token (required).")
@click.option("--api", metavar="HOST:PORT", help=f"HTTP API and web seed address [default: {D.api}]")
@click.option("--listen", metavar="HOST:PORT", help=f"BitTorrent address [default: {D.listen}]")
@click.option("--dht/--no-dht", default=None, help="DHT and local peer discovery [default: on]")
@click.option("--distinct-pieces/--no-distinct-pieces", default=None,
              help="Serve so that a swarm gets each piece from us about once [default: on]")
@click.option("--token-file", metavar="PATH",
              help="API bearer token, created with mode 0600 if absent [default: STATE/api-token]")
@click.option("--max-upload-rate", metavar="BYTES",
              help="Upload limit of the daemon per second (e.g. 10m) [default: none]")
@click.option("--max-download-rate", metavar="BYTES", help="Download limit of the daemon per second [default: none]")
@click.option("--max-connections", metavar="N", help=f"Peer connections of the daemon [default: {D.max_connections}]")
@click.option("--torrent-max-upload-rate", metavar="BYTES", help="Default upload limit of each torrent [default: none]")
@click.option("--torrent-max-download-rate", metavar="BYTES",
              help="Default download limit of each torrent [default: none]")
@click.option("--torrent-max-connections", metavar="N", help="Default connection limit of each torrent [default: none]")
@click.option("--resume-interval", metavar="DURATION",
              help=f"Time between resume data saves (90, 5m, 1h) [default: {duration_text(D.resume_interval)}]")
@click.option("--scrub-interval", metavar="DURATION",
              help=f"Re-verify each torrent this often (30m, 7d; 0 = on request only) "
                   f"[default: {duration_text(D.scrub_interval)}]")
@click.option("--scrub-rate", metavar="BYTES", help=f"Read rate of scrubs per second, 0 = unlimited "
              f"[default: {size_text(D.scrub_rate)}]")
@click.option("--max-body", metavar="BYTES", help=f"Largest API request body [default: {size_text(D.max_body)}]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help=f"[default: {D.log_level}]")
@click.option("--json", "as_json", is_flag=True, help="Also print events as JSON lines on stdout.")
@click.pass_context
@handle_errors
def daemon(ctx: click.Context, config_file: Path | None, as_json: bool, **options) -> None:
    """Seed every registered torrent until SIGTERM; or, with a subcommand, talk to the running daemon.

    Every option can also be set in the --config file or as WEIGHTSWARM_<OPTION> (e.g. WEIGHTSWARM_DATA,
    WEIGHTSWARM_SCRUB_INTERVAL); the command line wins over the environment, which wins over the file.
    The subcommands find the daemon through --state (it records its API address there) unless --api is given.
    """
    cfg, given = load_config(options, config_file)
    ctx.obj = (cfg, given)
    if ctx.invoked_subcommand is None:
        events(ctx)
        _run(cfg, as_json)


def _run(cfg: DaemonConfig, as_json: bool) -> None:
    import asyncio

    from weightswarm.distrib.daemon.api import start_api
    from weightswarm.distrib.daemon.daemon import Daemon

    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emit = (lambda event: print(json.dumps(event, default=str), flush=True)) if as_json else None
    asyncio.run(Daemon(cfg, emit).run(start_api))


def _client(obj):
    """The API client of the daemon these settings name: --api if given, else the address it recorded."""
    from weightswarm.distrib.daemon.client import ApiClient

    cfg, given = obj
    return ApiClient.for_state(cfg.state, cfg.api if "api" in given else None, cfg.token_file)


@daemon.command(context_settings=CONTEXT)
@click.argument("torrent")
@click.option("--path", "save_path", default="", metavar="PATH",
              help="Folder that holds (or will hold) the torrent's top folder, inside the daemon's --data "
                   "(relative to it, or absolute inside it) [default: --data itself].")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit of this torrent.")
@click.option("--max-download-rate", metavar="BYTES", help="Download limit of this torrent.")
@click.option("--max-connections", type=click.IntRange(0), metavar="N", help="Connection limit of this torrent.")
@click.pass_obj
@handle_errors
def add(obj, torrent: str, save_path: str, max_upload_rate, max_download_rate, max_connections) -> None:
    """Register TORRENT (a .torrent file or a magnet URI) with the running daemon."""
    from weightswarm.core.inputs import read_regular
    from weightswarm.distrib.torrentfile import MAX_TORRENT_BYTES

    data = None if torrent.startswith("magnet:") else read_regular(torrent, MAX_TORRENT_BYTES, ".torrent file")
    s = _client(obj).add(data, torrent if data is None else None, save_path,
                         upload_rate=limit("--max-upload-rate", max_upload_rate) if max_upload_rate else None,
                         download_rate=limit("--max-download-rate", max_download_rate) if max_download_rate else None,
                         max_connections=max_connections)
    click.echo(f"added {s['id']} {s['name']} ({s['start']['reason']})")


@daemon.command(name="list", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the status of every torrent as JSON.")
@click.pass_obj
@handle_errors
def list_(obj, as_json: bool) -> None:
    """The registered torrents: state, progress, peers, upload, last scrub."""
    torrents = _client(obj).torrents()
    if as_json:
        click.echo(json.dumps(torrents, indent=2))
        return
    for t in torrents:
        click.echo(list_line(t))


def list_line(t: dict) -> str:
    """One torrent in fixed columns (the id as a 16-digit prefix, which every command accepts)."""
    scrub = t["last_scrub"]
    scrubbed = "never scrubbed" if not scrub else ("scrub ok" if scrub["ok"] else
                                                    f"scrub found {plural(len(scrub['bad_pieces']), 'bad piece')}")
    return (f"{t['id'][:16]}  {t['state'][:12]:<12} {100 * t['progress']:5.1f}%  {plural(t['peers'], 'peer'):>9}  "
            f"up {human(t['uploaded']):>10} (ratio {t['ratio']:.2f})  {scrubbed}  {t['name']}")


@daemon.command(context_settings=CONTEXT)
@click.argument("id")
@click.option("--delete-data", is_flag=True, help="Also delete the torrent's files.")
@click.pass_obj
@handle_errors
def remove(obj, id: str, delete_data: bool) -> None:
    """Unregister torrent ID (an info-hash, or a unique prefix of one), optionally deleting its data."""
    r = _client(obj).remove(id, delete_data)
    click.echo(f"removed {r['id']}" + (" and its data" if r["data_deleted"] else ""))


@daemon.command(context_settings=CONTEXT)
@click.argument("id")
@click.pass_obj
@handle_errors
def scrub(obj, id: str) -> None:
    """Queue an integrity scrub of torrent ID; its result shows in `list` and the daemon's log."""
    r = _client(obj).scrub(id)
    click.echo(f"scrub of {r['id']} {r['scrub']}")


@daemon.command(context_settings=CONTEXT)
@click.argument("id")
@click.pass_obj
@handle_errors
def recheck(obj, id: str) -> None:
    """Hash torrent ID's files again: pieces good on disk (a restored file) come back, bad ones go."""
    r = _client(obj).recheck(id)
    click.echo(f"re-check of {r['id']} {r['recheck']}")
