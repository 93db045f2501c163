"""Commands on releases and torrents: synth, catalog, create, seed, fetch."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from weightswarm.cli.common import CONTEXT, PATH, events, handle_errors, limit, size
from weightswarm.cli.console import Reporter, exit_for, print_report
from weightswarm.convert.presets import PRESETS
from weightswarm.core.errors import InputError
from weightswarm.core.units import human, plural
from weightswarm.distrib.session import SessionOptions, parse_endpoint

SESSION = SessionOptions()  # the defaults


def session_options(listen: str, no_dht: bool, no_distinct_pieces: bool, up: str | None = None,
                    down: str | None = None) -> SessionOptions:
    parse_endpoint(listen)
    return SessionOptions(listen=listen, dht=not no_dht, upload_rate=limit("--max-upload-rate", up),
                          download_rate=limit("--max-download-rate", down), distinct_pieces=not no_distinct_pieces)


def listen_options(fn):
    fn = click.option("--no-distinct-pieces", is_flag=True,
                      help="libtorrent's stock request queues and piece picking (an origin then sends more of "
                           "the payload twice).")(fn)
    fn = click.option("--no-dht", is_flag=True, help="No DHT and no local peer discovery.")(fn)
    return click.option("--listen", default=SESSION.listen, show_default=True, metavar="HOST:PORT",
                        help="Address to accept peers on.")(fn)


@click.command(context_settings=CONTEXT, short_help="Write a synthetic release in the Mixtral layout.")
@click.argument("out", type=PATH)
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Size: tiny ~1 MiB, small ~27 MiB, medium ~264 MiB, 1g, 4g.")
@click.option("--split", metavar="BYTES", help="Write consolidated.00.pth-split0..N parts of BYTES each.")
@click.option("--seed", default=0, show_default=True, metavar="N", help="Random seed of the weights.")
@handle_errors
def synth(out: Path, preset: str, split: str | None, seed: int) -> None:
    """Write a synthetic release in the real Mixtral 8x7B torrent layout into OUT (a new or empty folder)."""
    from weightswarm.convert.synth import synthesize

    for p in synthesize(out, preset=preset, split=size("--split", split), seed=seed):
        click.echo(f"{p}  {human(p.stat().st_size)}")


@click.command(context_settings=CONTEXT, short_help="List the known releases.")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (an object for NAME, else a list).")
@handle_errors
def catalog(name: str | None, as_json: bool) -> None:
    """The known torrent releases; NAME works wherever a SOURCE is accepted."""
    from weightswarm.distrib.catalog import RELEASES, lookup

    releases = RELEASES
    if name:
        r = lookup(name)
        if not r:
            raise InputError(name, "not in the catalog", hint="names: " + ", ".join(r.name for r in RELEASES))
        releases = (r,)
    if as_json:
        items = [asdict(r) | {"magnet": r.magnet} for r in releases]
        click.echo(json.dumps(items[0] if name else items, indent=2))
        return
    for r in releases:
        click.echo(f"{r.name}: {r.title}\n  magnet: {r.magnet}")
        for f in r.files:
            shown = "size unknown" if f.size is None else ("~" if f.approx else "") + human(f.size)
            click.echo(f"  file: {f.path} ({shown})")
        for path, digest in r.md5:
            click.echo(f"  md5:  {digest}  {path}")
        if r.notes:
            click.echo(f"  note: {r.notes}")


@click.command(context_settings=CONTEXT, short_help="Make a deterministic torrent of a folder.")
@click.argument("path", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, metavar="PATH", help="The .torrent to write.")
@click.option("--format", "fmt", type=click.Choice(["hybrid", "v1", "v2"]), default="hybrid", show_default=True)
@click.option("--piece-size", metavar="BYTES", help="A power of two from 16k to 16m [default: at most 4096 pieces].")
@click.option("--tracker", multiple=True, metavar="URL", help="Announce URL (repeatable, one tier each).")
@click.option("--web-seed", multiple=True, metavar="URL", help="BEP 19 web seed URL (repeatable).")
@click.option("--private", is_flag=True, help="Set the private flag (no DHT, no PEX).")
@click.option("--comment", default="", metavar="TEXT", help="Comment stored in the torrent.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@handle_errors
def create(path: Path, output: Path, fmt: str, piece_size: str | None, tracker, web_seed, private, comment,
           force: bool) -> None:
    """Make a deterministic torrent of PATH (a folder becomes the torrent's top folder)."""
    from weightswarm.distrib.create import CreateOptions, list_payload, write_torrent

    opts = CreateOptions(format=fmt, piece_size=size("--piece-size", piece_size) or 0, trackers=tuple(tracker),
                         web_seeds=tuple(web_seed), private=private, comment=comment)
    rep = Reporter()
    t = write_torrent(path, output, opts, rep.tracker(f"hashing {path.name}", sum(s for _, s in list_payload(path))),
                      force=force)
    rep.close()
    click.echo(f"wrote {output}: {t.name}, {plural(len(t.payload_files()), 'file')}, "
               f"{plural(t.info.num_pieces(), 'piece')} of {human(t.info.piece_length())}")
    click.echo(f"v1 info-hash: {t.v1 or '-'}\nv2 info-hash: {t.v2 or '-'}")


@click.command(context_settings=CONTEXT, short_help="Seed a folder until stopped.")
@click.argument("path", type=PATH)
@click.option("--torrent", "torrent_path", type=PATH, required=True, metavar="PATH",
              help="The torrent of PATH (a .torrent file).")
@listen_options
@click.option("--assume-verified", is_flag=True, help="Skip the full check; pieces are checked as they are sent.")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit per second (e.g. 10m) [default: none].")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.pass_context
@handle_errors
def seed(ctx, path: Path, torrent_path: Path, listen: str, no_dht: bool, no_distinct_pieces: bool,
         assume_verified: bool, max_upload_rate: str | None, as_json: bool) -> None:
    """Seed PATH (the torrent's top folder) in the foreground until Ctrl-C/SIGTERM."""
    from weightswarm.distrib.seed import SeedOptions
    from weightswarm.distrib.seed import seed as run_seed
    from weightswarm.distrib.torrentfile import load_torrent

    events(ctx)
    torrent = load_torrent(torrent_path)
    opts = SeedOptions(session=session_options(listen, no_dht, no_distinct_pieces, up=max_upload_rate),
                       assume_verified=assume_verified)
    rep = Reporter(as_json)
    try:
        run_seed(torrent, path, opts, rep)
    finally:
        rep.close()


@click.command(context_settings=CONTEXT, short_help="Download a release, then verify it.")
@click.argument("source")
@click.option("-o", "--output", type=PATH, required=True, metavar="PATH",
              help="Folder; files land in OUTPUT/<torrent name>/.")
@click.option("--only", multiple=True, metavar="GLOB", help="Fetch only matching files (repeatable).")
@click.option("--experts", metavar="LIST",
              help="Only the dense part and these experts (0,3 or 0-3): a per-expert layout's files, or the tensors "
                   "of a consolidated or HF release (its weight files are then sparse).")
@click.option("--convert", "convert_to", type=PATH, metavar="PATH",
              help="Convert to the per-expert layout in PATH while downloading (with --experts: those only).")
@click.option("--peer", multiple=True, metavar="HOST:PORT", help="Connect to this peer (repeatable).")
@click.option("--web-seed", multiple=True, metavar="URL", help="Add a BEP 19 web seed (repeatable).")
@listen_options
@click.option("--max-download-rate", metavar="BYTES", help="Download limit per second (e.g. 10m) [default: none].")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit per second [default: none].")
@click.option("--seed-after", metavar="DURATION|RATIO", help="Keep seeding after completion: 30m, 2h or 1.5x.")
@click.option("--timeout", metavar="DURATION", default="0", show_default=True,
              help="Give up after this long without progress (exit 3; a rerun continues); 0 waits forever.")
@click.option("--no-verify", is_flag=True, help="Skip the checks after the download (pieces are still hashed).")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.pass_context
@handle_errors
def fetch(ctx, source: str, output: Path, only, experts, convert_to, peer, web_seed, listen: str, no_dht: bool,
          no_distinct_pieces: bool, max_download_rate, max_upload_rate, seed_after, timeout: str, no_verify: bool,
          as_json: bool) -> None:
    """Download SOURCE (magnet, .torrent, info-hash or catalog name), then verify it."""
    from weightswarm.core.units import parse_duration
    from weightswarm.distrib.fetch import FetchOptions, SeedAfter, fetch_and_verify
    from weightswarm.distrib.source import resolve
    from weightswarm.formats.perexpert import parse_experts

    events(ctx)
    opts = FetchOptions(output=output, only=tuple(only), experts=parse_experts(experts) if experts else None,
                        convert=convert_to,
                        peers=tuple(parse_endpoint(p, "--peer") for p in peer), web_seeds=tuple(web_seed),
                        timeout=parse_duration(timeout, "--timeout"),
                        session=session_options(listen, no_dht, no_distinct_pieces, up=max_upload_rate,
                                                down=max_download_rate),
                        seed_after=SeedAfter.parse(seed_after) if seed_after else None)
    rep = Reporter(as_json)
    try:
        report = fetch_and_verify(resolve(source), opts, rep, verify=not no_verify)
    finally:
        rep.close()
    if report is not None:
        if not as_json:
            print_report(report)
        exit_for(report)
