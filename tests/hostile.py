"""The hostile-input corpus of issue 10: what a hostile publisher, peer, file or client hands us, generated
from a fixed seed at test time, and commands run on it with their peak memory measured.

Every generator takes a ``random.Random`` and well-formed originals (the tiny release's torrents, checkpoint
and params) and returns ``(case name, bytes)`` pairs; nothing here knows what weightswarm should answer.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

SEED = 10  # the number: every run builds the same corpus
GiB = 1 << 30


# --- running commands, peak memory included ---------------------------------------------------------

@dataclass
class Run:
    argv: list[str]
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str


def run_measured(argv: list[str], timeout: float, cwd=None, env=None) -> Run:
    """Run argv to its end; a run past ``timeout`` is killed with its whole process group and reported as a
    hang. (Its peak RSS is measured inside, see _high_water_mb: wait4's would include the parent's.)"""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd,
                             env=env, start_new_session=True)
        reaped: list = []
        waiter = threading.Thread(target=lambda: reaped.append(os.waitpid(p.pid, 0)), daemon=True)
        waiter.start()
        waiter.join(timeout)
        if waiter.is_alive():
            os.killpg(p.pid, signal.SIGKILL)
            waiter.join()
        _, status = reaped[0]
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        run = Run([str(a) for a in argv], p.returncode, out.read().decode(errors="replace"),
                  err.read().decode(errors="replace"))
    if waiter.is_alive() or (p.returncode == -signal.SIGKILL and not run.stderr):
        raise AssertionError(f"hang: {run.argv} ran past {timeout} s; stderr: {run.stderr[-2000:]}")
    return run


def error_lines_problems(stderr: str) -> list[str]:
    """What is wrong with a command's stderr by the rules of bad input: only ``Error: <what>: <problem>`` and
    ``Hint:`` lines, a problem that says something, a path (not "I/O") as its subject, no traceback."""
    problems = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr:
        problems.append("a traceback")
    if "internal error" in stderr:
        problems.append("an internal error")
    for line in lines:
        if not line.startswith(("Error: ", "Hint: ")):
            problems.append(f"a line that is neither Error: nor Hint: {line[:200]!r}")
        elif line.startswith("Error: ") and (line.rstrip().endswith(":") or ": " not in line[7:]):
            problems.append(f"an Error line without a problem: {line[:200]!r}")
        elif line.startswith("Error: I/O:"):
            problems.append(f"an Error line that names no file: {line[:200]!r}")
    if sum(line.startswith("Error: ") for line in lines) > 1:
        problems.append("more than one Error line")
    return problems


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time: equal snapshots, nothing was written."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


# --- torrents ------------------------------------------------------------------------------------------

def flips(rng: random.Random, data: bytes, n: int, label: str) -> list[tuple[str, bytes]]:
    """n copies of data, each with 1 to 8 random bits flipped."""
    out = []
    for i in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        out.append((f"{label}-flip{i}", bytes(b)))
    return out


def truncations(rng: random.Random, data: bytes, n: int, label: str) -> list[tuple[str, bytes]]:
    return [(f"{label}-cut{i}", data[:rng.randrange(len(data))]) for i in range(n)]


def _first_file(tree: dict) -> dict:
    """The ``b""`` entry of the first file in a v2 file tree."""
    node = tree
    while b"" not in node:
        node = next(iter(node.values()))
    return node[b""]


def _biggest_file(info: dict) -> dict:
    return max(info[b"files"], key=lambda f: f[b"length"])


_NAMES = [b"..", b".", b"", b"/", b"a/b", b"..\\x", b"x\x00y", b"C:", b"/etc/passwd", b"x" * 5000, b"\xff\xfe",
          b".hidden", 5, [b"x"], {b"x": b"y"}]
_INTS = [-1, 0, 1, 3, 16383, 2**31, 2**40, 2**62, 2**63, 2**64 + 5, b"16384", [16384], {}]


def torrent_field_cases(label: str, data: bytes) -> list[tuple[str, bytes]]:
    """Bencode field swaps: lengths, piece length, pieces, file tree, piece layers, names and paths, keys."""
    top = lt.bdecode(data)
    info = top[b"info"]
    cases: list[tuple[str, dict]] = []

    def with_info(name: str, change) -> None:
        i = _copy(info)
        change(i)
        cases.append((name, {**_copy(top), b"info": i}))

    def with_top(name: str, change) -> None:
        t = _copy(top)
        change(t)
        cases.append((name, t))

    for n, v in enumerate(_INTS):
        with_info(f"piece-length{n}", lambda i, v=v: i.__setitem__(b"piece length", v))
        if b"files" in info:
            with_info(f"v1-length{n}", lambda i, v=v: _biggest_file(i).__setitem__(b"length", v))
        if b"file tree" in info:
            with_info(f"v2-length{n}", lambda i, v=v: _first_file(i[b"file tree"]).__setitem__(b"length", v))
    for n, v in enumerate(_NAMES):
        with_info(f"name{n}", lambda i, v=v: i.__setitem__(b"name", v))
        with_info(f"name-utf8-{n}", lambda i, v=v: i.__setitem__(b"name.utf-8", v))
        if b"files" in info:
            with_info(f"v1-path{n}", lambda i, v=v: i[b"files"][0].__setitem__(b"path", [v]))
            with_info(f"v1-path-utf8-{n}", lambda i, v=v: i[b"files"][0].__setitem__(b"path.utf-8", [b"ok", v]))
        if b"file tree" in info and isinstance(v, bytes):
            with_info(f"v2-name{n}", lambda i, v=v: i.__setitem__(b"file tree", {v: next(iter(i[b"file tree"].values())),
                                                                              **i[b"file tree"]}))
    if b"pieces" in info:
        p = info[b"pieces"]
        for n, v in enumerate([b"", p[:-1], p + b"x", p[:20], p * 3, 0, bytes(20) * 100_000, [p]]):
            with_info(f"pieces{n}", lambda i, v=v: i.__setitem__(b"pieces", v))
    if b"files" in info:
        for n, v in enumerate([5, [], [5], [{}], [{b"length": 5}], [{b"path": [b"x"]}],
                               [{b"length": 1, b"path": []}] * 3, [{b"length": 0, b"path": [b"f%d" % k]}
                                                                   for k in range(20_000)],
                               [{b"length": 1, b"path": [b"x"], b"attr": b"l", b"symlink path": [b"..", b"etc"]}],
                               [{b"length": 1, b"path": [b"x"], b"attr": b"p"}]]):
            with_info(f"files{n}", lambda i, v=v: i.__setitem__(b"files", v))
    if b"file tree" in info:
        deep: dict = {b"": {b"length": 1, b"pieces root": bytes(32)}}
        for _ in range(150):
            deep = {b"d": deep}
        f = _first_file(info[b"file tree"])
        for n, v in enumerate([5, [], {}, {b"": {b"length": 5}}, deep, {b"x": 5}, {b"x": {b"": 5}},
                               {b"x": {b"": {b"length": 1, b"pieces root": bytes(31)}}},
                               {b"x": {b"": {b"length": 2**62, b"pieces root": f.get(b"pieces root", bytes(32))}}},
                               {b"x": {b"": {b"length": 1, b"attr": b"l", b"symlink path": [b".."]}}},
                               {b"f%d" % k: {b"": {b"length": 0}} for k in range(20_000)}]):
            with_info(f"file-tree{n}", lambda i, v=v: i.__setitem__(b"file tree", v))
        for n, v in enumerate([3, b"2", -1, 1]):
            with_info(f"meta-version{n}", lambda i, v=v: i.__setitem__(b"meta version", v))
        layers = top.get(b"piece layers", {})
        root, layer = next(iter(layers.items())) if layers else (bytes(32), bytes(32))
        lying = bytes(b ^ 0x55 for b in layer)
        for n, v in enumerate([5, [], b"x", {}, {root: b""}, {root: layer[:-32]}, {root: layer + bytes(32)},
                               {root[:16]: layer}, {root: 5}, {root: lying}, {**layers, bytes(32): layer},
                               {root: layer * 1000}]):
            with_top(f"piece-layers{n}", lambda t, v=v: t.__setitem__(b"piece layers", v))
    for n, v in enumerate([[], 5, b"x", {}]):
        with_top(f"info{n}", lambda t, v=v: t.__setitem__(b"info", v))
    with_top("no-info", lambda t: t.pop(b"info"))
    for n, v in enumerate([b"file:///etc/passwd", b"http://127.0.0.1:1/announce", 5, [[b"udp://127.0.0.1:1"]],
                           b"javascript:alert(1)", b"x" * 100_000]):
        with_top(f"announce{n}", lambda t, v=v: t.__setitem__(b"announce", v))
        with_top(f"url-list{n}", lambda t, v=v: t.__setitem__(b"url-list", v))
    for n, v in enumerate([[[b"127.0.0.1", 1]], [[b"::1", 70000]], 5, [b"x"]]):
        with_top(f"nodes{n}", lambda t, v=v: t.__setitem__(b"nodes", v))
    return [(f"{label}-{name}", bencode(t)) for name, t in cases]


def bencode(v) -> bytes:
    """Bencoding of any int (libtorrent's stops at 64 bits, and a lie need not)."""
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, (bytes, str)):
        b = v.encode() if isinstance(v, str) else v
        return b"%d:" % len(b) + b
    if isinstance(v, list):
        return b"l" + b"".join(bencode(x) for x in v) + b"e"
    return b"d" + b"".join(bencode(k) + bencode(x) for k, x in sorted(v.items())) + b"e"


def _copy(v):
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def torrent_cases(rng: random.Random, originals: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Bit flips, truncations and field swaps of each original torrent, plus garbage."""
    cases = [("empty", b""), ("garbage", rng.randbytes(4096)), ("deep-list", b"l" * 100_000),
             ("huge-int", b"d4:infoi" + b"9" * 100_000 + b"ee"), ("huge-string", b"d4:info99999999999:xe")]
    for label, data in originals.items():
        cases += flips(rng, data, 12, label) + truncations(rng, data, 6, label) + torrent_field_cases(label, data)
    return cases


def magnet_cases(v1: str, v2: str) -> list[tuple[str, str]]:
    """Magnet URIs that lie, overflow or point elsewhere (tracker and peer addresses all closed loopback ports)."""
    b32 = "A" * 32
    xs = [f"xt=urn:btih:{v1}", f"xt=urn:btmh:1220{v2}"]
    bodies = [
        "", "xt=", "xt=urn:btih:", "xt=urn:btih:" + "0" * 40, "xt=urn:btmh:1220" + "0" * 64, "xt=urn:btih:" + "g" * 40,
        "xt=urn:btih:" + v1[:39], "xt=urn:btih:" + v1 + "00", "xt=urn:btih:" + b32, "xt=urn:btih:" + "=" * 32,
        "xt=urn:btmh:" + v2, "xt=urn:btmh:1120" + v2, "xt=urn:btmh:12" + v2, "xt=urn:btmh:1220" + v2[:-2],
        "xt=urn:sha1:" + v1, "xt=urn:ed2k:" + v1, f"{xs[0]}&{xs[0]}", f"{xs[0]}&xt=urn:btih:{'1' * 40}",
        f"{xs[0]}&{xs[1]}", f"{xs[0]}&dn=../../etc/passwd", f"{xs[0]}&dn=" + "x" * 100_000,
        f"{xs[0]}&dn=%00%ff", f"{xs[0]}&tr=file:///etc/passwd", f"{xs[0]}&tr=http://127.0.0.1:1/announce",
        f"{xs[0]}&tr=udp://127.0.0.1:1", f"{xs[0]}&tr=" + "%" * 1000, f"{xs[0]}&ws=javascript:alert(1)",
        f"{xs[0]}&ws=http://127.0.0.1:1/", f"{xs[0]}&x.pe=127.0.0.1:1", f"{xs[0]}&x.pe=[::1]:99999",
        f"{xs[0]}&x.pe=nothing", f"{xs[0]}&so=0-99999999999", f"{xs[0]}&so=-1", f"{xs[0]}&so=a,b",
        f"{xs[0]}&xl=-5", f"{xs[0]}&xl=99999999999999999999999", f"{xs[0]}&%%%", f"{xs[0]}&&&&",
        f"{xs[0]}&tr=" + "&tr=".join(f"udp://127.0.0.1:{p}" for p in range(1, 2000)), f"{xs[0]}#frag",
        xs[0].replace("btih", "BTIH"), xs[0] + "\n", xs[0] + "\x00", "\u2603" + xs[0], "xt=urn:btih:" + "ａ" * 40,
    ]
    return [(f"magnet{n}", "magnet:?" + body) for n, body in enumerate(bodies)] + [
        ("magnet-no-query", "magnet:"), ("magnet-no-qmark", "magnet:xt=urn:btih:" + v1),
        ("magnet-long", "magnet:?" + xs[0] + "&dn=" + "y" * 2_000_000)]


# --- torch.save zips -----------------------------------------------------------------------------------

@dataclass
class Member:
    name: str
    data: bytes
    declared: int | None = None  # the size both headers claim; None: the truth
    method: int = zipfile.ZIP_STORED
    flags: int = 0


def zip_bytes(members: list[Member], cd_size: int | None = None, cd_offset: int | None = None,
              entries: int | None = None, offsets: dict[str, int] | None = None) -> bytes:
    """A zip archive written by hand, so it can lie: declared sizes (zip64 past 4 GiB), end record fields,
    the offsets the central directory gives. Data starts 64-byte aligned, as torch.save aligns it."""
    out, central = bytearray(), bytearray()
    for m in members:
        payload = m.data
        if m.method == zipfile.ZIP_DEFLATED:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = c.compress(m.data) + c.flush()
        crc = zlib.crc32(m.data)
        csize = m.declared if m.declared is not None else len(payload)
        usize = m.declared if m.declared is not None else len(m.data)
        zip64 = max(csize, usize) >= 0xFFFFFFFF
        c32, u32 = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (csize, usize)
        extra = struct.pack("<HHQQ", 1, 16, usize, csize) if zip64 else b""
        name = m.name.encode()
        offset = len(out)
        pad = -(offset + 30 + len(name) + len(extra) + 4) % 64  # an unknown extra block, as torch pads
        local_extra = extra + struct.pack("<HH", 0xCAFE, pad) + bytes(pad)
        version = 45 if zip64 else 20
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", version, m.flags, m.method, 0, 0x21, crc, c32, u32,
                           len(name), len(local_extra)) + name + local_extra + payload
        at = (offsets or {}).get(m.name, offset)
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", version, version, m.flags, m.method, 0, 0x21, crc,
                               c32, u32, len(name), len(extra), 0, 0, 0, 0, at) + name + extra
    start = len(out)
    n = len(members) if entries is None else entries
    out += central + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n,
                                 len(central) if cd_size is None else cd_size,
                                 start if cd_offset is None else cd_offset, 0)
    return bytes(out)


def zip_members(pth: bytes) -> list[Member]:
    zf = zipfile.ZipFile(io.BytesIO(pth))
    return [Member(m.filename, zf.read(m)) for m in zf.infolist()]


def _replace(members: list[Member], name_suffix: str, **changes) -> list[Member]:
    return [Member(**{**m.__dict__, **changes}) if m.name.endswith(name_suffix) else m for m in members]


def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def big(n: int) -> bytes:
    """An int as pickle's LONG1 opcode, whatever its size."""
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _dag(levels: int) -> bytes:
    """A tuple of tuples nested ``levels`` deep through the memo: a few bytes per level, 2**levels leaves."""
    p = b"N" + b"r" + struct.pack("<I", 0)
    for i in range(levels):
        p += b"0j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i) + b"\x86r" + struct.pack("<I", i + 1)
    return p


GADGETS = [("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "exec"),
           ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"), ("subprocess", "run"),
           ("importlib", "import_module"), ("shutil", "rmtree"), ("pickle", "loads"), ("torch", "load"),
           ("torch.serialization", "load"), ("torch._utils", "_rebuild_from_type_v2"), ("numpy", "frombuffer"),
           ("collections", "namedtuple"), ("torch.nn", "Module"), ("__main__", "x"), ("os", "popen")]


def pickle_cases(marker: str, pkl: bytes) -> list[tuple[str, bytes]]:
    """data.pkl replacements: code-running gadgets (each would create ``marker``), bombs, and tensors that
    lie about their storage. ``pkl`` is the real data.pkl (its first tensor's storage is ``0``)."""
    touch = _u(f"touch {marker}")
    cases = []
    for module, name in GADGETS:
        call = _global(module, name) + touch + b"\x85R"
        cases.append((f"gadget-{module}.{name}", b"\x80\x02}" + _u("tok_embeddings.weight") + call + b"s."))
        # the same global named through STACK_GLOBAL (protocol 4) and through INST
        cases.append((f"gadget4-{module}.{name}", b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() +
                       b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93" + touch + b"\x85R."))
    cases.append(("gadget-inst", b"\x80\x02(" + touch + b"iposix\nsystem\n."))
    cases.append(("gadget-in-persid", b"\x80\x02" + _global("posix", "system") + touch + b"\x85RQ."))
    cases.append(("gadget-ordereddict-args", b"\x80\x02" + _global("collections", "OrderedDict") +
                  b"]" + _global("posix", "system") + touch + b"\x85Ra\x85R."))
    cases.append(("gadget-ext", b"\x80\x02\x82\x01."))
    storage = b"((" + _u("storage") + _global("torch", "FloatStorage") + _u("0") + _u("cpu") + b"K\x04tQ"
    rebuild = _global("torch._utils", "_rebuild_tensor_v2")

    def tensor(offset: bytes, shape: bytes, stride: bytes, storage: bytes = storage) -> bytes:
        return (b"\x80\x02}" + _u("tok_embeddings.weight") + rebuild + storage + offset + shape + stride
                + b"\x89" + _global("collections", "OrderedDict") + b")RtRs.")
    cases += [
        # storage "0" is 128000 bytes of BF16; as a FloatStorage of 4 elements it lies about its size
        ("tensor-storage-size-lie", tensor(b"K\x00", b"K\x04\x85", b"K\x01\x85")),
        ("tensor-offset-2**40", tensor(big(2**40), b"K\x04\x85", b"K\x01\x85")),
        ("tensor-huge-shape", tensor(b"K\x00", big(2**62) + big(2**62) + b"\x86", b"K\x01K\x01\x86")),
        ("tensor-negative-stride", tensor(b"K\x00", b"K\x04\x85", big(-1) + b"\x85")),
        ("tensor-int-past-int64", tensor(big(2**70), b"K\x04\x85", b"K\x01\x85")),
        ("tensor-huge-long", tensor(b"\x8b" + struct.pack("<i", 1_000_000) + b"\x01" * 1_000_000, b"K\x04\x85",
                                    b"K\x01\x85")),
        ("tensor-many-dims", tensor(b"K\x00", b"(" + b"K\x01" * 100_000 + b"t", b"(" + b"K\x01" * 100_000 + b"t")),
        ("storage-key-escape", pkl.replace(_u("0"), _u("../../../../etc/passwd"), 1)),
        ("storage-key-huge", pkl.replace(_u("0"), _u("k" * 1_000_000), 1)),
        ("storage-numel-huge", pkl.replace(b"M\x00\xfa", big(2**62), 1)),
        ("storage-not-a-storage", pkl.replace(_global("torch", "BFloat16Storage"), _global("torch", "bfloat16"), 1)),
        ("key-not-str", pkl.replace(_u("tok_embeddings.weight"), b"K\x07", 1)),
        ("key-huge-int", pkl.replace(_u("tok_embeddings.weight"), b"\x8b" + struct.pack("<i", 100_000) +
                                     b"\x7f" * 100_000, 1)),
        # bombs: memory or time out of a few bytes
        ("memo-index-2**32", b"\x80\x02Nr\xff\xff\xff\xff0j\xff\xff\xff\xff."),
        ("memo-get-missing", b"\x80\x02j\x00\x00\x00\x10."),
        ("nested-lists", b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."),
        ("marks", b"\x80\x02" + b"(" * 1_000_000 + b"."),
        ("long4-2**31", b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\x01" * 10 + b"."),
        ("long4-negative", b"\x80\x02\x8b\xff\xff\xff\xff."),
        ("binbytes8-huge", b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc."),
        ("binunicode8-huge", b"\x80\x04\x8d" + struct.pack("<Q", 2**63 - 1) + b"abc."),
        ("bytearray8-huge", b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"abc."),
        ("frame-huge", b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N."),
        ("long-text-digits", b"\x80\x02L" + b"9" * 100_000 + b"L\n."),
        ("string-escapes", b"\x80\x02S'" + b"\\x41" * 100_000 + b"'\n."),
        ("laughs-dict-key", b"\x80\x02}" + _dag(48) + b"K\x01s."),
        ("laughs-setitems", b"\x80\x02}(" + _dag(48) + b"K\x01u."),
        ("laughs-dict-opcode", b"\x80\x02(" + _dag(48) + b"K\x01d."),
        ("laughs-set", b"\x80\x04\x8f(" + _dag(48) + b"\x90."),
        ("laughs-frozenset", b"\x80\x04(" + _dag(48) + b"\x91."),
        ("laughs-persid", b"\x80\x02" + _dag(48) + b"Q."),
        ("laughs-ordereddict", b"\x80\x02" + _global("collections", "OrderedDict") + _dag(48) + b"\x85R."),
        ("laughs-value", b"\x80\x02}" + _u("tok_embeddings.weight") + _dag(48) + b"s."),
        ("self-reference", b"\x80\x02}q\x00" + _u("a") + b"h\x00s."),
        ("no-stop", pkl[:-1]),
        ("empty", b""),
        ("proto-99", b"\x80\x63N."),
        ("next-buffer", b"\x80\x05\x97."),
        ("text-persid", b"\x80\x02P../etc\n."),
        ("truncated-half", pkl[:len(pkl) // 2]),
    ]
    return cases


def pth_cases(rng: random.Random, pth: bytes, marker: str) -> list[tuple[str, bytes]]:
    """torch.save zips that lie about sizes, compress, overlap, or carry a hostile data.pkl."""
    members = zip_members(pth)
    pkl_name = next(m.name for m in members if m.name.endswith("/data.pkl"))
    prefix = pkl_name.removesuffix("data.pkl")
    pkl = next(m.data for m in members if m.name == pkl_name)
    whole = zip_bytes(members)
    size = len(whole)
    cases = [("rebuilt", whole)]  # the same checkpoint through zip_bytes: must pass, so the lies below are the lies
    for n, declared in enumerate([2**31, 2**33, 2**40, size, size + 1]):
        cases.append((f"declared-size{n}", zip_bytes(_replace(members, "/data/0", declared=declared))))
    cases += [
        ("declared-pkl-2**31", zip_bytes(_replace(members, "/data.pkl", declared=2**31))),
        ("cd-size-2**31", zip_bytes(members, cd_size=2**31)),
        ("cd-size-0", zip_bytes(members, cd_size=0)),
        ("cd-offset-past-end", zip_bytes(members, cd_offset=size * 2)),
        ("cd-offset-0", zip_bytes(members, cd_offset=0)),
        ("entries-65535", zip_bytes(members, entries=65535)),
        ("overlap", zip_bytes(members, offsets={f"{prefix}data/1": 0})),
        ("offset-past-end", zip_bytes(members, offsets={f"{prefix}data/1": size * 4})),
        ("duplicate-member", zip_bytes(members + [members[-1]])),
        ("deflated-tensor", zip_bytes(_replace(members, "/data/0", method=zipfile.ZIP_DEFLATED))),
        ("deflated-pkl", zip_bytes(_replace(members, "/data.pkl", method=zipfile.ZIP_DEFLATED))),
        ("encrypted-flag", zip_bytes(_replace(members, "/data/0", flags=1))),
        ("bzip2-method", zip_bytes(_replace(members, "/data/0", method=12))),
        ("no-pkl", zip_bytes([m for m in members if m.name != pkl_name])),
        ("two-pkls", zip_bytes(members + [Member("other/data.pkl", pkl)])),
        ("big-endian", zip_bytes(_replace(members, "/byteorder", data=b"big"))),
        ("byteorder-huge", zip_bytes(_replace(members, "/byteorder", data=b"x" * (17 << 20)))),
        ("pkl-16MiB-of-marks", zip_bytes(_replace(members, "/data.pkl", data=b"\x80\x02" + b"(" * (16 << 20) + b"."))),
        ("pkl-16MiB-of-dicts", zip_bytes(_replace(members, "/data.pkl", data=b"\x80\x02" + b"}" * (16 << 20) + b"."))),
        ("not-a-zip", rng.randbytes(4096)),
        ("empty", b""),
        ("eocd-only", struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0)),
    ]
    # the converter's own example of a bomb: 256 MiB of zeros deflated into about 256 KiB of data.pkl
    cases.append(("pkl-deflate-bomb", zip_bytes(_replace(members, "/data.pkl", data=bytes(256 << 20),
                                                         method=zipfile.ZIP_DEFLATED))))
    for name, data in pickle_cases(marker, pkl):
        changed = _replace(members, "/data.pkl", data=data)
        if name.startswith("tensor-") and name != "tensor-storage-size-lie":
            changed = _replace(changed, "/data/0", data=bytes(16))  # storage 0: 4 floats, as the pickle says
        cases.append((f"pkl-{name}", zip_bytes(changed)))
    cases += flips(rng, pth, 10, "pth") + truncations(rng, pth, 8, "pth")
    return cases


# --- safetensors ---------------------------------------------------------------------------------------

def st_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def safetensors_cases(rng: random.Random, good: bytes) -> list[tuple[str, bytes]]:
    """Header attacks on a well-formed safetensors file ``good``."""
    n = struct.unpack("<Q", good[:8])[0]
    header, data = json.loads(good[8:8 + n]), good[8 + n:]
    first = next(k for k in header if k != "__metadata__")
    e = header[first]
    begin, end = e["data_offsets"]

    def entry(**changes) -> bytes:
        return st_bytes({**header, first: {**e, **changes}}, data)

    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        ("len-past-end", st_bytes(header, data, length=len(good))), ("len-2**63", st_bytes(header, data, length=2**63)),
        ("len-over-100MB", st_bytes(header, data, length=100_000_001)), ("len-0", st_bytes(b"", data, 0)),
        ("len-7", good[:7]), ("len-odd", st_bytes(header, data, length=n - 1)),
        ("not-json", st_bytes(b"{" + rng.randbytes(200), data)), ("not-utf8", st_bytes(b'{"\xff":1}', data)),
        ("array", st_bytes(b"[1,2,3]", data)), ("deep", st_bytes(b'{"a":' + deep + b"}", data)),
        ("duplicate-key", st_bytes(json.dumps(header)[:-1].encode() + b"," + json.dumps({first: e})[1:].encode(), data)),
        ("huge-int", st_bytes(f'{{"{first}":{{"dtype":"F32","shape":[{"9" * 4000}],"data_offsets":[0,4]}}}}'
                              .encode(), data)),
        ("int-over-4300-digits", st_bytes(f'{{"a":{"9" * 5000}}}'.encode(), data)),
        ("entry-not-object", st_bytes({**header, first: 5}, data)),
        ("unknown-dtype", entry(dtype="F128")), ("dtype-int", entry(dtype=5)),
        ("shape-negative", entry(shape=[-1])), ("shape-float", entry(shape=[1.5])), ("shape-bool", entry(shape=[True])),
        ("shape-str", entry(shape="64")), ("shape-2**64", entry(shape=[2**64, 0])),
        ("shape-many-dims", entry(shape=[2**62] * 30_000)), ("shape-zero-many", entry(shape=[0] * 1_000_000)),
        ("offsets-reversed", entry(data_offsets=[end, begin])), ("offsets-negative", entry(data_offsets=[-4, end])),
        ("offsets-float", entry(data_offsets=[0.0, float(end)])), ("offsets-three", entry(data_offsets=[0, end, 9])),
        ("offsets-past-end", entry(data_offsets=[begin, len(data) + 8])),
        ("offsets-overlap", st_bytes({**header, "x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, data)),
        ("trailing", good + b"\0" * 16), ("gap", st_bytes(header, b"\0" * 8 + data)),
        ("metadata-not-strings", st_bytes({"__metadata__": {"a": 5}, **header}, data)),
        ("metadata-list", st_bytes({"__metadata__": [1], **header}, data)),
        ("name-nul", st_bytes({("a\0b" if k == first else k): v for k, v in header.items()}, data)),
        ("many-empty-tensors", st_bytes({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                        for i in range(200_000)})),
        ("missing-dtype", st_bytes({**header, first: {k: v for k, v in e.items() if k != "dtype"}}, data)),
    ]
    return cases + flips(rng, good, 6, "st") + truncations(rng, good, 4, "st")


# --- params.json ---------------------------------------------------------------------------------------

PARAM_VALUES = [0, -1, 1.5, True, None, "64", [], {}, 10**8, 10**18, 2**31, 2**63, "NaN", "1e400", "-Infinity"]


def params_cases(params: dict) -> list[tuple[str, bytes]]:
    """params.json with each count or number swapped for an extreme, and files that are no JSON object."""
    cases = []
    keys = [k for k in params if k != "moe"] + ["moe.num_experts", "moe.num_experts_per_tok"]
    for key in keys:
        for n, v in enumerate(PARAM_VALUES):
            d = json.loads(json.dumps(params))
            parent, k = (d["moe"], key[4:]) if key.startswith("moe.") else (d, key)
            parent[k] = "@@" if isinstance(v, str) and v in ("NaN", "1e400", "-Infinity") else v
            text = json.dumps(d).replace('"@@"', v if isinstance(v, str) else "")
            cases.append((f"{key}={n}", text.encode()))
    cases += [("moe-experts-1e6", json.dumps({**params, "moe": {"num_experts": 10**6, "num_experts_per_tok": 2}})
               .encode()), ("moe-list", json.dumps({**params, "moe": [8, 2]}).encode()),
              ("not-json", b"{dim: 64"), ("not-utf8", b'{"dim": "\xff"}'), ("array", b"[1, 2]"), ("empty", b""),
              ("bom", b"\xef\xbb\xbf" + json.dumps(params).encode()), ("deep", b"[" * 100_000 + b"]" * 100_000),
              ("int-5000-digits", b'{"dim": ' + b"9" * 5000 + b"}"), ("null", b"null")]
    return cases


def write_cases(folder: Path, cases: list[tuple[str, bytes]], suffix: str = "") -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, data) in enumerate(cases):
        path = folder / f"{i:03d}{suffix}"
        path.write_bytes(data)
        out[name] = path
    return out


# --- many cases in one process -------------------------------------------------------------------------

class Alarm(BaseException):
    """A case ran past its time, or printed what it was waited for (a BaseException: the CLI's catch-all
    must not swallow it)."""


def _high_water_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a
    child of the (torch-sized) pytest process starts at pytest's peak; VmHWM starts afresh at exec."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def batch(cases_file: Path) -> None:
    """Run every ``{"name", "argv", "seconds", "until"}`` of cases_file through the weightswarm CLI in this
    process (a process start per case would cost the corpus minutes) and print one JSON line per case: its
    exit status, output, ``stopped`` ("reached": it printed ``until``, a command that serves until stopped;
    "timeout": it ran past ``seconds``) and this process's peak RSS so far (MB, never lower after a case)."""
    import time

    from click.testing import CliRunner

    from weightswarm.cli.main import main

    watch: dict = {}

    def tick(signum, frame):
        if not watch["armed"]:
            return
        if watch["until"] and watch["until"].encode() in watch["out"].getvalue():
            watch["armed"] = False
            raise Alarm("reached")
        if time.monotonic() > watch["deadline"]:
            watch["armed"] = False
            raise Alarm("timeout")

    signal.signal(signal.SIGALRM, tick)
    for case in json.loads(cases_file.read_text()):
        stopped, code, escaped = None, None, ""
        with CliRunner().isolation() as (out, err, _):
            start = time.monotonic()
            watch.update(out=out, until=case.get("until"), deadline=start + case["seconds"], armed=True)
            signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
            try:
                main.main(case["argv"], prog_name="weightswarm")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Alarm as e:
                stopped = str(e)
            except BaseException as e:
                escaped = f"\nTraceback (escaped the CLI): {type(e).__name__}: {e}"
            finally:
                watch["armed"] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            stdout, stderr = out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace")
        peak = _high_water_mb()
        print(json.dumps({"name": case["name"], "argv": case["argv"], "code": code, "stopped": stopped,
                          "stdout": stdout[-2000:], "stderr": stderr[-4000:] + escaped, "peak_mb": peak,
                          "seconds": round(time.monotonic() - start, 3)}),
              flush=True)


if __name__ == "__main__":
    import sys

    batch(Path(sys.argv[1]))
