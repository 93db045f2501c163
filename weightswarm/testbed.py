"""Many hosts on one machine: network namespaces on a bridge, each uplink shaped with tc, and swarms run on them.

The tests and ``bench/bench_swarm.py`` share it. Every namespace is named ``ws<pid>x<k>-...`` so parallel runs
never meet, and ``close()`` (also on SIGTERM, SIGINT and errors) kills what runs inside them by pid before
deleting them. Traffic stays on the private bridge: no address of the machine itself is touched.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from weightswarm.core.errors import SwarmError
from weightswarm.procs import WS, WsProcess

SUBNET = "10.231.0"  # private, and only ever on our own bridge inside our own namespaces
TRACKER_PORT = 6969
PEER_PORT = 6881
_runs = itertools.count()


def unavailable() -> str | None:
    """Why this machine cannot build a testbed, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise SwarmError("testbed", f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Host:
    """One namespace with address ``addr`` on the bridge; its processes are tracked and ended on close."""

    name: str
    netns: str
    addr: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    nodes: list[WsProcess] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen([*self.prefix, *map(str, cmd)], **kw)
        self.procs.append(p)
        return p

    def ws(self, *args, stderr_path: str | os.PathLike | None = None) -> WsProcess:
        """A weightswarm command on this host (``--json`` is the caller's)."""
        n = WsProcess(*args, name=f"{self.name}:{args[0]}", prefix=[*self.prefix, *WS], stderr_path=stderr_path)
        self.nodes.append(n)
        return n

    def tx_bytes(self) -> int:
        """Bytes its uplink put on the wire (Ethernet frames, headers included)."""
        r = subprocess.run([*self.prefix, "cat", "/sys/class/net/eth0/statistics/tx_bytes"], capture_output=True,
                           text=True, timeout=10, check=True)
        return int(r.stdout)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop(signal.SIGKILL, timeout=10)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


class Testbed:
    """``hosts`` namespaces on one bridge, each link shaped to ``rate_mbit`` both ways (0: unshaped).

    Use as a context manager; netem (added delay) is not in every kernel, so ``delay_ms`` is honoured only
    where it is, and ``self.delay_note`` says when it was not.
    """

    __test__ = False  # a name pytest would otherwise try to collect

    def __init__(self, names: list[str], rate_mbit: float = 100.0, delay_ms: float = 0.0):
        if reason := unavailable():
            raise SwarmError("testbed", reason)
        if len(names) > 250:
            raise SwarmError("testbed", f"{len(names)} hosts: at most 250 fit the subnet")
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        self.tag = f"ws{os.getpid()}x{next(_runs)}"
        self.switch = f"{self.tag}-sw"
        self.hosts = {n: Host(n, f"{self.tag}-{n}", f"{SUBNET}.{i + 1}") for i, n in enumerate(names)}
        self.delay_note: str | None = None
        self._made: list[str] = []
        self._old_term = None

    def __enter__(self) -> Testbed:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM would otherwise end the interpreter without running close().
            self._old_term = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts.values()):
            self._netns(h.netns)
            port = f"p{i}"
            # Both ends are born inside our namespaces: the machine's own interfaces are never touched.
            _ip("link", "add", "eth0", "netns", h.netns, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            if self.rate_mbit:
                self._shape(h.netns, "eth0")  # the host's uplink
                self._shape(self.switch, port)  # and its downlink

    def _shape(self, netns: str, dev: str) -> None:
        # A bucket of one 64 KiB GSO packet: with a smaller one tbf cuts every such packet into MTU frames in
        # software, which took half of 2 cores at N = 8 and made the CPU, not the links, the bottleneck.
        tbf = ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", "64kb", "latency", "400ms"]
        if self.delay_ms and self.delay_note is None:
            r = subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "root", "handle",
                                "1:", "netem", "delay", f"{self.delay_ms}ms"], capture_output=True, text=True)
            if r.returncode == 0:
                subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1",
                                "handle", "10:", *tbf], check=True, capture_output=True)
                return
            self.delay_note = f"no added delay: this kernel has no netem ({r.stderr.strip()})"
        subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "root", *tbf], check=True,
                       capture_output=True, timeout=30)

    def close(self) -> None:
        """End every process started here, then delete our namespaces (and with them the veths and bridge)."""
        for h in self.hosts.values():
            h.stop()
        for ns in reversed(self._made):
            _kill_inside(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    def leftovers(self) -> list[str]:
        """Namespaces of this testbed that still exist (none after close)."""
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
        return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(self.tag + "-")]


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _kill_inside(netns: str) -> None:
    """Whatever still runs in a namespace we made (a child a process left behind) is ours too: end it."""
    r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_tracker(host: Host, folder: Path, hashes: list[str]) -> subprocess.Popen:
    """opentracker on ``host``, whitelisting ``hashes`` (it chroots into ``folder``: the list lives there)."""
    if shutil.which("opentracker") is None:
        raise SwarmError("testbed", "opentracker is not installed (apt-get install opentracker)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "whitelist").write_text("".join(f"{h}\n" for h in hashes))
    p = host.popen(["opentracker", "-i", host.addr, "-p", TRACKER_PORT, "-P", TRACKER_PORT, "-d", folder,
                    "-w", "whitelist"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(host, TRACKER_PORT, p)
    return p


def wait_port(host: Host, port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """Until something listens on host:port (checked from inside the host)."""
    deadline = time.monotonic() + timeout
    probe = ["python3", "-c", f"import socket,sys; sys.exit(socket.socket().connect_ex(('{host.addr}', {port})))"]
    while time.monotonic() < deadline:
        if subprocess.run([*host.prefix, *probe], capture_output=True, timeout=10).returncode == 0:
            return
        if proc is not None and proc.poll() is not None:
            raise SwarmError(host.name, f"{proc.args[3]} exited with status {proc.returncode}")
        try:
            proc.wait(timeout=0.1) if proc is not None else threading.Event().wait(0.1)
        except subprocess.TimeoutExpired:
            pass
    raise SwarmError(host.name, f"nothing listens on {host.addr}:{port} after {timeout:.0f} s")


@dataclass
class SwarmRun:
    """What one swarm run measured: seconds from the common start to each fetcher's completion."""

    payload: int
    finished: dict[str, float]
    origin_uploaded: int  # payload bytes the origin reports sending
    origin_wire: int  # bytes on the origin's link, all headers included

    @property
    def last(self) -> float:
        return max(self.finished.values())


@dataclass(frozen=True)
class Fetcher:
    """A `weightswarm fetch` to run: where, the address it listens on, what, and its other options."""

    host: Host
    listen: str
    torrent: Path
    args: tuple = ()


def fetch_all(fetchers: dict[str, Fetcher], work: Path, timeout: float = 600) -> dict[str, float]:
    """Start every fetcher at once (each into ``work/NAME``); seconds from the start to each one's completion.
    Each keeps seeding to the others until all are done; then they are stopped."""
    finished: dict[str, float] = {}
    t0 = time.monotonic()
    nodes = {name: f.host.ws("fetch", f.torrent, "-o", work / name, "--listen", f.listen, "--no-dht", "--json",
                             "--seed-after", f"{int(timeout)}s", *f.args, stderr_path=work / f"{name}.log")
             for name, f in fetchers.items()}

    def watch(name: str, node: WsProcess) -> None:
        try:
            node.wait_event(lambda e: e["event"] == "finished", timeout=timeout)
            finished[name] = time.monotonic() - t0
        except SwarmError:
            pass

    threads = [threading.Thread(target=watch, args=item, daemon=True) for item in nodes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    missing = sorted(set(fetchers) - set(finished))
    logs = {m: nodes[m].stderr[-500:] for m in missing[:2]}
    for node in nodes.values():
        node.stop(signal.SIGKILL, timeout=10)
    if missing:
        raise SwarmError("testbed", f"{len(missing)} of {len(fetchers)} fetchers did not finish: {missing}: {logs}")
    return finished


def run_swarm(origin: Host, seed_cmd: list, fetchers: dict[str, tuple[Host, str]], torrent: Path,
              fetch_args: list, work: Path, payload: int, timeout: float = 600) -> SwarmRun:
    """Start the origin (``seed_cmd``: a weightswarm command that serves ``torrent``), then every fetcher
    (name -> its host and listen address) at once, as ``fetch_all``."""
    seeder = origin.ws(*seed_cmd, "--json", stderr_path=work / "origin.log")
    seeder.wait_event(lambda e: e["event"] == "ready", timeout=300)
    wire0 = origin.tx_bytes()
    finished = fetch_all({name: Fetcher(host, listen, torrent, tuple(fetch_args))
                          for name, (host, listen) in fetchers.items()}, work, timeout)
    # The origin reports its upload once a second: take the second report after the last completion.
    mark, deadline = len(seeder.events), time.monotonic() + 10
    while len(later := [e for e in seeder.events[mark:] if e["event"] == "status"]) < 2:
        seeder.wait_event(lambda e: e["event"] == "status", timeout=max(0.1, deadline - time.monotonic()))
    wire = origin.tx_bytes() - wire0  # over the same span as the upload report
    seeder.stop(signal.SIGKILL, timeout=10)
    return SwarmRun(payload, finished, later[-1]["uploaded"], wire)
