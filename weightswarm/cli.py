"""The ``weightswarm`` command: parses options, delegates, and turns errors into exit codes.

Exit status: 0 success, 1 verification failed (the data is wrong), 2 bad input or usage, 130 interrupted.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import click

from weightswarm.console import Reporter, human, print_report
from weightswarm.errors import InputError, VerificationError, WeightswarmError
from weightswarm.interrupt import Stop, install_stop_signals
from weightswarm.units import parse_bytes, parse_limit

def handle_errors(fn):
    """Every command: one ``Error: <path>: <problem>`` line and its exit status, traceback only with --verbose."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            install_stop_signals()
            return fn(*args, **kwargs)
        except WeightswarmError as e:
            _fail(verbose, str(e), e.hint, e.exit_code)
        except (Stop, KeyboardInterrupt):
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except OSError as e:
            _fail(verbose, f"{e.filename or 'I/O'}: {e.strerror or e}", None, 2)
        except Exception as e:  # a bug of ours: still one line, the traceback only on request
            _fail(verbose, f"internal error: {type(e).__name__}: {e}", "run with --verbose for the traceback", 2)

    return wrapper


def _fail(verbose: bool, message: str, hint: str | None, code: int):
    if verbose:
        traceback.print_exc()
    click.echo(f"Error: {message}", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    sys.exit(code)


def session_options(listen: str, no_dht: bool, up: str | None = None, down: str | None = None):
    from distrib.session import SessionOptions, parse_endpoint  # libtorrent only for the commands that need it

    parse_endpoint(listen, "listen address")
    return SessionOptions(listen=listen, dht=not no_dht, upload_rate=parse_limit("--max-upload-rate", up) if up else 0,
                          download_rate=parse_limit("--max-download-rate", down) if down else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="weightswarm")
def main(verbose: bool) -> None:
    """Fetch, verify, convert and seed open model weights released over BitTorrent."""


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", default="tiny", show_default=True, help="tiny, small, medium, 1g or 4g.")
@click.option("--split", "split", metavar="BYTES", help="Write consolidated.00.pth-split0..N parts of BYTES each.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the weights.")
@handle_errors
def synth(out: Path, preset: str, split: str | None, seed: int) -> None:
    """Write a synthetic release in the real Mixtral 8x7B torrent layout into OUT."""
    from runner.synth import synthesize

    written = synthesize(out, preset=preset, split=parse_bytes(split) if split else None, seed=seed)
    for p in written:
        click.echo(f"{p}  {human(p.stat().st_size)}")


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def catalog(name: str | None, as_json: bool) -> None:
    """The known torrent releases; NAME works wherever a SOURCE is accepted."""
    from dataclasses import asdict

    from distrib.catalog import RELEASES, lookup

    releases = RELEASES
    if name:
        r = lookup(name)
        if not r:
            raise InputError(name, "not in the catalog", hint="names: " + ", ".join(r.name for r in RELEASES))
        releases = (r,)
    if as_json:
        click.echo(json.dumps([asdict(r) | {"magnet": r.magnet} for r in releases], indent=2))
        return
    for r in releases:
        click.echo(f"{r.name}: {r.title}\n  magnet: {r.magnet}")
        for f in r.files:
            size = "size unknown" if f.size is None else ("~" if f.approx else "") + human(f.size)
            click.echo(f"  file: {f.path} ({size})")
        for path, digest in r.md5:
            click.echo(f"  md5:  {digest}  {path}")
        if r.notes:
            click.echo(f"  note: {r.notes}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The .torrent to write.")
@click.option("--format", "fmt", type=click.Choice(["hybrid", "v1", "v2"]), default="hybrid", show_default=True)
@click.option("--piece-size", metavar="BYTES", help="Power of two >= 16k; default: at most ~1500 pieces.")
@click.option("--tracker", multiple=True, help="Announce URL (repeatable, one tier each).")
@click.option("--web-seed", multiple=True, help="BEP 19 web seed URL (repeatable).")
@click.option("--private", is_flag=True, help="Set the private flag (no DHT, no PEX).")
@click.option("--comment", default="", help="Comment stored in the torrent.")
@handle_errors
def create(path: Path, output: Path, fmt: str, piece_size: str | None, tracker, web_seed, private, comment) -> None:
    """Make a deterministic torrent of PATH (a folder becomes the torrent's top folder)."""
    from distrib.create import CreateOptions, list_payload, write_torrent

    opts = CreateOptions(format=fmt, piece_size=parse_bytes(piece_size) if piece_size else 0,
                         trackers=tuple(tracker), web_seeds=tuple(web_seed), private=private, comment=comment)
    rep = Reporter()
    t = write_torrent(path, output, opts, rep.tracker(f"hashing {path.name}", sum(s for _, s in list_payload(path))))
    rep.close()
    click.echo(f"wrote {output}: {t.name}, {len(t.payload_files())} files, {t.info.num_pieces()} pieces of "
               f"{human(t.info.piece_length())}")
    click.echo(f"v1 info-hash: {t.v1 or '-'}\nv2 info-hash: {t.v2 or '-'}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--torrent", "torrent_path", type=click.Path(path_type=Path), required=True)
@click.option("--listen", default="0.0.0.0:6881", show_default=True, help="HOST:PORT to accept peers on.")
@click.option("--no-dht", is_flag=True, help="No DHT and no local peer discovery.")
@click.option("--assume-verified", is_flag=True, help="Skip the full check; pieces are checked as they are sent.")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit per second (e.g. 10m).")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@handle_errors
def seed(path: Path, torrent_path: Path, listen: str, no_dht: bool, assume_verified: bool,
         max_upload_rate: str | None, as_json: bool) -> None:
    """Seed PATH (the torrent's top folder) in the foreground until Ctrl-C/SIGTERM."""
    from distrib.seed import SeedOptions
    from distrib.seed import seed as run_seed
    from distrib.torrentfile import load_torrent

    torrent = load_torrent(torrent_path)
    opts = SeedOptions(session=session_options(listen, no_dht, up=max_upload_rate), assume_verified=assume_verified)
    rep = Reporter(as_json)
    try:
        run_seed(torrent, path, opts, rep)
    finally:
        rep.close()


@main.command()
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder; files land in OUTPUT/<torrent name>/.")
@click.option("--only", multiple=True, metavar="GLOB", help="Fetch only matching files (repeatable).")
@click.option("--experts", metavar="LIST", help="Per-expert layout: the dense files and these experts only (0,3).")
@click.option("--peer", multiple=True, metavar="HOST:PORT", help="Connect to this peer (repeatable).")
@click.option("--web-seed", multiple=True, metavar="URL", help="Add a BEP 19 web seed (repeatable).")
@click.option("--listen", default="0.0.0.0:6881", show_default=True, help="HOST:PORT to accept peers on.")
@click.option("--no-dht", is_flag=True, help="No DHT and no local peer discovery.")
@click.option("--max-download-rate", metavar="BYTES", help="Download limit per second (e.g. 10m).")
@click.option("--max-upload-rate", metavar="BYTES", help="Upload limit per second.")
@click.option("--seed-after", metavar="TIME|RATIO", help="Keep seeding after completion: 30m, 2h or 1.5x.")
@click.option("--timeout", type=float, default=0, help="Give up after this many seconds without progress.")
@click.option("--no-verify", is_flag=True, help="Skip the checks after the download (pieces are still hashed).")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@handle_errors
def fetch(source: str, output: Path, only, experts, peer, web_seed, listen: str, no_dht: bool, max_download_rate,
          max_upload_rate, seed_after, timeout: float, no_verify: bool, as_json: bool) -> None:
    """Download SOURCE (magnet, .torrent, info-hash or catalog name), then verify it."""
    from distrib.fetch import FetchOptions, SeedAfter, fetch_and_verify
    from distrib.session import parse_endpoint
    from distrib.source import resolve

    if experts:
        from runner.convert import expert_globs

        only = (*only, *expert_globs(experts))
    opts = FetchOptions(output=output, only=tuple(only), peers=tuple(parse_endpoint(p, "peer") for p in peer),
                        web_seeds=tuple(web_seed), timeout=timeout,
                        session=session_options(listen, no_dht, up=max_upload_rate, down=max_download_rate),
                        seed_after=SeedAfter.parse(seed_after) if seed_after else None)
    rep = Reporter(as_json)
    try:
        report = fetch_and_verify(resolve(source), opts, rep, verify=not no_verify)
    finally:
        rep.close()
    if report is not None:
        if not as_json:
            print_report(report)
        _exit_for(report)


def _exit_for(report) -> None:
    """Exit 2 naming the first refused file (unsafe or malformed), 1 if data is wrong, else return."""
    refused = next((f for f in report.failures if f.refused), None)
    if refused:
        raise InputError(Path(report.root) / refused.path, refused.detail)
    if not report.ok:
        sys.exit(VerificationError.exit_code)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--torrent", "torrent_path", type=click.Path(path_type=Path), help="Re-hash every piece against it.")
@click.option("--checksums", "checksum_files", multiple=True, type=click.Path(path_type=Path),
              help="md5sum/sha256sum/b3sum file (repeatable); default: RELEASE, *.md5, *SUMS in FOLDER.")
@click.option("--algo", help="Hash algorithm of the checksum files when their name does not say.")
@click.option("--no-checksums", is_flag=True, help="Skip checksum files (pieces and structure only).")
@click.option("--no-structure", is_flag=True, help="Skip the structural checks of weight files.")
@click.option("--manifest", "manifest_path", type=click.Path(path_type=Path),
              help="Check files and tensors against a blake3 manifest (absent files are reported as absent).")
@click.option("--source", type=click.Path(path_type=Path),
              help="With --manifest: also check the source checkpoint's tensors against it (provenance).")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 2, show_default=True,
              help="Threads for hashing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def verify(folder: Path, torrent_path: Path | None, checksum_files, algo, no_checksums, no_structure,
           manifest_path: Path | None, source: Path | None, workers, as_json) -> None:
    """Verify FOLDER (a torrent's top folder): pieces, checksums, weight file structure."""
    from distrib.torrentfile import load_torrent
    from verify.folder import verify_folder

    if not folder.exists():
        raise InputError(folder, "no such file or folder")
    torrent = load_torrent(torrent_path) if torrent_path else None
    rep = Reporter(as_json)
    bar = rep.bar("verifying", torrent.info.total_size()) if torrent else None
    if no_checksums and checksum_files:
        raise InputError("--no-checksums", "cannot be combined with --checksums")
    if source and not manifest_path:
        raise InputError("--source", "needs --manifest: the tensor hashes to compare the source with")
    report = verify_folder(folder, torrent, [] if no_checksums else (list(checksum_files) or None), algo=algo,
                           structure=not no_structure, workers=workers, progress=bar)
    if manifest_path:
        from verify.manifest import verify_manifest

        report.extend(verify_manifest(folder, manifest_path, source, workers))
    rep.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    _exit_for(report)


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Default: TARGET itself.")
@click.option("--md5", help="Expected md5 (default: from a RELEASE file beside the parts).")
@handle_errors
def join(target: Path, output: Path | None, md5: str | None) -> None:
    """Reassemble TARGET from TARGET-split0..N, checking its checksum on the fly."""
    from verify.splits import join_split_file

    dest, parts, expected = join_split_file(target, output, ("md5", md5) if md5 else None)
    checked = f", {expected[0]} {expected[1]} ok" if expected else " (no checksum to check)"
    click.echo(f"wrote {dest} from {len(parts)} parts{checked}")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("weightswarm-demo"), show_default=True)
@click.option("--leechers", default=3, show_default=True, help="Fetch processes in the swarm.")
@click.option("--preset", default="small", show_default=True, help="Size of the synthetic release (see synth).")
@click.option("--keep", is_flag=True, help="Keep the work folder afterwards.")
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds before the demo gives up.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def demo(workdir: Path, leechers: int, preset: str, keep: bool, timeout: float, as_json: bool) -> None:
    """Run the whole job on a local swarm: synth, torrent, seed, N fetches, verify."""
    import shutil

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
        sys.exit(1)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The new folder to write.")
@click.option("--granularity", type=click.Choice(["expert", "layer-expert"]), default="expert", show_default=True,
              help="One file per expert, or per layer and expert.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Default: the source's.")
@handle_errors
def convert(src: Path, output: Path, granularity: str, dtype: str | None) -> None:
    """Restructure a checkpoint (any supported layout) into per-expert safetensors files plus a manifest."""
    from runner.convert import ConvertOptions
    from runner.convert import convert as run_convert

    rep = Reporter()
    manifest = run_convert(src, output, ConvertOptions(granularity=granularity, dtype=dtype), rep.tracker("converting"))
    rep.close()
    click.echo(f"wrote {output}: {len(manifest['files'])} files, {len(manifest['tensors'])} tensors "
               f"from a {manifest['source']['layout']} checkpoint; manifest.json last")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The manifest file to write.")
@click.option("--tensors", is_flag=True, help="Also hash every tensor of the weight files.")
@handle_errors
def manifest(folder: Path, output: Path, tensors: bool) -> None:
    """Write a blake3 manifest of FOLDER: every file, and with --tensors every tensor."""
    from verify.manifest import build_manifest, manifest_bytes
    from weightswarm.atomic import atomic_write_bytes

    if not output.parent.is_dir():
        raise InputError(output.parent, "output folder does not exist")
    m = build_manifest(folder, tensors=tensors)
    atomic_write_bytes(output, manifest_bytes(m))
    click.echo(f"wrote {output}: {len(m['files'])} files" + (f", {len(m['tensors'])} tensors" if tensors else ""))


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The new folder to write.")
@click.option("--format", "fmt", type=click.Choice(["hf", "consolidated"]), default="hf", show_default=True)
@click.option("--shard-size", default="2g", show_default=True, help="Largest HF shard (bytes, 2g).")
@handle_errors
def export(src: Path, output: Path, fmt: str, shard_size: str) -> None:
    """Reassemble SRC (per-expert or any supported layout) as HF shards or Mistral's consolidated.00.pth."""
    from runner.export import export as run_export

    written = run_export(src, output, fmt, parse_bytes(shard_size))
    click.echo(f"wrote {output}: " + ", ".join(p.name for p in written))

@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="Text prompt, through MODEL_DIR/tokenizer.model (BOS first).")
@click.option("--tokens", metavar="IDS", help="Comma-separated token ids instead of a prompt (1,415,2936).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=16, show_default=True)
@click.option("--reference", type=click.Path(path_type=Path),
              help="The original checkpoint (any layout): logits must agree, bit for bit in float32.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]),
              help="Default: the checkpoint's (bf16 loads without a copy); float32 for a bit-exact reference.")
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@handle_errors
def smoke(model_dir: Path, prompt, tokens, max_new_tokens, reference, device, dtype, temperature, top_p, seed,
          as_json) -> None:
    """Assemble the model from MODEL_DIR and prove it runs right: generation, KV cache, routing, reference."""
    from runner.smoke import parse_tokens, print_report
    from runner.smoke import smoke as run_smoke

    if temperature != temperature:  # NaN slips through FloatRange
        raise InputError("--temperature", "must be a number")

    result = run_smoke(model_dir, prompt=prompt, tokens=parse_tokens(tokens) if tokens else None,
                       max_new_tokens=max_new_tokens, reference=reference, device=device, dtype=dtype, seed=seed,
                       temperature=temperature, top_p=top_p)
    if as_json:
        click.echo(json.dumps(result))
    else:
        print_report(result)
    if not result["passed"]:
        sys.exit(VerificationError.exit_code)


from weightswarm.daemon_cli import daemon  # noqa: E402  (the daemon's commands live in their own module)

main.add_command(daemon)
