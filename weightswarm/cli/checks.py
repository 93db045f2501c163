"""Commands that check what is on disk: verify and join. torch-free and libtorrent-free unless --torrent is given:
``verify --manifest`` is measured against b3sum, process start-up included."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from weightswarm.cli.common import CONTEXT, PATH, handle_errors
from weightswarm.cli.console import Reporter, exit_for, print_report
from weightswarm.core.errors import InputError, OptionError
from weightswarm.core.units import plural
from weightswarm.formats.perexpert import parse_experts
from weightswarm.verify.report import Report


@click.command(context_settings=CONTEXT, short_help="Verify a folder: pieces, sums, structure.")
@click.argument("folder", type=PATH)
@click.option("--torrent", "torrent_path", type=PATH, metavar="PATH", help="Re-hash every piece against it.")
@click.option("--checksums", "checksum_files", multiple=True, type=PATH, metavar="PATH",
              help="md5sum/sha256sum/b3sum file (repeatable) [default: RELEASE, *.md5, *SUMS in FOLDER].")
@click.option("--algo", type=click.Choice(["md5", "sha1", "sha256", "sha512", "blake3"]),
              help="Hash algorithm of the checksum files when their name does not say.")
@click.option("--no-checksums", is_flag=True, help="Skip checksum files (pieces and structure only).")
@click.option("--no-structure", is_flag=True, help="Skip the structural checks of weight files.")
@click.option("--manifest", "manifest_path", type=PATH, metavar="PATH",
              help="Check files and tensors against a blake3 manifest (absent files are reported as absent).")
@click.option("--source", type=PATH, metavar="PATH",
              help="With --manifest: also check the source checkpoint's tensors against it (provenance).")
@click.option("--experts", metavar="LIST",
              help="With --torrent: a release fetched for these experts only (0,3 or 0-3); checks what they need.")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 2, show_default=True, metavar="N",
              help="Threads for hashing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def verify(folder: Path, torrent_path: Path | None, checksum_files, algo, no_checksums, no_structure,
           manifest_path: Path | None, source: Path | None, experts: str | None, workers, as_json) -> None:
    """Verify FOLDER (a torrent's top folder): pieces, checksums, weight file structure."""
    if not folder.exists():
        raise InputError(folder, "no such file or folder")
    if no_checksums and checksum_files:
        raise OptionError("--no-checksums", "", "cannot be combined with --checksums")
    if source and not manifest_path:
        raise OptionError("--source", source, "needs --manifest: the tensor hashes to compare the source with")
    if experts and not torrent_path:
        raise OptionError("--experts", experts, "needs --torrent: the pieces say which bytes the experts need")
    torrent = None
    if torrent_path:
        from weightswarm.distrib.torrentfile import load_torrent  # libtorrent only for --torrent

        torrent = load_torrent(torrent_path)
    rep = Reporter(as_json)
    progress = rep.bar("verifying", torrent.info.total_size()) if torrent else None
    report = Report(str(folder))
    if torrent or not no_checksums or not no_structure:
        from weightswarm.verify.folder import verify_folder

        report = verify_folder(folder, torrent, [] if no_checksums else (list(checksum_files) or None), algo=algo,
                               structure=not no_structure, workers=workers, progress=progress,
                               experts=parse_experts(experts) if experts else None)
    if manifest_path:
        from weightswarm.verify.manifest import verify_manifest

        report.extend(verify_manifest(folder, manifest_path, source, workers))
    rep.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report, torrent.info.num_pieces() if torrent else None, torrent.name if torrent else None)
    exit_for(report)


@click.command(context_settings=CONTEXT, short_help="Rebuild a file from its split parts.")
@click.argument("target", type=PATH)
@click.option("-o", "--output", type=PATH, metavar="PATH", help="The file to write [default: TARGET itself].")
@click.option("--md5", metavar="HEX", help="Expected md5 [default: from a RELEASE file beside the parts].")
@handle_errors
def join(target: Path, output: Path | None, md5: str | None) -> None:
    """Reassemble TARGET from TARGET-split0..N, checking its checksum on the fly."""
    from weightswarm.verify.join import join_split_file

    dest, parts, expected = join_split_file(target, output, md5)
    checked = f", {expected[0]} {expected[1]} ok" if expected else " (no checksum to check)"
    click.echo(f"wrote {dest} from {plural(len(parts), 'part')}{checked}")
