"""fetch options against a real seeder: --only with pad files, web seeds, seed checks, the catalog."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support import LOOPBACK, flip_byte, free_port, run_ws, seeder, tree_bytes, wait_listening


def test_only_fetches_the_chosen_files_and_their_bytes(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    assert any(f.pad for f in t.files())  # hybrid: pad files align each file to a piece
    seed = seeder(nodes, tiny_release, tiny_torrent)
    f = nodes("fetch", tiny_torrent, "-o", tmp_path, "--only", "params.json", "--only", "*.model",
              "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK, "--json", "--timeout", "30")
    assert f.wait() == 0, f.stderr
    got = tree_bytes(tmp_path / t.name)
    assert sorted(got) == ["params.json", "tokenizer.model"]
    assert got == {k: v for k, v in tree_bytes(tiny_release).items() if k in got}
    wanted = sum(len(v) for v in got.values())
    finished = next(e for e in f.events if e["event"] == "finished")
    # Files start on piece boundaries, so nothing of the 1 MB checkpoint was downloaded.
    assert wanted <= finished["downloaded"] < wanted + 2 * t.info.piece_length()
    report = next(e for e in f.events if e["event"] == "verify")["report"]
    assert report["ok"] and {x["path"] for x in report["findings"]} == {"params.json", "tokenizer.model"}


def test_web_seed_only(tiny_release, tiny_torrent, tmp_path):
    """A plain HTTP server in the BEP 19 layout (URL + name/path) is enough to complete."""
    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(tiny_release.parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(http, port)
        r = run_ws("fetch", tiny_torrent, "-o", tmp_path / "out", "--web-seed", f"http://127.0.0.1:{port}/",
                   *LOOPBACK, "--timeout", "30")
        assert r.returncode == 0, r.stdout + r.stderr
        assert tree_bytes(tmp_path / "out" / tiny_release.name) == tree_bytes(tiny_release)
    finally:
        http.terminate()
        http.wait(timeout=10)


def test_seed_refuses_data_that_does_not_match(release_copy, tiny_torrent):
    flip_byte(release_copy / "consolidated.00.pth", 1000)
    r = run_ws("seed", release_copy, "--torrent", tiny_torrent, *LOOPBACK)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {release_copy}: data does not match the torrent: 1 of ")


def test_seed_assume_verified_serves_a_folder_of_another_name(nodes, tiny_release, tiny_torrent, tmp_path):
    import shutil

    other = tmp_path / "renamed"
    shutil.copytree(tiny_release, other)
    seed = seeder(nodes, other, tiny_torrent, "--assume-verified")
    r = run_ws("fetch", tiny_torrent, "-o", tmp_path / "out", "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK,
               "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_bytes(tmp_path / "out" / tiny_release.name) == tree_bytes(tiny_release)


def test_catalog_lists_the_known_releases():
    r = run_ws("catalog", "--json")
    assert r.returncode == 0
    releases = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(releases) == {"mixtral-8x7b", "mixtral-8x22b", "mistral-7b-v0.1", "grok-1"}
    m = releases["mixtral-8x7b"]
    assert m["magnet"].startswith("magnet:?xt=urn:btih:5546272da9065eddeb6fcd7ffddeef5b75be79a7&dn=mixtral-8x7b-32kseqlen")
    assert ["consolidated.00.pth", "1faa9bc9b20fcfe81fcd4eb7166a79e6"] in m["md5"]
    from weightswarm.distrib.source import resolve

    src = resolve("mixtral-8x7b")
    assert src.key == "5546272da9065eddeb6fcd7ffddeef5b75be79a7" and src.release.name == "mixtral-8x7b"
    assert resolve("5546272DA9065EDDEB6FCD7FFDDEEF5B75BE79A7").release.name == "mixtral-8x7b"


def test_publisher_md5_mismatch_after_download_exits_1(nodes, tiny_release, tmp_path):
    import shutil

    rel = tmp_path / "rel"
    shutil.copytree(tiny_release, rel)
    lines = (rel / "RELEASE").read_text().splitlines()
    (rel / "RELEASE").write_text("\n".join([lines[0], "0" * 32 + "  tokenizer.model"]) + "\n")
    torrent = tmp_path / "rel.torrent"
    assert run_ws("create", rel, "-o", torrent).returncode == 0
    seed = seeder(nodes, rel, torrent)
    r = run_ws("fetch", torrent, "-o", tmp_path / "out", "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK,
               "--timeout", "30")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"FAIL checksum: tokenizer.model: md5 mismatch: expected {'0' * 32}, got " in r.stdout
    assert "verified: FAILED" in r.stdout


def test_a_swarm_that_delivers_nothing_exits_3_saying_what_was_tried(tiny_torrent, tmp_path):
    """Not bad input (2) nor wrong data (1): the swarm did not deliver (3), and a rerun continues."""
    port = free_port()
    r = run_ws("fetch", tiny_torrent, "-o", tmp_path / "out", "--peer", f"127.0.0.1:{port}", *LOOPBACK,
               "--timeout", "2", "--json")
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines()[0] == (f"Error: {tiny_torrent}: could not complete: no data for 2 s; "
                                        "no trackers; DHT off; 1 peer tried, 0 connected")
    assert r.stderr.splitlines()[1].startswith("Hint: run the same command again to continue")
    last = json.loads(r.stdout.splitlines()[-1])  # --json: the error is the last event, on stdout too
    assert last["event"] == "error" and last["exit_code"] == 3 and "could not complete" in last["problem"]
    waiting = [json.loads(line) for line in r.stdout.splitlines() if '"progress"' in line]
    assert waiting and waiting[-1]["swarm"]["peers_tried"] == 1  # what is tried shows while it waits


def test_only_on_a_v1_torrent_and_a_bare_info_hash(nodes, tiny_release, tmp_path):
    """v1 pieces straddle files: the neighbours' bytes go to the part file, never into the payload folder."""
    from weightswarm.distrib.torrentfile import load_torrent

    torrent = tmp_path / "v1.torrent"
    assert run_ws("create", tiny_release, "-o", torrent, "--format", "v1").returncode == 0
    t = load_torrent(torrent)
    seed = seeder(nodes, tiny_release, torrent)
    r = run_ws("fetch", t.v1, "-o", tmp_path / "out", "--only", "params.json", "--peer",
               f"127.0.0.1:{seed.port}", *LOOPBACK, "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(tree_bytes(tmp_path / "out" / t.name)) == ["params.json"]
    assert (tmp_path / "out" / t.name / "params.json").read_bytes() == (tiny_release / "params.json").read_bytes()
