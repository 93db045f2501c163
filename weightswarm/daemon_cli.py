"""``weightswarm daemon``: run the seeding daemon in the foreground, or talk to a running one through its API."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import click

from distrib.daemon_config import DEFAULTS, DaemonConfig, load_config
from weightswarm.cli import handle_errors
from weightswarm.console import human
from weightswarm.errors import InputError


def _default(name: str) -> str:
    return f"[default: {getattr(DEFAULTS, name)}]"


@click.group(invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file with any of these settings (underscores or dashes); env: WEIGHTSWARM_CONFIG.")
@click.option("--data", help="Root folder: every torrent's data lies under it (required to run).")
@click.option("--state", help="Folder for the registry, resume data and the API token (required to run).")
@click.option("--api", metavar="HOST:PORT", help=f"HTTP API and web seed address {_default('api')}")
@click.option("--listen", metavar="HOST:PORT", help=f"BitTorrent address {_default('listen')}")
@click.option("--dht/--no-dht", default=None, help="DHT and local peer discovery [default: on]")
@click.option("--token-file", help="API bearer token, created with mode 0600 if absent [default: STATE/api-token]")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit of the daemon per second (e.g. 10m).")
@click.option("--max-download-rate", metavar="BYTES", help="Download limit of the daemon per second.")
@click.option("--max-connections", metavar="N", help=f"Peer connections of the daemon {_default('max_connections')}")
@click.option("--torrent-max-upload-rate", metavar="BYTES", help="Default upload limit of each torrent.")
@click.option("--torrent-max-download-rate", metavar="BYTES", help="Default download limit of each torrent.")
@click.option("--torrent-max-connections", metavar="N", help="Default connection limit of each torrent.")
@click.option("--resume-interval", metavar="TIME",
              help=f"Seconds between resume data saves (or 5m, 1h) {_default('resume_interval')}")
@click.option("--scrub-interval", metavar="TIME",
              help=f"Re-verify each torrent this often (30m, 7d; 0 = on request only) {_default('scrub_interval')}")
@click.option("--scrub-rate", metavar="BYTES", help=f"Read rate of scrubs per second, 0 = unlimited "
              f"{_default('scrub_rate')}")
@click.option("--max-body", metavar="BYTES", help=f"Largest API request body {_default('max_body')}")
@click.option("--log-level", help=f"debug, info, warning or error {_default('log_level')}")
@click.option("--json", "as_json", is_flag=True, help="Also print events as JSON lines on stdout.")
@click.pass_context
@handle_errors
def daemon(ctx: click.Context, config_file: Path | None, as_json: bool, **options) -> None:
    """Seed every registered torrent until SIGTERM; or, with a subcommand, talk to the running daemon.

    Every option can also be set in the --config file or as WEIGHTSWARM_<OPTION> (e.g. WEIGHTSWARM_DATA,
    WEIGHTSWARM_SCRUB_INTERVAL); the command line wins over the environment, which wins over the file.
    """
    cfg = load_config(options, config_file)
    ctx.obj = cfg
    if ctx.invoked_subcommand is None:
        _run(cfg, as_json)


def _run(cfg: DaemonConfig, as_json: bool) -> None:
    from distrib.api import start_api
    from distrib.daemon import Daemon

    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emit = (lambda event: print(json.dumps(event, default=str), flush=True)) if as_json else None
    asyncio.run(Daemon(cfg, emit).run(start_api))


def _call(cfg: DaemonConfig, method: str, path: str, data=None) -> dict:
    """One API request with the token; an error status becomes an InputError naming the URL."""
    import aiohttp

    try:
        token = cfg.token_path.read_text().strip()
    except FileNotFoundError:
        raise InputError(cfg.token_path, "no API token file", hint="start the daemon first, or give --token-file") \
            from None
    url = f"http://{cfg.api}{path}"

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.request(method, url, data=data, headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status, await r.json(content_type=None)

    try:
        status, body = asyncio.run(go())
    except aiohttp.ClientError as e:
        raise InputError(url, f"cannot reach the daemon: {e}", hint="is it running? --api HOST:PORT") from None
    if status >= 400:
        raise InputError(url, (body or {}).get("error", f"HTTP {status}"),
                         hint="check --token-file" if status == 401 else None)
    return body


@daemon.command()
@click.argument("torrent")
@click.option("--path", "save_path", default="", show_default=False,
              help="Folder that holds (or will hold) the torrent's top folder, under the daemon's --data "
                   "(relative to it, or absolute inside it) [default: --data itself].")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit of this torrent.")
@click.option("--max-download-rate", metavar="BYTES", help="Download limit of this torrent.")
@click.option("--max-connections", type=click.IntRange(0), help="Connection limit of this torrent.")
@click.pass_obj
@handle_errors
def add(cfg: DaemonConfig, torrent: str, save_path: str, max_upload_rate, max_download_rate, max_connections) -> None:
    """Register TORRENT (a .torrent file or a magnet URI) with the running daemon."""
    import aiohttp

    from weightswarm.units import parse_limit

    form = aiohttp.FormData()
    if torrent.startswith("magnet:"):
        form.add_field("magnet", torrent)
    else:
        try:
            form.add_field("torrent", Path(torrent).read_bytes(), filename=Path(torrent).name,
                           content_type="application/x-bittorrent")
        except OSError as e:
            raise InputError(torrent, e.strerror or str(e)) from None
    if Path(save_path).is_absolute() and cfg.data and Path(save_path).resolve().is_relative_to(cfg.data.resolve()):
        save_path = Path(save_path).resolve().relative_to(cfg.data.resolve()).as_posix()
    form.add_field("save_path", save_path)
    for key, value in (("upload_rate", max_upload_rate and parse_limit("--max-upload-rate", max_upload_rate)),
                       ("download_rate", max_download_rate and parse_limit("--max-download-rate", max_download_rate)),
                       ("max_connections", max_connections)):
        if value is not None:
            form.add_field(key, str(value))
    s = _call(cfg, "POST", "/v1/torrents", form)
    click.echo(f"added {s['id']} {s['name']} ({s['start']['reason']})")


@daemon.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the status of every torrent as JSON.")
@click.pass_obj
@handle_errors
def list_(cfg: DaemonConfig, as_json: bool) -> None:
    """The registered torrents: state, progress, peers, upload, last scrub."""
    torrents = _call(cfg, "GET", "/v1/torrents")["torrents"]
    if as_json:
        click.echo(json.dumps(torrents, indent=2))
        return
    for t in torrents:
        scrub = t["last_scrub"]
        scrubbed = "never scrubbed" if not scrub else ("scrub ok" if scrub["ok"] else
                                                        f"scrub found {len(scrub['bad_pieces'])} bad pieces")
        click.echo(f"{t['id'][:16]}  {t['state']:<12} {100 * t['progress']:5.1f}%  {t['peers']:3d} peers  "
                   f"up {human(t['uploaded'])} (ratio {t['ratio']:.2f})  {scrubbed}  {t['name']}")


@daemon.command()
@click.argument("id")
@click.option("--delete-data", is_flag=True, help="Also delete the torrent's files.")
@click.pass_obj
@handle_errors
def remove(cfg: DaemonConfig, id: str, delete_data: bool) -> None:
    """Unregister torrent ID (its info-hash), optionally deleting its data."""
    r = _call(cfg, "DELETE", f"/v1/torrents/{id}" + ("?delete_data=true" if delete_data else ""))
    click.echo(f"removed {r['id']}" + (" and its data" if r["data_deleted"] else ""))


@daemon.command()
@click.argument("id")
@click.pass_obj
@handle_errors
def scrub(cfg: DaemonConfig, id: str) -> None:
    """Queue an integrity scrub of torrent ID; its result shows in `list` and the daemon's log."""
    r = _call(cfg, "POST", f"/v1/torrents/{id}/scrub")
    click.echo(f"scrub of {r['id']} {r['scrub']}")
