"""`weightswarm verify` and `join` as a user runs them: exit codes, the named piece and file."""
from __future__ import annotations

import json
import subprocess

from tests.support import flip_byte, run_ws


def test_good_release_passes_every_check(release_copy, tiny_torrent):
    r = run_ws("verify", release_copy, "--torrent", tiny_torrent, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["exit_code"] == 0
    assert set(report["summary"]) == {"pieces", "merkle", "checksum", "structure", "params"}
    assert report["summary"]["checksum"] == {"passed": 2, "failed": 0}  # RELEASE found by itself


def test_flipped_byte_names_piece_and_file(release_copy, tiny_torrent):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    ckpt = next(f for f in t.files() if f.path == "consolidated.00.pth")
    offset = 300_000
    flip_byte(release_copy / "consolidated.00.pth", offset)
    piece = (ckpt.offset + offset) // t.info.piece_length()

    r = run_ws("verify", release_copy, "--torrent", tiny_torrent, "--no-structure")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"FAIL pieces: consolidated.00.pth: piece {piece} failed (covers consolidated.00.pth)" in r.stdout
    assert f"FAIL merkle: consolidated.00.pth: piece {piece} failed" in r.stdout
    assert "verified: FAILED" in r.stdout

    r = run_ws("verify", release_copy, "--checksums", "RELEASE", "--no-structure")
    assert r.returncode == 1
    assert "FAIL checksum: consolidated.00.pth: md5 mismatch: expected" in r.stdout
    assert "tokenizer.model" not in r.stdout.split("verified:")[0].split("FAIL", 1)[1]


def test_split_release_verifies_as_the_whole_file_and_joins(tmp_path, tiny_release):
    from weightswarm.convert.synth import synthesize

    rel = tmp_path / "split"
    synthesize(rel, preset="tiny", split=300_000)
    parts = sorted(p.name for p in rel.glob("consolidated.00.pth-split*"))
    assert len(parts) == 4
    r = run_ws("verify", rel, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], r.stdout
    assert not (rel / "consolidated.00.pth").exists()  # verified in place, never joined on disk

    r = run_ws("join", rel / "consolidated.00.pth")
    assert r.returncode == 0, r.stderr
    assert "md5" in r.stdout and "ok" in r.stdout
    assert (rel / "consolidated.00.pth").read_bytes() == (tiny_release / "consolidated.00.pth").read_bytes()


def test_join_refuses_wrong_md5_and_leaves_nothing(tmp_path):
    from weightswarm.convert.synth import synthesize

    rel = tmp_path / "split"
    synthesize(rel, preset="tiny", split=500_000)
    before = sorted(p.name for p in rel.iterdir())
    r = run_ws("join", rel / "consolidated.00.pth", "--md5", "0" * 32)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {rel / 'consolidated.00.pth'}: md5 mismatch: expected {'0' * 32}, got ")
    assert sorted(p.name for p in rel.iterdir()) == before


def test_md5sum_accepts_the_synthetic_release(release_copy):
    r = subprocess.run(["md5sum", "-c", "RELEASE"], cwd=release_copy, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
