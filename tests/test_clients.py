"""Interop with real BitTorrent clients, both ways: qBittorrent (hybrid and v2 torrents), Transmission, rtorrent
and aria2c (v1) download from `weightswarm seed`, `weightswarm fetch` downloads from each of them seeding a copy,
and all of them download at once from one `weightswarm seed` through one opentracker.

Peers find each other either through a real opentracker ("tracker") or because one is told the other's address
("peer": `fetch --peer`, qBittorrent's addPeers, rtorrent's add_peer). Every process is a real program on
127.0.0.1 with its state under tmp_path, and is stopped when its test ends, pass or fail.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support import LOOPBACK, Program, Tracker, free_port, run_ws, seeder, tree_bytes, wait_listening
from weightswarm.distrib.daemon.client import multipart

PACKAGES = {"opentracker": "opentracker", "qbittorrent-nox": "qbittorrent-nox", "aria2c": "aria2",
            "transmission-daemon": "transmission-daemon", "rtorrent": "rtorrent"}
COMPLETE_S = 60  # a generous bound for ~1 MB over loopback on a busy 2-core machine


def require(*binaries: str) -> None:
    for b in binaries:
        if shutil.which(b) is None:
            pytest.skip(f"{b} is not installed (apt-get install {PACKAGES[b]})")


def until(predicate: Callable[[], object], timeout: float, what: str | Callable[[], str],
          proc: subprocess.Popen | None = None):
    """predicate()'s first true value, polled until the deadline; fails at once if proc exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        if proc is None:
            time.sleep(0.2)
            continue
        try:  # waiting on the process doubles as the poll interval and notices a crash
            proc.wait(timeout=0.2)
            raise AssertionError(f"{proc.args[0]} exited with status {proc.returncode} while waiting for "
                                 f"{what() if callable(what) else what}")
        except subprocess.TimeoutExpired:
            pass


class Client(Program):
    """A BitTorrent client holding one torrent."""

    name: str
    dials_loopback = True  # connects to the 127.0.0.1 peers a tracker hands it
    last: object = None  # the last status read, for failure messages

    def add(self, torrent: Path, save: Path) -> None:
        """Add the torrent to download into (or seed from) save/<name>."""
        raise NotImplementedError

    def add_peer(self, port: int) -> None:
        raise NotImplementedError(f"{self.name} has no way to be given a peer")

    def complete(self) -> bool:
        """Every piece is there and checked and the client seeds it."""
        raise NotImplementedError

    def wait_complete(self, timeout: float = COMPLETE_S) -> None:
        until(self.complete, timeout, lambda: f"{self.name} to complete (last status: {self.last}; log: {self.log()})",
              self.proc)


class Qbittorrent(Client):
    """qbittorrent-nox with a private profile, driven through its WebUI API."""

    name, binary = "qBittorrent", "qbittorrent-nox"
    SEEDING = {"uploading", "stalledUP", "forcedUP"}

    def __init__(self, work: Path):
        super().__init__(work)
        self.webui = free_port()
        conf = work / "qBittorrent" / "config" / "qBittorrent.conf"
        conf.parent.mkdir(parents=True)
        # LocalHostAuth=false lets the API be used from 127.0.0.1 without a login. Interface/InterfaceAddress
        # keep peers on loopback; MultiConnectionsPerIp lets every other peer here (all 127.0.0.1) in; TCP only,
        # like the other clients here; no ratio limit, no queueing, so it seeds at once and for ever.
        conf.write_text(f"""[BitTorrent]
Session\\Port={self.port}
Session\\Interface=lo
Session\\InterfaceName=lo
Session\\InterfaceAddress=127.0.0.1
Session\\DHTEnabled=false
Session\\LSDEnabled=false
Session\\PeXEnabled=false
Session\\MultiConnectionsPerIp=true
Session\\BTProtocol=TCP
Session\\QueueingSystemEnabled=false
Session\\GlobalMaxRatio=-1
Session\\AddTorrentPaused=false

[LegalNotice]
Accepted=true

[Network]
PortForwardingEnabled=false

[Preferences]
WebUI\\Address=127.0.0.1
WebUI\\Port={self.webui}
WebUI\\LocalHostAuth=false
WebUI\\UseUPnP=false
""")

    def command(self) -> list[str]:
        return ["qbittorrent-nox", f"--profile={self.work}", f"--webui-port={self.webui}"]

    def started(self) -> None:
        wait_listening(self.proc, self.webui)

    def api(self, path: str, body: bytes | None = None, ctype: str = "application/x-www-form-urlencoded"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.webui}/api/v2/{path}", body, {"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
        return json.loads(data) if r.headers.get_content_type() == "application/json" else data

    def add(self, torrent: Path, save: Path) -> None:
        body, ctype = multipart({"savepath": str(save)}, {"torrents": (torrent.name, torrent.read_bytes())})
        assert self.api("torrents/add", body, ctype) == b"Ok."
        self.hash = until(lambda: [t["hash"] for t in self.api("torrents/info")], 20, "qBittorrent to list it")[0]

    def add_peer(self, port: int) -> None:
        form = urllib.parse.urlencode({"hashes": self.hash, "peers": f"127.0.0.1:{port}"}).encode()
        assert self.api("torrents/addPeers", form) == {self.hash: {"added": 1, "failed": 0}}

    def complete(self) -> bool:
        self.last = self.api("torrents/info")[0]
        return self.last["progress"] == 1 and self.last["state"] in self.SEEDING


class Transmission(Client):
    """transmission-daemon with its own config folder, driven through its RPC."""

    name, binary = "Transmission", "transmission-daemon"
    SEEDING = 6  # tr_torrent_activity TR_STATUS_SEED
    # It drops the 127.0.0.1 peers a tracker (or PEX) hands it, 127/8 being "martian" to it, but accepts their
    # connections: it must announce before the seed, which then finds it through the tracker and connects to it.
    dials_loopback = False

    def __init__(self, work: Path):
        super().__init__(work)
        self.rpc_port, self.session_id = free_port(), ""
        (work / "config").mkdir()
        # No RPC password, only 127.0.0.1 may call; peers on loopback over TCP, no DHT/LPD/PEX/uTP/port mapping;
        # no ratio or idle limit and no queues, so it seeds at once and for ever.
        (work / "config" / "settings.json").write_text(json.dumps({
            "rpc-bind-address": "127.0.0.1", "rpc-port": self.rpc_port, "rpc-authentication-required": False,
            "rpc-whitelist-enabled": True, "rpc-whitelist": "127.0.0.1",
            "bind-address-ipv4": "127.0.0.1", "bind-address-ipv6": "::1", "peer-port": self.port,
            "peer-port-random-on-start": False, "port-forwarding-enabled": False,
            "dht-enabled": False, "lpd-enabled": False, "pex-enabled": False, "utp-enabled": False,
            "ratio-limit-enabled": False, "idle-seeding-limit-enabled": False, "download-queue-enabled": False,
            "seed-queue-enabled": False, "start-added-torrents": True, "incomplete-dir-enabled": False,
            "download-dir": str(work / "downloads")}))

    def command(self) -> list[str]:
        return ["transmission-daemon", "--foreground", "--config-dir", str(self.work / "config")]

    def started(self) -> None:
        wait_listening(self.proc, self.rpc_port)

    def rpc(self, method: str, **arguments) -> dict:
        body = json.dumps({"method": method, "arguments": arguments}).encode()
        for _ in range(2):  # the first call of a session is answered 409 with the session id to send
            req = urllib.request.Request(f"http://127.0.0.1:{self.rpc_port}/transmission/rpc", body,
                                         {"X-Transmission-Session-Id": self.session_id})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    out = json.loads(r.read())
                assert out["result"] == "success", out
                return out["arguments"]
            except urllib.error.HTTPError as e:
                if e.code != 409:
                    raise
                self.session_id = e.headers["X-Transmission-Session-Id"]
        raise AssertionError("Transmission kept refusing the session id")

    def add(self, torrent: Path, save: Path) -> None:
        # A copy already in save is verified first, as with every client here.
        added = self.rpc("torrent-add", metainfo=base64.b64encode(torrent.read_bytes()).decode(),
                         **{"download-dir": str(save)})
        self.id = added["torrent-added"]["id"]

    def wait_announced(self) -> None:
        until(lambda: self.rpc("torrent-get", ids=[self.id], fields=["trackerStats"])["torrents"][0]["trackerStats"][0]
              ["lastAnnounceSucceeded"], 20, "Transmission to announce", self.proc)

    def complete(self) -> bool:
        fields = ["percentDone", "leftUntilDone", "status", "error", "errorString", "peersConnected"]
        self.last = self.rpc("torrent-get", ids=[self.id], fields=fields)["torrents"][0]
        return self.last["leftUntilDone"] == 0 and self.last["status"] == self.SEEDING


class Rtorrent(Client):
    """rtorrent as a daemon with a generated config, driven through XML-RPC over SCGI on a unix socket."""

    name, binary = "rtorrent", "rtorrent"

    def __init__(self, work: Path):
        super().__init__(work)
        self.socket = work / "rpc.sock"
        (work / "session").mkdir()
        (work / "rtorrent.rc").write_text(f"""\
network.port_range.set = {self.port}-{self.port}
network.port_random.set = no
network.bind_address.set = 127.0.0.1
dht.mode.set = disable
protocol.pex.set = no
trackers.use_udp.set = no
session.path.set = {work / "session"}
directory.default.set = {work}
network.scgi.open_local = {self.socket}
system.daemon.set = true
""")

    def command(self) -> list[str]:
        return ["rtorrent", "-n", "-o", f"import={self.work / 'rtorrent.rc'}"]  # -n: not ~/.rtorrent.rc

    def started(self) -> None:
        until(self._answers, 20, "rtorrent's SCGI socket", self.proc)

    def _answers(self) -> bool:
        try:
            return bool(self.call("system.client_version"))
        except OSError:
            return False

    def call(self, method: str, *params):
        body = xmlrpc.client.dumps(params, method).encode()
        headers = b"CONTENT_LENGTH\0%d\0SCGI\x001\0" % len(body)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket))
            s.sendall(b"%d:%s," % (len(headers), headers) + body)
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        return xmlrpc.client.loads(reply.split(b"\r\n\r\n", 1)[1])[0][0]

    def add(self, torrent: Path, save: Path) -> None:
        # rtorrent refuses a torrent without a tracker ("Could not find any trackers"): every torrent here names
        # one, which in the direct-peer cases nobody serves. It makes the torrent's folder but not its parents (else
        # the torrent just stays inactive).
        save.mkdir(parents=True, exist_ok=True)
        self.call("load.raw_start", "", xmlrpc.client.Binary(torrent.read_bytes()), f'd.directory.set="{save}"')
        self.hash = until(lambda: self.call("download_list", ""), 20, "rtorrent to load it", self.proc)[0]

    def add_peer(self, port: int) -> None:
        self.call("add_peer", self.hash, f"127.0.0.1:{port}")

    def complete(self) -> bool:
        self.last = dict(zip(["complete", "hashing", "state", "active", "message"], self.call(
            "d.multicall2", "", "main", "d.complete=", "d.hashing=", "d.state=", "d.is_active=", "d.message=")[0],
            strict=True))
        return self.last["complete"] == 1 and self.last["hashing"] == 0 and self.last["active"] == 1


class Aria2(Client):
    """aria2c with its JSON-RPC interface on loopback."""

    name, binary = "aria2c", "aria2c"

    def __init__(self, work: Path):
        super().__init__(work)
        self.rpc_port = free_port()

    def command(self) -> list[str]:
        # --seed-ratio=0.0 and no --seed-time: it seeds what it has for ever.
        return ["aria2c", "--enable-rpc", "--rpc-listen-all=false", f"--rpc-listen-port={self.rpc_port}",
                f"--listen-port={self.port}", "--interface=127.0.0.1", "--enable-dht=false", "--enable-dht6=false",
                "--bt-enable-lpd=false", "--enable-peer-exchange=false", "--seed-ratio=0.0",
                "--console-log-level=warn", "--summary-interval=0", f"--dir={self.work}"]

    def started(self) -> None:
        wait_listening(self.proc, self.rpc_port)

    def rpc(self, method: str, *params):
        body = json.dumps({"jsonrpc": "2.0", "id": "t", "method": method, "params": list(params)}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.rpc_port}/jsonrpc", body, timeout=10) as r:
            return json.loads(r.read())["result"]

    def add(self, torrent: Path, save: Path) -> None:
        # check-integrity: hash a copy already in save (and seed it) instead of trusting or re-downloading it.
        self.gid = self.rpc("aria2.addTorrent", base64.b64encode(torrent.read_bytes()).decode(), [],
                            {"dir": str(save), "check-integrity": "true"})

    def complete(self) -> bool:
        keys = ["status", "completedLength", "totalLength", "seeder", "numSeeders", "connections", "errorMessage"]
        self.last = self.rpc("aria2.tellStatus", self.gid, keys)
        return self.last["seeder"] == "true" and self.last["completedLength"] == self.last["totalLength"]


def make_torrent(release: Path, out: Path, fmt: str, tracker_port: int) -> Path:
    r = run_ws("create", release, "-o", out, "--format", fmt, "--tracker", f"http://127.0.0.1:{tracker_port}/announce")
    assert r.returncode == 0, r.stderr
    return out


# (client, torrent format, discovery). Each client downloads one way and serves fetch the other (aria2c serving
# fetch as a direct peer is in test_interop.py), so each direction is covered both ways.
DOWNLOADS = [
    pytest.param(Qbittorrent, "hybrid", "tracker", (), id="qbittorrent-hybrid-tracker"),
    pytest.param(Qbittorrent, "v2", "peer", (), id="qbittorrent-v2-peer"),
    pytest.param(Transmission, "v1", "tracker", (), id="transmission-v1-tracker"),  # no add-peer RPC
    # rtorrent lacks the fast extension, so the requests past the seed's default queue of 4 blocks are dropped
    # without a reject and it waits for them for ever: the seed must run with libtorrent's stock queues.
    pytest.param(Rtorrent, "v1", "peer", ("--no-distinct-pieces",), id="rtorrent-v1-peer"),
    pytest.param(Aria2, "v1", "tracker", (), id="aria2c-v1-tracker"),  # no add-peer RPC either
]
SERVES = [
    pytest.param(Qbittorrent, "hybrid", "peer", id="qbittorrent-hybrid-peer"),
    pytest.param(Qbittorrent, "v2", "tracker", id="qbittorrent-v2-tracker"),
    pytest.param(Transmission, "v1", "peer", id="transmission-v1-peer"),
    pytest.param(Rtorrent, "v1", "tracker", id="rtorrent-v1-tracker"),
    pytest.param(Aria2, "v1", "tracker", id="aria2c-v1-tracker"),
]


@pytest.mark.parametrize(("client", "fmt", "discovery", "seed_args"), DOWNLOADS)
def test_client_downloads_from_seed(client, fmt, discovery, seed_args, nodes, tiny_release, tmp_path):
    """The client downloads the release from `weightswarm seed`, found through the tracker or given to the
    client as a peer, and has the exact bytes."""
    require(client.binary, *(["opentracker"] if discovery == "tracker" else []))
    tracker_port = free_port()
    torrent = make_torrent(tiny_release, tmp_path / f"{fmt}.torrent", fmt, tracker_port)
    with ExitStack() as stack:
        if discovery == "tracker":
            stack.enter_context(Tracker(tmp_path / "tracker", tracker_port, torrent))
        c = stack.enter_context(client(tmp_path / "client"))
        if not c.dials_loopback:  # the seed, announcing after it, is the one that connects
            c.add(torrent, tmp_path / "download")
            c.wait_announced()
        seed = seeder(nodes, tiny_release, torrent, *seed_args)
        if c.dials_loopback:
            c.add(torrent, tmp_path / "download")
        if discovery == "peer":
            c.add_peer(seed.port)
        c.wait_complete()
    assert tree_bytes(tmp_path / "download" / tiny_release.name) == tree_bytes(tiny_release)


@pytest.mark.parametrize(("client", "fmt", "discovery"), SERVES)
def test_fetch_from_client(client, fmt, discovery, tiny_release, tmp_path):
    """`weightswarm fetch` downloads the release from the client seeding a copy, found through the tracker or
    given with --peer, and verifies it."""
    require(client.binary, *(["opentracker"] if discovery == "tracker" else []))
    tracker_port = free_port()
    torrent = make_torrent(tiny_release, tmp_path / f"{fmt}.torrent", fmt, tracker_port)
    shutil.copytree(tiny_release, tmp_path / "seed" / tiny_release.name)
    with ExitStack() as stack:
        if discovery == "tracker":
            stack.enter_context(Tracker(tmp_path / "tracker", tracker_port, torrent))
        c = stack.enter_context(client(tmp_path / "client"))
        c.add(torrent, tmp_path / "seed")
        c.wait_complete()  # it checked the copy and seeds it (and has announced it)
        peer = ["--peer", f"127.0.0.1:{c.port}"] if discovery == "peer" else []
        r = run_ws("fetch", torrent, "-o", tmp_path / "out", *peer, *LOOPBACK, "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified: OK" in r.stdout
    assert tree_bytes(tmp_path / "out" / tiny_release.name) == tree_bytes(tiny_release)


def test_mixed_swarm(nodes, tiny_release, tmp_path):
    """One `weightswarm seed` and, at once, qBittorrent, Transmission, rtorrent, aria2c and `weightswarm fetch`
    downloading through one opentracker (a v1 torrent: all of them take it); every one ends with the exact bytes."""
    clients = [Qbittorrent, Transmission, Rtorrent, Aria2]
    require("opentracker", *(c.binary for c in clients))
    tracker_port = free_port()
    torrent = make_torrent(tiny_release, tmp_path / "v1.torrent", "v1", tracker_port)
    with ExitStack() as stack:
        stack.enter_context(Tracker(tmp_path / "tracker", tracker_port, torrent))
        started = [stack.enter_context(c(tmp_path / c.binary)) for c in clients]
        # Every client announces before the seed, which then connects to each (Transmission takes only that).
        for c in started:
            c.add(torrent, tmp_path / c.binary / "download")
        started[1].wait_announced()
        seeder(nodes, tiny_release, torrent)
        fetch = nodes("fetch", torrent, "-o", tmp_path / "fetch", *LOOPBACK, "--json", "--timeout", "30")
        for c in started:
            c.wait_complete()
        assert fetch.wait(COMPLETE_S) == 0, fetch.stderr
        assert fetch.last["verify"]["report"]["ok"]
    want = tree_bytes(tiny_release)
    assert tree_bytes(tmp_path / "fetch" / tiny_release.name) == want
    for c in started:
        assert tree_bytes(tmp_path / c.binary / "download" / tiny_release.name) == want, c.name
