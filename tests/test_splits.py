import hashlib
import io
import zipfile

import pytest

from weightswarm.core.errors import FormatError, InputError, VerificationError
from weightswarm.formats.splitfile import SplitReader, open_logical, split_parts
from weightswarm.verify.join import join


def write_parts(folder, base, chunks):
    for i, c in enumerate(chunks):
        (folder / f"{base}-split{i}").write_bytes(c)
    return [folder / f"{base}-split{i}" for i in range(len(chunks))]


def test_parts_are_in_numeric_order(tmp_path):
    chunks = [bytes([i]) * (i + 1) for i in range(12)]
    parts = write_parts(tmp_path, "consolidated.00.pth", chunks)
    write_parts(tmp_path, "x.bin", [b"a", b"b"])
    assert split_parts(tmp_path / "consolidated.00.pth") == parts  # split10 after split9, not after split1
    assert [p.name[-7:] for p in parts][9:] == ["-split9", "split10", "split11"]
    assert split_parts(tmp_path / "nothing.pth") == []


def test_gap_names_the_missing_part_and_spares_other_groups(tmp_path):
    write_parts(tmp_path, "m.pth", [b"a", b"b", b"c", b"d"])
    (tmp_path / "m.pth-split2").unlink()
    good = write_parts(tmp_path, "consolidated.00.pth", [b"x", b"y"])
    with pytest.raises(FormatError) as e:
        split_parts(tmp_path / "m.pth")
    assert e.value.problem == "missing split part m.pth-split2"
    assert e.value.path == str(tmp_path / "m.pth")
    assert split_parts(tmp_path / "consolidated.00.pth") == good


def test_missing_first_part(tmp_path):
    (tmp_path / "m.pth-split1").write_bytes(b"x")
    with pytest.raises(FormatError, match="missing split part m.pth-split0"):
        split_parts(tmp_path / "m.pth")


def test_duplicate_number_is_refused(tmp_path):
    write_parts(tmp_path, "m.pth", [b"a", b"b"])
    (tmp_path / "m.pth-split01").write_bytes(b"c")
    with pytest.raises(FormatError, match="split part number 1 also used by m.pth-split01"):
        split_parts(tmp_path / "m.pth")


SIZES = [5, 0, 7, 3]


@pytest.fixture
def reader_parts(tmp_path):
    data = bytes(range(sum(SIZES)))
    chunks, pos = [], 0
    for n in SIZES:
        chunks.append(data[pos:pos + n])
        pos += n
    return data, write_parts(tmp_path, "f", chunks)


def test_reader_reads_everything(reader_parts):
    data, parts = reader_parts
    with SplitReader(parts) as r:
        assert r.readable() and r.seekable() and r.size == len(data)
        assert r.readall() == data
        assert r.read(10) == b""


def test_raw_reads_stop_at_part_boundaries(reader_parts):
    data, parts = reader_parts
    with SplitReader(parts) as r:
        assert r.read(100) == data[:5]  # one part per raw read
        assert r.tell() == 5
        assert r.read(100) == data[5:12]  # the empty part is skipped
        assert r.read(100) == data[12:15]
        assert r.read(100) == b""


@pytest.mark.parametrize("pos", [0, 4, 5, 6, 11, 12, 13, 14, 15])
def test_seek_and_read_across_boundaries(reader_parts, pos):
    data, parts = reader_parts
    with io.BufferedReader(SplitReader(parts), buffer_size=4) as f:
        assert f.seek(pos) == pos
        assert f.read(6) == data[pos:pos + 6]
        assert f.tell() == min(pos + 6, len(data))


def test_seek_whence(reader_parts):
    data, parts = reader_parts
    with SplitReader(parts) as r:
        assert r.seek(-3, io.SEEK_END) == 12
        assert r.read(3) == data[12:]
        assert r.seek(-10, io.SEEK_CUR) == 5
        assert r.read(1) == data[5:6]
        assert r.seek(100) == 100 and r.read(1) == b""
        with pytest.raises(OSError):
            r.seek(-1)


def test_zipfile_over_parts(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", b"hello" * 1000)
        z.writestr("b.txt", b"world")
    raw = buf.getvalue()
    parts = write_parts(tmp_path, "z.zip", [raw[:100], raw[100:3000], raw[3000:]])
    with open_logical(tmp_path, "z.zip") as f, zipfile.ZipFile(f) as z:
        assert z.testzip() is None
        assert z.read("a.txt") == b"hello" * 1000
    assert len(parts) == 3


def test_open_logical_prefers_real_file(tmp_path):
    (tmp_path / "f").write_bytes(b"real")
    write_parts(tmp_path, "f", [b"sp", b"lit"])
    with open_logical(tmp_path, "f") as f:
        assert f.read() == b"real"
    (tmp_path / "f").unlink()
    with open_logical(tmp_path, "f") as f:
        assert f.read() == b"split"
    with pytest.raises(InputError, match="no such file"):
        open_logical(tmp_path, "nothing")


def test_join_with_right_md5(tmp_path):
    parts = write_parts(tmp_path, "m.pth", [b"abc", b"", b"defg"])
    dest = tmp_path / "out" / "m.pth"
    dest.parent.mkdir()
    digest = hashlib.md5(b"abcdefg").hexdigest()
    assert join(parts, dest, ("md5", digest.upper())) == digest
    assert dest.read_bytes() == b"abcdefg"
    assert [p.name for p in dest.parent.iterdir()] == ["m.pth"]  # no temp file left


def test_join_with_wrong_md5_leaves_nothing(tmp_path):
    parts = write_parts(tmp_path, "m.pth", [b"abc", b"defg"])
    dest = tmp_path / "out" / "m.pth"
    dest.parent.mkdir()
    wrong = "0" * 32
    with pytest.raises(VerificationError) as e:
        join(parts, dest, ("md5", wrong))
    assert e.value.path == str(dest)
    assert e.value.problem == f"md5 mismatch: expected {wrong}, got {hashlib.md5(b'abcdefg').hexdigest()}"
    assert list(dest.parent.iterdir()) == []


def test_join_without_expected_and_no_overwrite(tmp_path):
    parts = write_parts(tmp_path, "m.pth", [b"abc", b"defg"])
    dest = tmp_path / "m.pth"
    assert join(parts, dest) is None
    assert dest.read_bytes() == b"abcdefg"
    with pytest.raises(InputError, match="already exists; refusing to overwrite"):
        join(parts, dest, ("md5", hashlib.md5(b"abcdefg").hexdigest()))
    assert dest.read_bytes() == b"abcdefg"


def test_join_unknown_algorithm(tmp_path):
    parts = write_parts(tmp_path, "m.pth", [b"abc"])
    with pytest.raises(InputError, match="unsupported hash algorithm 'crc'"):
        join(parts, tmp_path / "m.pth", ("crc", "00"))
    assert not (tmp_path / "m.pth").exists()
