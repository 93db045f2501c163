"""The pure parsers: byte sizes, durations, addresses, expert lists, merkle roots, path checks."""
from __future__ import annotations

import hashlib
import os

import pytest

from weightswarm.core.errors import Forbidden, InputError, OptionError
from weightswarm.core.paths import check_components, confined, inside
from weightswarm.core.units import (
    MAX_LIMIT,
    duration_text,
    human,
    parse_bytes,
    parse_duration,
    parse_limit,
    plural,
    size_text,
)
from weightswarm.distrib.session import parse_endpoint
from weightswarm.formats.perexpert import check_experts, expert_of_file, output_file, parse_experts
from weightswarm.verify.pieces import merkle_root, pow2


@pytest.mark.parametrize("text, n", [("4096", 4096), ("16k", 16384), ("8m", 8 << 20), ("1g", 1 << 30),
                                     ("2GiB", 2 << 30), ("1.5m", 3 << 19), (" 64MiB ", 64 << 20), ("0", 0),
                                     ("1t", 1 << 40), ("16KB", 16384)])
def test_byte_sizes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "k", "-1", "1x", "nan", "inf", "1e400", "0.3k", "1,5m"])
def test_bad_byte_sizes_name_the_option(text):
    with pytest.raises(OptionError) as e:
        parse_bytes(text, "--piece-size")
    assert e.value.option == "--piece-size" and e.value.path == ""


def test_limits_fit_libtorrent():
    assert parse_limit("--max-upload-rate", str(MAX_LIMIT)) == MAX_LIMIT
    assert parse_limit("--max-upload-rate", "10m") == 10 << 20
    with pytest.raises(OptionError, match="out of range"):
        parse_limit("--max-upload-rate", "4g")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30s", 30), ("10m", 600), ("2h", 7200), ("7d", 604800),
                                           ("0", 0), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["7x", "", "-1", "inf", "nan", "m"])
def test_bad_durations(text):
    with pytest.raises(OptionError, match="duration"):
        parse_duration(text, "--scrub-interval")


def test_shown_units_are_binary_and_round_trip():
    assert human(27_600_000) == "26.3 MiB" and human(512) == "512 B" and human(3 << 30) == "3.0 GiB"
    for n in (64 << 20, 2 << 30, 16 << 10):
        assert parse_bytes(size_text(n)) == n
    assert size_text(67108864) == "64MiB" and size_text(1000) == "1000"
    assert duration_text(604800) == "7d" and duration_text(300) == "5m" and duration_text(0) == "0"
    assert duration_text(90) == "90s" and parse_duration(duration_text(5400)) == 5400
    assert plural(1, "peer") == "1 peer" and plural(2, "peer") == "2 peers" and plural(0, "bad piece") == "0 bad pieces"


@pytest.mark.parametrize("text, want", [("127.0.0.1:6881", ("127.0.0.1", 6881)), ("[::1]:0", ("::1", 0)),
                                        ("host.example:65535", ("host.example", 65535))])
def test_endpoints(text, want):
    assert parse_endpoint(text) == want


@pytest.mark.parametrize("text", ["nowhere", ":80", "h:", "h:65536", "h:-1", "h:8a"])
def test_bad_endpoints(text):
    with pytest.raises(OptionError, match="HOST:PORT"):
        parse_endpoint(text, "--peer")


def test_expert_lists():
    assert parse_experts("0,3") == (0, 3) and parse_experts("3, 0") == (0, 3)
    assert parse_experts("0-3,6") == (0, 1, 2, 3, 6)
    for bad in ("", "x", "0,,1", "1,1", "0-2,1", "3-1", "-1", "12345", "0-99999"):
        with pytest.raises(OptionError):
            parse_experts(bad)
    check_experts((0, 7), list(range(8)))
    with pytest.raises(OptionError, match="no expert 8 here: the valid experts are 0-7"):
        check_experts((8,), list(range(8)))
    with pytest.raises(OptionError, match="valid experts are 1,3"):
        check_experts((0,), [1, 3])


def test_per_expert_names():
    assert output_file("layers.3.feed_forward.experts.5.w1.weight") == "experts/expert-05.safetensors"
    assert output_file("layers.3.feed_forward.experts.5.w1.weight", "layer-expert") == \
        "experts/layer-03/expert-05.safetensors"
    assert output_file("layers.3.feed_forward.gate.weight") == "dense.safetensors"
    assert expert_of_file("experts/layer-03/expert-05.safetensors") == 5
    assert expert_of_file("experts/expert-12.safetensors") == 12 and expert_of_file("dense.safetensors") is None


def test_merkle_roots_follow_bep_52():
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    pair = lambda a, b: hashlib.sha256(a + b).digest()  # noqa: E731
    zero = bytes(32)
    assert merkle_root(leaves, 4) == pair(pair(leaves[0], leaves[1]), pair(leaves[2], zero))
    assert merkle_root(leaves[:1], 1) == leaves[0]
    pad = merkle_root([], 2)  # the root of a piece of empty blocks pads a layer of pieces
    assert merkle_root([leaves[0]], 2, pad) == pair(leaves[0], pad)
    assert [pow2(n) for n in (0, 1, 2, 3, 5, 1024, 1025)] == [1, 1, 2, 4, 8, 1024, 2048]


def test_path_checks(tmp_path):
    for bad in (["..", "x"], ["a", "."], [""], ["a/b"], ["a\\b"], ["C:"], ["a\0"]):
        with pytest.raises(InputError, match="unsafe file path|empty file path"):
            check_components(bad, "t.torrent")
    (tmp_path / "root" / "in").mkdir(parents=True)
    os.symlink(tmp_path, tmp_path / "root" / "out")
    assert confined(tmp_path / "root", "in/x", "src") == tmp_path / "root" / "in" / "x"
    for bad in ("/etc/passwd", "../x", "out/x", "in/../../x"):
        with pytest.raises(InputError):
            confined(tmp_path / "root", bad, "src")
    root = tmp_path / "root"
    assert inside(root, "in") == "in" and inside(root, str(root / "in")) == "in" and inside(root, "") == ""
    for bad in ("..", "/etc", "out", "in/../..", str(tmp_path)):
        with pytest.raises(Forbidden):
            inside(root, bad)
