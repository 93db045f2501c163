"""Issue 10's defects one by one: each input that once reached an internal error, a 500, unbounded memory
or a silent pass, now refused with exit 2 and one line (memory bounds: tests/test_hostile.py)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import libtorrent as lt
import pytest

from tests import hostile
from tests.support import LOOPBACK, Daemon, place, run_ws


def refused(r, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr)
    assert not hostile.error_lines_problems(r.stderr), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("command", ["fetch", "verify --torrent", "verify --checksums", "verify --manifest",
                                     "seed --torrent"])
def test_only_regular_files_are_inputs(command, device, tiny_release, tmp_path):
    kind = "a character device"
    if device == "fifo":
        device, kind = tmp_path / "fifo", "a FIFO"
        os.mkfifo(device)  # nobody writes to it: opening it to read would block forever
    out = tmp_path / "out"
    argv = {"fetch": ["fetch", device, "-o", out, *LOOPBACK, "--timeout", "5"],
            "seed --torrent": ["seed", tiny_release, "--torrent", device, *LOOPBACK]}.get(command)
    if argv is None:
        argv = ["verify", tiny_release, command.split()[1], device]
    refused(run_ws(*argv, timeout=60), f"{device}: is {kind}")
    assert not out.exists()


@pytest.mark.parametrize("zeros", ["0" * 40, "0" * 64, "magnet:?xt=urn:btih:" + "0" * 40])
def test_an_all_zero_info_hash_is_refused_and_leaves_no_lock(zeros, tmp_path):
    refused(run_ws("fetch", zeros, "-o", tmp_path / "o", *LOOPBACK, "--timeout", "5"), "info-hash")
    assert not (tmp_path / "o").exists()


def _checkpoint_variant(tiny_release, tmp_path, name: str, make) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_release, folder)
    make(folder)
    return folder


def _pth_case(tiny_release, tmp_path, case: str):
    """A copy of the release whose checkpoint is the named case of the hostile corpus."""
    import random

    cases = dict(hostile.pth_cases(random.Random(hostile.SEED), (tiny_release / "consolidated.00.pth").read_bytes(),
                                   str(tmp_path / "pwned")))
    return _checkpoint_variant(tiny_release, tmp_path, "rel",
                               lambda f: (f / "consolidated.00.pth").write_bytes(cases[case]))


@pytest.mark.parametrize("case,words", [
    ("declared-size0", "declares 2147483648 bytes"),  # 2 GiB declared in a 1 MB file
    ("declared-size2", "declares 1099511627776 bytes"),
    ("pkl-deflate-bomb", "compressed"),
    ("deflated-tensor", "compressed"),
    ("pkl-tensor-offset-2**40", "storage"),
])
def test_verify_convert_and_manifest_refuse_a_lying_checkpoint_alike(case, words, tiny_release, tmp_path):
    rel = _pth_case(tiny_release, tmp_path, case)
    for argv in (["verify", rel, "--no-checksums"], ["convert", rel, "-o", tmp_path / "c"],
                 ["manifest", rel, "--tensors", "-o", tmp_path / "m.json"]):
        refused(run_ws(*argv), words)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("change", [{"n_layers": 100_000_000}, {"moe": {"num_experts": 10**6, "num_experts_per_tok": 2}},
                                    {"dim": 10**18}])
def test_params_counts_are_bounded_by_the_files(change, tiny_release, converted, tmp_path):
    def edit(folder):
        p = folder / "params.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | change))

    rel = _checkpoint_variant(tiny_release, tmp_path, "rel", edit)
    experts = _checkpoint_variant(converted, tmp_path, "experts", edit)
    # verify reports it (exit 1: the release contradicts itself), within bounded memory: the expected
    # tensors are named lazily, and only the first few that are missing
    r = run_ws("verify", rel, "--no-checksums")
    assert r.returncode in (1, 2) and "FAIL params: params.json" in r.stdout, r.stdout[-500:]
    assert not hostile.error_lines_problems(r.stderr), r.stderr
    for argv in (["convert", rel, "-o", tmp_path / "c"], ["smoke", experts, "--max-new-tokens", "1"]):
        refused(run_ws(*argv), "params.json")


def _with_piece_layers(tiny_release, tmp_path, layers) -> Path:
    from weightswarm.distrib.create import CreateOptions, write_torrent

    good = tmp_path / "good.torrent"
    write_torrent(tiny_release, good, CreateOptions(format="v2"))
    t = lt.bdecode(good.read_bytes())
    t[b"piece layers"] = layers
    bad = tmp_path / "bad.torrent"
    bad.write_bytes(lt.bencode(t))
    return bad


@pytest.mark.parametrize("layers", [5, [b"x"], {b"x" * 32: 5}])
def test_a_malformed_piece_layers_is_refused_where_the_torrent_is_parsed(layers, tiny_release, tmp_path):
    bad = _with_piece_layers(tiny_release, tmp_path, layers)
    for argv in (["verify", tiny_release, "--torrent", bad], ["seed", tiny_release, "--torrent", bad, *LOOPBACK],
                 ["fetch", bad, "-o", tmp_path / "o", *LOOPBACK, "--timeout", "5"]):
        refused(run_ws(*argv), "piece layer")


def test_malformed_multipart_bodies_and_suffix_ranges(nodes, tiny_release, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    data = tmp_path / "data"
    place(tiny_release, data / "w")
    d = Daemon(nodes, data, tmp_path / "state")
    assert d.add(tiny_torrent.read_bytes(), "w")[0] == 201
    d.event("seeding", t.info_hash)
    mp = "multipart/form-data; boundary=XX"
    for body, ctype in [(b"", "multipart/form-data"), (b"--XX\r\nContent-Disposition: form-data; name=", mp),
                        (os.urandom(3000), mp), (b"", mp),
                        (b"--XX\r\nContent-Type: multipart/mixed; boundary=YY\r\n\r\n--YY\r\n\r\nx\r\n--YY--\r\n--XX--",
                         mp)]:
        status, out, _ = d.request("POST", "/v1/torrents", body, {"Content-Type": ctype})
        assert status == 400, (body[:60], status, out)
    params = (tiny_release / "params.json").read_bytes()
    url = f"/seed/{t.v1}/{t.name}/params.json"
    code, body, headers = d.request("GET", url, headers={"Range": "bytes=-99999999999"}, token=None)
    assert code == 206, code  # RFC 9110: a suffix longer than the file means all of it
    assert headers["Content-Range"] == f"bytes 0-{len(params) - 1}/{len(params)}"
    code, _, _ = d.request("GET", url, headers={"Range": f"bytes={len(params)}-"}, token=None)
    assert code == 416


def test_no_error_line_has_an_empty_problem(tiny_release, tmp_path):
    """A member the zip cannot read used to print ``member archive/data/0: `` and nothing after."""
    rel = _pth_case(tiny_release, tmp_path, "bzip2-method")
    for argv in (["verify", rel, "--no-checksums"], ["convert", rel, "-o", tmp_path / "c"]):
        refused(run_ws(*argv), "archive/data/0")


def test_a_fast_fetch_names_its_sources(nodes, tiny_release, tiny_torrent, tmp_path):
    from tests.support import seeder

    s = seeder(nodes, tiny_release, tiny_torrent)
    r = run_ws("fetch", tiny_torrent, "-o", tmp_path / "o", *LOOPBACK, "--peer", f"127.0.0.1:{s.port}", "--json")
    assert r.returncode == 0, r.stderr
    done = next(json.loads(line) for line in r.stdout.splitlines() if '"finished"' in line)
    assert done["sources"], done  # who sent the bytes, even when it was over within a second


def test_a_lying_seeder_costs_little_and_is_banned(nodes, tiny_release, tiny_torrent, tmp_path):
    """A seed that claims every piece over garbage (seed mode, nothing checked) next to an honest one:
    the fetch completes bit-exact, and the liar's pieces are thrown away."""
    from tests.support import seeder, tree_bytes

    liar = tmp_path / "liar" / tiny_release.name
    shutil.copytree(tiny_release, liar)
    for f in liar.iterdir():
        f.write_bytes(os.urandom(f.stat().st_size))
    bad = seeder(nodes, liar, tiny_torrent, "--assume-verified")
    good = seeder(nodes, tiny_release, tiny_torrent)
    ports = [bad.port, good.port]
    f = nodes("fetch", tiny_torrent, "-o", tmp_path / "o", *LOOPBACK, "--json", "--timeout", "60",
              *[a for p in ports for a in ("--peer", f"127.0.0.1:{p}")])
    assert f.wait() == 0, f.stderr
    assert tree_bytes(tmp_path / "o" / tiny_release.name) == tree_bytes(tiny_release)
    done = next(e for e in f.events if e["event"] == "finished")
    banned = [e["peer"] for e in f.events if e["event"] == "peer_banned"]
    if done["failed"]:  # the liar got a piece in before the honest seed: it cost that piece and its ban
        assert banned == [f"127.0.0.1:{ports[0]}"], (banned, done)
        assert done["failed"] <= 4 * tiny_torrent_piece(tiny_torrent), done


def tiny_torrent_piece(torrent: Path) -> int:
    return lt.torrent_info(str(torrent)).piece_length()
