import hashlib
import os

import blake3
import pytest

from weightswarm.core.errors import FormatError, InputError
from weightswarm.verify.checksums import algo_from_filename, parse_checksums, verify_checksums
from weightswarm.verify.report import Finding

A, B = b"weights" * 1000, b"tokenizer"


@pytest.fixture
def root(tmp_path):
    (tmp_path / "consolidated.00.pth").write_bytes(A)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.model").write_bytes(B)
    return tmp_path


def md5(b):
    return hashlib.md5(b).hexdigest()


def ok(name, detail):
    return Finding("checksum", name, True, detail)


def test_gnu_md5sum_release_file(root):
    (root / "RELEASE").write_text(f"# md5 of the release\n\n{md5(A)}  consolidated.00.pth\n{md5(B)}  sub/tokenizer.model\n")
    assert verify_checksums(root, "RELEASE") == [ok("consolidated.00.pth", "md5 ok"), ok("sub/tokenizer.model", "md5 ok")]


def test_binary_marker_dot_slash_and_crlf(root):
    (root / "sums").write_bytes(f"{hashlib.sha1(A).hexdigest()} *./consolidated.00.pth\r\n".encode())
    assert verify_checksums(root, root / "sums") == [ok("consolidated.00.pth", "sha1 ok")]


def test_bsd_tags(root):
    (root / "CHECKSUMS").write_text(f"SHA256 (consolidated.00.pth) = {hashlib.sha256(A).hexdigest()}\n"
                                   f"MD5 (sub/tokenizer.model) = {md5(B).upper()}\n")
    assert verify_checksums(root, "CHECKSUMS") == [ok("consolidated.00.pth", "sha256 ok"),
                                                   ok("sub/tokenizer.model", "md5 ok")]


def test_b3sum_by_file_name(root):
    (root / "B3SUMS").write_text(f"{blake3.blake3(A).hexdigest()}  consolidated.00.pth\n")
    assert verify_checksums(root, "B3SUMS") == [ok("consolidated.00.pth", "blake3 ok")]
    # the same 64-digit line in a file with no hint is read as sha256, and fails
    (root / "SUMS").write_text(f"{blake3.blake3(A).hexdigest()}  consolidated.00.pth\n")
    [f] = verify_checksums(root, "SUMS")
    assert not f.ok and f.detail.startswith("sha256 mismatch")
    assert verify_checksums(root, "SUMS", algo="blake3") == [ok("consolidated.00.pth", "blake3 ok")]


def test_empty_file_blake3(root):
    (root / "empty").write_bytes(b"")
    (root / "x.b3").write_text(f"{blake3.blake3(b'').hexdigest()}  empty\n")
    assert verify_checksums(root, "x.b3") == [ok("empty", "blake3 ok")]


@pytest.mark.parametrize("name,algo", [("B3SUMS", "blake3"), ("checksums.blake3", "blake3"), ("SHA256SUMS", "sha256"),
                                       ("sha1sums.txt", "sha1"), ("release.md5", "md5"), ("sha512sum", "sha512"),
                                       ("RELEASE", None)])
def test_algo_from_filename(name, algo):
    assert algo_from_filename(name) == algo


def test_escaped_names(root):
    (root / "a\\b").write_bytes(A)
    (root / "new\nline").write_bytes(B)
    (root / "sums").write_text(f"\\{md5(A)}  a\\\\b\n\\{md5(B)}  new\\nline\n\\MD5 (new\\nline) = {md5(B)}\n")
    assert verify_checksums(root, "sums") == [ok("a\\b", "md5 ok"), ok("new\nline", "md5 ok"), ok("new\nline", "md5 ok")]


def test_mismatch_and_missing(root):
    wrong = "0" * 32
    (root / "RELEASE").write_text(f"{wrong}  consolidated.00.pth\n{md5(B)}  tokenizer.model\n{md5(B)}  sub\n")
    assert verify_checksums(root, "RELEASE") == [
        Finding("checksum", "consolidated.00.pth", False, f"md5 mismatch: expected {wrong}, got {md5(A)}"),
        Finding("checksum", "tokenizer.model", False, "missing"),
        Finding("checksum", "sub", False, "not a regular file"),
    ]


def test_split_parts_are_hashed_as_one(root):
    (root / "consolidated.00.pth").unlink()
    for i, chunk in enumerate([A[:1000], A[1000:5000], A[5000:]]):
        (root / f"consolidated.00.pth-split{i}").write_bytes(chunk)
    (root / "RELEASE").write_text(f"{md5(A)}  consolidated.00.pth\n")
    assert verify_checksums(root, "RELEASE") == [ok("consolidated.00.pth", "md5 ok (3 split parts)")]
    (root / "RELEASE").write_text(f"{md5(B)}  consolidated.00.pth\n")
    [f] = verify_checksums(root, "RELEASE")
    assert f.detail == f"md5 mismatch: expected {md5(B)}, got {md5(A)} (3 split parts)"
    (root / "consolidated.00.pth-split1").unlink()
    assert verify_checksums(root, "RELEASE") == [
        Finding("checksum", "consolidated.00.pth", False, "missing split part consolidated.00.pth-split1")]


def test_many_files_in_order_over_threads(tmp_path):
    lines = []
    for i in range(20):
        data = os.urandom(i * 50_000)
        (tmp_path / f"f{i}").write_bytes(data)
        lines.append(f"{md5(data) if i != 7 else md5(b'x')}  f{i}")
    (tmp_path / "sums.md5").write_text("\n".join(lines))
    findings = verify_checksums(tmp_path, "sums.md5", workers=2)
    assert [f.path for f in findings] == [f"f{i}" for i in range(20)]
    assert [f.ok for f in findings] == [i != 7 for i in range(20)]


@pytest.mark.parametrize("name,problem", [
    ("../x", "unsafe name '../x': '..' component"),
    ("a/../../x", "unsafe name 'a/../../x': '..' component"),
    ("/etc/passwd", "unsafe name '/etc/passwd': absolute path"),
    ("C:/x", "unsafe name 'C:/x': absolute path"),
])
def test_escape_attempts_are_refused(root, name, problem):
    (root / "RELEASE").write_text(f"{md5(A)}  consolidated.00.pth\n{md5(B)}  {name}\n")
    with pytest.raises(InputError) as e:
        verify_checksums(root, "RELEASE")
    assert e.value.problem == f"line 2: {problem}"
    assert e.value.path == str(root / "RELEASE")


def test_symlink_out_of_the_folder_is_refused(tmp_path, root):
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (outside / "secret").write_bytes(B)
    (root / "link").symlink_to(outside / "secret")
    (root / "RELEASE").write_text(f"{md5(B)}  link\n")
    with pytest.raises(InputError, match="resolves outside the verified folder"):
        verify_checksums(root, "RELEASE")


@pytest.mark.parametrize("text,problem", [
    ("hello world\n", "line 1: not a checksum line: 'hello world'"),
    (f"{md5(A)}  a\n{md5(A)[:30]}  b\n", "line 2: cannot tell the algorithm of a 30-digit digest"),
    (f"CRC32 (a) = {md5(A)}\n", "line 1: unsupported algorithm tag 'CRC32'"),
    (f"MD5 (a) = {md5(A)[:31]}\n", "line 1: md5 digests have 32 hex digits, got 31"),
    (f"\\{md5(A)}  a\\tb\n", "line 1: bad escape in name 'a\\\\tb'"),
    (f"{md5(A)}\n", f"line 1: not a checksum line: '{md5(A)}'"),
])
def test_bad_lines_name_the_line(tmp_path, text, problem):
    (tmp_path / "RELEASE").write_text(text)
    with pytest.raises(FormatError) as e:
        parse_checksums(tmp_path / "RELEASE")
    assert e.value.problem == problem
    assert e.value.path == str(tmp_path / "RELEASE")


def test_explicit_algo(tmp_path):
    (tmp_path / "sums").write_text(f"{md5(A)}  a\n")
    with pytest.raises(FormatError, match="line 1: sha1 digests have 40 hex digits, got 32"):
        parse_checksums(tmp_path / "sums", algo="sha1")
    with pytest.raises(InputError, match="unsupported hash algorithm 'crc32'"):
        parse_checksums(tmp_path / "sums", algo="crc32")
    (tmp_path / "tagged").write_text(f"MD5 (a) = {md5(A)}\n")
    with pytest.raises(FormatError, match="line 1: tagged MD5 but sha256 was requested"):
        parse_checksums(tmp_path / "tagged", algo="sha256")


def test_digest_length_picks_the_algorithm(tmp_path):
    text = "".join(f"{'a' * n}  f{n}\n" for n in (32, 40, 64, 128))
    (tmp_path / "RELEASE").write_text(text)
    assert [e.algo for e in parse_checksums(tmp_path / "RELEASE")] == ["md5", "sha1", "sha256", "sha512"]


def test_missing_checksum_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        verify_checksums(tmp_path, "RELEASE")
