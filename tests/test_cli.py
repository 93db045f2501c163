"""The command line as a new user meets it: global flags anywhere, messages, help, units, the progress line."""
from __future__ import annotations

import json
import os
import signal
import subprocess

from tests.support import WS, run_ws


def test_verbose_is_taken_anywhere_on_the_command_line(tmp_path):
    r = run_ws("verify", tmp_path / "nope", "--verbose")
    assert r.returncode == 2 and "No such option" not in r.stderr
    assert r.stderr.strip().endswith(f"Error: {tmp_path / 'nope'}: no such file or folder")


def test_os_errors_read_as_problems_not_raw(tmp_path):
    r = run_ws("create", "/proc/nope", "-o", tmp_path / "x.torrent")
    assert r.returncode == 2 and r.stderr.splitlines()[0] == "Error: /proc/nope: no such file or folder"
    r = run_ws("join", tmp_path / "x.pth", "--md5", "nothex")  # refused at once, before any part is read
    assert r.returncode == 2 and r.stderr.splitlines()[0] == "Error: --md5 nothex: not an md5 digest (32 hex digits)"


def test_catalog_name_json_is_one_object_and_create_refuses_to_overwrite(tiny_release, tmp_path):
    r = run_ws("catalog", "mixtral-8x7b", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["info_hash"] == "5546272da9065eddeb6fcd7ffddeef5b75be79a7"
    out = tmp_path / "t.torrent"
    assert run_ws("create", tiny_release, "-o", out).returncode == 0
    before = out.read_bytes()
    r = run_ws("create", tiny_release, "-o", out, "--format", "v1")
    assert r.returncode == 2 and r.stderr.splitlines() == [f"Error: {out}: already exists",
                                                           "Hint: give another name, or --force to replace it"]
    assert out.read_bytes() == before
    assert run_ws("create", tiny_release, "-o", out, "--format", "v1", "--force").returncode == 0
    assert out.read_bytes() != before


def test_rerunning_a_finished_convert_is_a_no_op(tiny_release, tmp_path):
    out = tmp_path / "experts"
    assert run_ws("convert", tiny_release, "-o", out).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    r = run_ws("convert", tiny_release, "-o", out)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    r = run_ws("convert", tiny_release, "-o", out, "--granularity", "layer-expert")  # another job: refused
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr


def test_verify_summary_counts_files_and_pieces_and_names_the_absent(converted, tiny_release, tiny_torrent,
                                                                     tmp_path):
    import shutil

    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    r = run_ws("verify", tiny_release, "--torrent", tiny_torrent)
    assert r.returncode == 0, r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("torrent pieces (SHA-1)"))
    assert f"4 of 4 files ok ({t.info.num_pieces()} pieces)" in line
    partial = tmp_path / "partial"
    shutil.copytree(converted, partial)
    (partial / "experts" / "expert-05.safetensors").unlink()
    r = run_ws("verify", partial, "--manifest", partial / "manifest.json", "--no-structure")
    assert r.returncode == 0, r.stdout
    assert "1 absent (experts/expert-05.safetensors)" in r.stdout
    other = tmp_path / "other"  # a torrent that is not this folder's
    shutil.copytree(converted, other)
    r = run_ws("verify", other, "--torrent", tiny_torrent, "--no-structure", "--no-checksums")
    assert r.returncode == 1
    assert "Hint: most of the torrent's files are missing or of another size here" in r.stdout


def test_progress_line_is_one_line_of_80_columns_in_binary_units():
    from weightswarm.cli.console import progress_line

    busy = {"event": "progress", "done": 27_000_000, "wanted": 28_900_000, "download_rate": 4_194_304,
            "upload_rate": 12_345_678, "peers": 123, "pieces": 50, "pieces_total": 72}
    waiting = {"event": "progress", "done": 0, "wanted": 0, "peers": 0, "swarm": {
        "text": "2 trackers: 0 answered, 2 failing (Connection refused); DHT 0 nodes; 3 peers tried, 0 connected"}}
    for e in (busy, waiting):
        line = progress_line(e, 80)
        assert len(line) <= 80 and "\n" not in line, line
    assert "25.7 MiB/27.6 MiB" in progress_line(busy, 120) and " MB" not in progress_line(busy, 120)
    assert "waiting: 2 trackers" in progress_line(waiting, 80)
    assert "123 peers" in progress_line(busy, 120) and "1 peer " in progress_line(busy | {"peers": 1}, 120)


def test_help_is_complete_and_summaries_are_whole():
    r = run_ws("--help")
    summaries = [line for line in r.stdout.splitlines() if line.startswith("  ") and not line.strip().startswith("-")]
    assert len(summaries) >= 13 and not any(s.rstrip().endswith("...") for s in summaries), r.stdout
    r = run_ws("demo", "--help")
    for stage in ("convert", "serve", "smoke"):
        assert stage in r.stdout
    r = run_ws("synth", "--help")
    assert "[tiny|small|medium|1g|4g]" in r.stdout
    r = run_ws("seed", "--help")
    assert "--torrent PATH" in r.stdout and "The torrent of PATH" in r.stdout


def test_demo_interrupted_exits_130_and_times_out_plainly(tmp_path):
    p = subprocess.Popen(WS + ["demo", "--workdir", str(tmp_path / "d"), "--preset", "tiny", "--leechers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:  # interrupt it while its daemon runs
            if line.startswith("== fetch"):
                p.send_signal(signal.SIGINT)
                break
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, out + err
    assert "interrupted (Ctrl-C)" in out and "demo: FAIL" in out
    r = run_ws("demo", "--workdir", tmp_path / "t", "--preset", "tiny", "--timeout", "3", timeout=180)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "did not finish within --timeout 3 s" in r.stdout and "TimeoutExpired" not in r.stdout + r.stderr
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == []


def test_generated_text_keeps_every_byte(tmp_path):
    """Byte pieces that are not (yet) valid UTF-8 show escaped, not as U+FFFD."""
    from weightswarm.convert.synth import train_tokenizer
    from weightswarm.runner.tokenizer import Tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(train_tokenizer())
    tok = Tokenizer(path)
    e2, x82 = tok.sp.piece_to_id("<0xE2>"), tok.sp.piece_to_id("<0x82>")
    text = tok.decode([e2, x82, *tok.sp.encode(" re")])
    assert "\ufffd" not in text and text.startswith("\\xe2\\x82")
    assert tok.decode(tok.sp.encode("caf\u00e9 \u20ac")) == "caf\u00e9 \u20ac"


def test_fetch_draws_one_line_at_80_columns_on_a_terminal(nodes, tiny_release, tiny_torrent, tmp_path):
    """Under a real pseudo-terminal of 80 columns every frame of the progress line fits it."""
    import pty

    from tests.support import LOOPBACK, seeder

    seed = seeder(nodes, tiny_release, tiny_torrent, "--max-upload-rate", "400k")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the fetch, on the terminal
        os.environ.update(COLUMNS="80", LINES="24")
        os.execv(WS[0], WS + ["fetch", str(tiny_torrent), "-o", str(tmp_path / "out"), "--peer",
                              f"127.0.0.1:{seed.port}", *LOOPBACK, "--timeout", "30"])
    out = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    frames = [f.split(b"\x1b[2K")[-1] for f in out.split(b"\r") if f.strip()]
    drawn = [f.decode() for f in frames if f.startswith(b"progress")]
    assert drawn, out
    assert all(len(f.rstrip("\n")) <= 80 for f in drawn), max(drawn, key=len)


def test_daemon_list_keeps_its_columns_and_its_plurals():
    from weightswarm.cli.daemon import list_line

    def line(state, peers, bad):
        return list_line({"id": "ab" * 20, "state": state, "progress": 0.5, "peers": peers, "uploaded": 3 << 20,
                          "ratio": 0.25, "last_scrub": {"ok": not bad, "bad_pieces": [7] * bad}, "name": "m"})

    short, long = line("seeding", 1, 1), line("checking_resume_data", 12, 2)
    assert short.index("50.0%") == long.index("50.0%") and short.index("up ") == long.index("up ")
    assert "1 peer " in short and "1 bad piece " in short and "12 peers" in long and "2 bad pieces" in long


def test_bad_input_to_a_torch_command_prints_one_error_line_and_no_warning(converted, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    with open(broken / "experts" / "expert-02.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"[garbage")
    r = run_ws("smoke", broken, "--max-new-tokens", "2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[0].startswith(f"Error: {broken / 'experts' / 'expert-02.safetensors'}: ")
    assert "Warning" not in r.stderr and len(r.stderr.splitlines()) <= 2
