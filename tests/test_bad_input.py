"""Bad input: exit 2, one `Error: <path>: <problem>` line (plus a hint), no traceback, nothing written."""
from __future__ import annotations

import os

import libtorrent as lt
import torch
from safetensors.torch import save_file

from tests.support import LOOPBACK, run_ws


def listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(r, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert lines[0] == message, r.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("Hint: "))
    assert "Traceback" not in r.stderr


def fetch(source, out):
    return run_ws("fetch", source, "-o", out, *LOOPBACK, "--timeout", "5")


def test_garbage_torrent(tmp_path):
    bad = tmp_path / "garbage.torrent"
    bad.write_bytes(os.urandom(300))
    r = fetch(bad, tmp_path / "out")
    assert_refused(r, f"Error: {bad}: not a valid torrent file (bad bencoding or no info dictionary)")
    assert listing(tmp_path) == ["garbage.torrent"]


def test_truncated_torrent(tmp_path, tiny_torrent):
    bad = tmp_path / "truncated.torrent"
    bad.write_bytes(tiny_torrent.read_bytes()[:700])
    r = fetch(bad, tmp_path / "out")
    assert_refused(r, f"Error: {bad}: not a valid torrent file (bad bencoding or no info dictionary)")
    assert not (tmp_path / "out").exists()


def test_malformed_magnet(tmp_path):
    r = fetch("magnet:?xt=urn:btih:not-a-hash", tmp_path / "out")
    assert_refused(r, "Error: magnet:?xt=urn:btih:not-a-hash: malformed magnet URI: invalid info-hash")
    assert not (tmp_path / "out").exists()


def test_unknown_source_lists_the_catalog(tmp_path):
    r = fetch("mixtral-9x9b", tmp_path / "out")
    assert_refused(r, "Error: mixtral-9x9b: not a magnet URI, .torrent file, info-hash or catalog name")
    assert "mixtral-8x7b" in r.stderr


def _escaping_torrent(path, files=None, tree=None):
    info = {b"name": b"evil", b"piece length": 16384}
    if files is not None:
        info |= {b"files": files, b"pieces": bytes(20)}
    if tree is not None:
        info |= {b"file tree": tree, b"meta version": 2}
    path.write_bytes(lt.bencode({b"info": info}))
    return path


def test_torrent_paths_hidden_behind_a_second_spelling_or_a_symlink(tmp_path):
    both = _escaping_torrent(tmp_path / "utf8.torrent", files=[
        {b"length": 5, b"path": [b"ok.txt"], b"path.utf-8": [b"..", b"x.txt"]}])
    r = fetch(both, tmp_path / "out")
    assert_refused(r, f"Error: {both}: unsafe file path '../x.txt': it could escape the download folder")
    link = _escaping_torrent(tmp_path / "link.torrent", files=[
        {b"length": 0, b"path": [b"l"], b"attr": b"l", b"symlink path": [b"..", b"..", b"etc"]}])
    r = fetch(link, tmp_path / "out")
    assert_refused(r, f"Error: {link}: symlink 'l' in the torrent: links could point anywhere")
    assert listing(tmp_path) == ["link.torrent", "utf8.torrent"]


def test_torrent_whose_paths_escape(tmp_path):
    v1 = _escaping_torrent(tmp_path / "v1.torrent", files=[{b"length": 5, b"path": [b"..", b"escape.txt"]}])
    v2 = _escaping_torrent(tmp_path / "v2.torrent",
                           tree={b"..": {b"x.txt": {b"": {b"length": 5, b"pieces root": bytes(32)}}}})
    for t in (v1, v2):
        r = fetch(t, tmp_path / "out")
        shown = "../escape.txt" if t == v1 else ".."  # v2: the first bad component of the file tree
        assert_refused(r, f"Error: {t}: unsafe file path {shown!r}: it could escape the download folder")
        r = run_ws("verify", tmp_path, "--torrent", t)
        assert r.returncode == 2 and "unsafe file path" in r.stderr
    assert listing(tmp_path) == ["v1.torrent", "v2.torrent"]


def test_missing_output_parent(tmp_path, tiny_torrent, tiny_release):
    out = tmp_path / "no" / "such" / "out"
    assert_refused(fetch(tiny_torrent, out), f"Error: {tmp_path / 'no' / 'such'}: output parent folder does not exist")
    r = run_ws("create", tiny_release, "-o", out / "x.torrent")
    assert_refused(r, f"Error: {out}: output folder does not exist")
    r = run_ws("synth", out)
    assert r.returncode == 2 and r.stderr.startswith(f"Error: {out.parent}: ")
    assert listing(tmp_path) == []


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_whose_pickle_would_run_code(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": _RunsCode(marker)}, folder / "consolidated.00.pth")
    before = listing(tmp_path)
    r = run_ws("verify", folder)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"Error: {folder / 'consolidated.00.pth'}: unsafe pickle refused: ")
    assert len(r.stderr.splitlines()) == 1
    assert not marker.exists()
    assert listing(tmp_path) == before


def test_safetensors_with_a_lying_header(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, path)
    data = path.read_bytes()
    # Claim that "b" is 8 elements long: its byte range now runs past the end of the file.
    path.write_bytes(data.replace(b'"shape":[4],"data_offsets":[16,32]', b'"shape":[8],"data_offsets":[16,48]'))
    r = run_ws("verify", folder)
    assert_refused(r, f"Error: {path}: b: data_offsets end 48 is past the end of the data (32 bytes)")


def test_verbose_shows_the_traceback(tmp_path):
    bad = tmp_path / "garbage.torrent"
    bad.write_bytes(b"not bencode")
    r = run_ws("--verbose", "fetch", bad, "-o", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.rstrip().endswith(
        f"Error: {bad}: not a valid torrent file (bad bencoding or no info dictionary)")


def test_bad_options(tmp_path, tiny_release):
    r = run_ws("create", tiny_release, "-o", tmp_path / "x.torrent", "--piece-size", "1000")
    assert_refused(r, "Error: --piece-size 1000: must be a power of two from 16 KiB to 16 MiB")
    r = run_ws("fetch", "mixtral-8x7b", "-o", tmp_path / "out", "--peer", "nowhere")
    assert_refused(r, "Error: --peer nowhere: not a valid address (expected HOST:PORT)")
    r = run_ws("synth", tiny_release)
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr
    assert listing(tmp_path) == []


def test_magnet_whose_metadata_escapes_writes_nothing(tmp_path):
    """A peer serves metadata with a `..` path: refused when it arrives, before any byte is downloaded."""
    import hashlib

    payload = b"x" * 5
    info = {b"name": b"evil", b"piece length": 16384, b"pieces": hashlib.sha1(payload).digest(),
            b"files": [{b"length": 5, b"path": [b"..", b"escape.txt"]}]}
    ses = lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
                      "enable_upnp": False, "enable_natpmp": False})
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bencode({b"info": info}))
    atp.save_path = str(tmp_path / "peer")
    ses.add_torrent(atp)
    v1 = hashlib.sha1(lt.bencode(info)).hexdigest()
    out = tmp_path / "out"
    try:
        r = run_ws("fetch", f"magnet:?xt=urn:btih:{v1}", "-o", out, "--peer", f"127.0.0.1:{ses.listen_port()}",
                   *LOOPBACK, "--timeout", "30")
    finally:
        ses.pause()
        del ses
    assert_refused(r, f"Error: magnet:?xt=urn:btih:{v1}: unsafe file path '../escape.txt': "
                      "it could escape the download folder")
    assert not (tmp_path / "escape.txt").exists()
    assert [p for p in listing(out) if not p.startswith(".weightswarm")] == []
