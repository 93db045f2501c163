"""Deterministic torrents: same files, same info-hash anywhere; exact sizes at piece boundaries."""
from __future__ import annotations

import os
import shutil

import libtorrent as lt
import pytest

from tests.support import run_ws
from weightswarm.distrib.create import CreateOptions, auto_piece_size, create_torrent, write_torrent
from weightswarm.distrib.torrentfile import load_torrent, parse_torrent
from weightswarm.verify.pieces import verify_pieces

PIECE = 16 * 1024


def test_same_files_same_info_hash_anywhere(tiny_release, tiny_torrent, tmp_path):
    elsewhere = tmp_path / "deeper" / tiny_release.name
    shutil.copytree(tiny_release, elsewhere)
    for p in elsewhere.iterdir():  # other times and modes must not matter
        os.utime(p, (1, 1))
        p.chmod(0o755)
    (elsewhere / ".hidden").write_text("left out")
    again = parse_torrent(create_torrent(elsewhere), "again")
    assert again.info_hash == load_torrent(tiny_torrent).info_hash
    assert create_torrent(elsewhere) == tiny_torrent.read_bytes()  # the whole file, not only the info dict
    raw = lt.bdecode(tiny_torrent.read_bytes())
    assert b"creation date" not in raw
    assert [f.path for f in again.payload_files()] == ["RELEASE", "consolidated.00.pth", "params.json",
                                                      "tokenizer.model"]


@pytest.mark.parametrize("fmt,v1,v2", [("hybrid", True, True), ("v1", True, False), ("v2", False, True)])
def test_formats_and_fields(tiny_release, tmp_path, fmt, v1, v2):
    opts = CreateOptions(format=fmt, piece_size=32 * 1024, trackers=("http://127.0.0.1:1/announce",),
                         web_seeds=("http://127.0.0.1:2/seed/",), private=True, comment="synthetic")
    t = write_torrent(tiny_release, tmp_path / "t.torrent", opts)
    assert (t.v1 is not None, t.v2 is not None) == (v1, v2)
    assert t.info.piece_length() == 32 * 1024 and t.info.priv() and t.info.comment() == "synthetic"
    assert t.raw[b"announce"] == b"http://127.0.0.1:1/announce"
    assert t.raw[b"url-list"] in (b"http://127.0.0.1:2/seed/", [b"http://127.0.0.1:2/seed/"])
    assert any(f.pad for f in t.files()) == (fmt != "v1")  # v1 stays pad-free for older clients
    assert all(f.ok for f in verify_pieces(tiny_release, t))


def test_auto_piece_size_policy():
    assert auto_piece_size(1) == 16 * 1024
    assert auto_piece_size(264_354_889) == 64 * 1024  # the benchmarks' medium release: 4,034 pieces
    assert auto_piece_size(1_000_000_000) == 256 * 1024  # 3,815 pieces
    assert auto_piece_size(93_405_585_408) == 16 * 1024 * 1024  # Mixtral 8x7B: 5,568 pieces


@pytest.mark.parametrize("sizes", [[PIECE], [PIECE - 1, 1], [PIECE + 1], [2 * PIECE, PIECE - 1, 3]])
def test_sizes_at_piece_boundaries(tmp_path, sizes):
    root = tmp_path / "payload"
    root.mkdir()
    for i, n in enumerate(sizes):
        (root / f"f{i}.bin").write_bytes(os.urandom(n))
    torrents = {fmt: parse_torrent(create_torrent(root, CreateOptions(format=fmt, piece_size=PIECE)), fmt)
                for fmt in ("hybrid", "v1", "v2")}
    for fmt, t in torrents.items():
        assert [f.size for f in t.payload_files()] == sizes
        assert all(f.ok for f in verify_pieces(root, t)), fmt
    # The last byte of the last file lies in the last v1 piece: only it fails, named in each file it covers.
    last_file = f"f{len(sizes) - 1}.bin"
    with open(root / last_file, "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    last_piece = (sum(sizes) - 1) // PIECE
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    covered = [f"f{i}.bin" for i, (s, n) in enumerate(zip(starts, sizes, strict=True)) if s + n > last_piece * PIECE]
    bad = [f for f in verify_pieces(root, torrents["v1"]) if not f.ok]
    detail = f"piece {last_piece} failed (covers {', '.join(covered)})"
    assert [(f.path, f.detail) for f in bad] == [(name, detail) for name in covered]


def test_single_file_torrent(tiny_release, tmp_path):
    t = write_torrent(tiny_release / "params.json", tmp_path / "p.torrent")
    assert t.name == "params.json" and [f.path for f in t.payload_files()] == ["params.json"]
    assert all(f.ok for f in verify_pieces(tiny_release / "params.json", t))


def test_cli_create_prints_both_hashes(tiny_release, tiny_torrent, tmp_path):
    out = tmp_path / "cli.torrent"
    r = run_ws("create", tiny_release, "-o", out)
    assert r.returncode == 0, r.stderr
    t = load_torrent(tiny_torrent)
    assert f"v1 info-hash: {t.v1}" in r.stdout and f"v2 info-hash: {t.v2}" in r.stdout
    assert out.read_bytes() == tiny_torrent.read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temp file left beside it


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_ws("create", tmp_path / "empty", "-o", tmp_path / "e.torrent")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == f"Error: {tmp_path / 'empty'}: no files to put in a torrent (hidden files are left out)"
