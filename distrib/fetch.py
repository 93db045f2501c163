"""Fetch a release from a swarm into ``OUTPUT/<torrent name>/`` with resume, file selection and events.

Resume protocol (state under ``OUTPUT/.weightswarm/``): ``<hash>.torrent`` holds the metadata as soon as
it is known; ``<hash>.resume`` is written only on a clean stop and consumed when the next run starts.
After a crash there is no resume file, so libtorrent re-hashes whatever is on disk and keeps every piece
that passes: nothing verified is downloaded twice, and nothing unverified is trusted. Each run applies its
own selection (``--only``, ``--experts``) over the resume data, so a wider selection later downloads only
what it adds.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from weightswarm.convert.convert import ConvertOptions
from weightswarm.convert.stream import StreamConvert
from weightswarm.core.atomic import atomic_write_bytes
from weightswarm.core.errors import OptionError, SwarmError
from weightswarm.core.interrupt import Stop
from weightswarm.core.locks import lock_exclusive
from weightswarm.core.paths import check_output_dir
from weightswarm.core.units import parse_duration, plural
from weightswarm.distrib.session import (
    Event,
    RequestQueue,
    SessionOptions,
    add_peers,
    make_session,
    raise_on_error,
    state_dir,
)
from weightswarm.distrib.source import Source
from weightswarm.distrib.torrentfile import Torrent, check_info_paths, parse_torrent
from weightswarm.formats.partial import Absent
from weightswarm.formats.perexpert import check_experts, expert_of_file
from weightswarm.formats.perexpert import select_files as expert_files
from weightswarm.verify.folder import verify_folder
from weightswarm.verify.report import Finding, Report
from weightswarm.verify.tensorpieces import (
    PieceMap,
    check_selection,
    file_pieces,
    is_weight_file,
    map_release,
    metadata_guess,
    payload_bytes,
    pieces_of,
    selectable,
    small_files,
)

_FETCH_ALERTS = (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
                 | lt.alert_category.tracker | lt.alert_category.connect | lt.alert_category.peer
                 | lt.alert_category.dht | lt.alert_category.piece_progress)


@dataclass(frozen=True)
class SeedAfter:
    seconds: float | None = None
    ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> SeedAfter:
        """``30s``, ``10m``, ``2h`` (a time) or ``1.5x`` (an upload ratio)."""
        if text.strip().lower().endswith("x"):
            try:
                ratio = float(text.strip()[:-1])
            except ValueError:
                ratio = -1.0
            if not 0 <= ratio < float("inf"):
                raise OptionError("--seed-after", text, "not a seeding time (30s, 10m, 2h) or ratio (1.5x)")
            return cls(ratio=ratio)
        return cls(seconds=parse_duration(text, "--seed-after"))


@dataclass(frozen=True)
class FetchOptions:
    output: Path
    only: tuple[str, ...] = ()
    # The dense part and these experts: a per-expert layout's files, or an original layout's tensors.
    experts: tuple[int, ...] | None = None
    convert: Path | None = None  # convert into this folder while downloading (convert.stream)
    peers: tuple[tuple[str, int], ...] = ()
    web_seeds: tuple[str, ...] = ()
    session: SessionOptions = field(default_factory=SessionOptions)
    seed_after: SeedAfter | None = None
    timeout: float = 0  # give up after this long without progress; 0 = never


@dataclass(frozen=True)
class FetchResult:
    root: Path  # OUTPUT/<name>
    selected: list[str]  # payload paths that were wanted
    pieces: list[Finding]  # per wanted file: complete, so every piece of it passed its hash on arrival


def fetch_and_verify(source: Source, opts: FetchOptions, emit: Event, verify: bool = True) -> Report | None:
    """The whole `fetch` job: download, check, then seed for --seed-after if everything passed.

    Checks, in order: every wanted file complete (libtorrent hashed each piece on arrival), the
    publisher's sums (the catalog's md5, and RELEASE / *.md5 / *SUMS in the payload), the structure of
    the weight files. The report is emitted as a ``verify`` event and returned (None with verify=False).
    """
    with Fetcher(source, opts, emit) as fetcher:
        result = fetcher.fetch()
        report = None
        if verify:
            published = [(p, "md5", d) for p, d in source.release.md5] if source.release else []
            by_tensor = fetcher.by_tensor
            # By tensor, weight files are partial: their sums cannot match, their structure is checked
            # tensor by tensor below.
            report = verify_folder(result.root, published=published, structure=by_tensor is None,
                                   only=set(result.selected) if (opts.only or opts.experts is not None
                                                                 or by_tensor) else None)
            report.findings[:0] = result.pieces
            if by_tensor:
                report.extend(by_tensor.check())
        try:
            if report is not None:
                emit({"event": "verify", "report": report.to_json()})
            if opts.seed_after and (report is None or report.ok):
                fetcher.seed()
        except Stop:
            pass  # a stop once the download is complete and checked ends the seeding, cleanly
    return report


def selects_tensors(torrent: Torrent, experts: tuple[int, ...] | None, convert: Path | None = None,
                    only: tuple[str, ...] = ()) -> bool:
    """Whether a fetch picks tensors rather than files: --convert, or --experts on an original layout."""
    per_expert = any(expert_of_file(f.path) is not None for f in torrent.payload_files())
    if convert is None and (experts is None or per_expert):
        return False
    option, value = ("--convert", str(convert)) if convert else ("--experts", ",".join(map(str, experts)))
    if per_expert:
        raise OptionError(option, value, f"{torrent.name} is already in the per-expert layout",
                          hint="fetch it with --experts alone")
    if not selectable(torrent):
        raise OptionError(option, value, f"{torrent.name} has no consolidated.00.pth, consolidated.safetensors or "
                          "model*.safetensors shards whose tensors can be fetched one by one",
                          hint="fetch the release whole, then `weightswarm convert` it")
    if only:
        raise OptionError("--only", " ".join(only), f"cannot be combined with {option} on this release: "
                          "the tensors it needs decide which bytes are fetched")
    return True


def select_files(torrent: Torrent, only: tuple[str, ...], experts: tuple[int, ...] | None = None,
                 convert: Path | None = None) -> list[str]:
    """Payload paths matching any GLOB (on the path inside the torrent or on the file name) and, with
    ``experts``, the per-expert layout's files a node serving them needs; all files if neither is given.
    When the fetch picks tensors (selects_tensors), the files fetched whole: all but the weight files."""
    paths = [f.path for f in torrent.payload_files()]
    chosen = paths
    if selects_tensors(torrent, experts, convert, only):
        return small_files(torrent)
    if experts is not None:
        have = sorted({e for p in paths if (e := expert_of_file(p)) is not None})
        check_experts(experts, have)
        chosen = expert_files(paths, experts)
    if only:
        chosen = [p for p in chosen if any(fnmatch.fnmatchcase(p, g) or fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], g)
                                           for g in only)]
        if not chosen:
            raise OptionError("--only", " ".join(only), "matches no file in the torrent",
                              hint="files: " + ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else ""))
    return chosen


class Swarm:
    """What the swarm has done for us so far, for the progress line and a 'could not complete' error:
    trackers and their last answer, DHT nodes, peers tried, and payload bytes per peer."""

    def __init__(self, dht: bool):
        self.dht = dht
        self.trackers: dict[str, str] = {}  # url -> "ok, N peers" / "error: ..."
        self.dht_nodes = 0
        self.tried: set[str] = set()
        self.failed: dict[str, str] = {}  # peer -> why its connection ended
        self.sources: dict[str, int] = {}  # "host:port" -> payload bytes received from that peer

    def on_alert(self, a) -> None:
        if isinstance(a, lt.tracker_reply_alert):
            self.trackers[a.tracker_url()] = f"ok, {plural(a.num_peers, 'peer')}"
        elif isinstance(a, lt.tracker_error_alert):
            why = a.failure_reason() or a.error_message() or a.error.message()
            self.trackers[a.tracker_url()] = f"error: {why}"
        elif isinstance(a, lt.tracker_warning_alert):
            self.trackers.setdefault(a.tracker_url(), f"warning: {a.message()}")
        elif isinstance(a, lt.peer_connect_alert):
            self.tried.add(_endpoint(a.endpoint))
        elif isinstance(a, lt.peer_disconnected_alert) and a.error.value():
            self.failed[_endpoint(a.endpoint)] = a.error.message()
        elif isinstance(a, lt.dht_stats_alert):
            self.dht_nodes = sum(b["num_nodes"] for b in a.routing_table)

    def note_peers(self, handle: lt.torrent_handle) -> None:
        """Payload bytes per peer address (the largest count seen: peers come and go)."""
        for p in handle.get_peer_info():
            key = _endpoint(p.ip)
            self.sources[key] = max(self.sources.get(key, 0), p.total_download)

    def summary(self, handle: lt.torrent_handle | None, peers: int) -> dict:
        trackers = {t["url"]: self.trackers.get(t["url"], "announcing" if t.get("updating") else "not reached yet")
                    for t in (handle.trackers() if handle is not None and handle.is_valid() else [])}
        return {"trackers": trackers, "dht_nodes": self.dht_nodes if self.dht else None,
                "peers_tried": len(self.tried), "peers_failed": dict(sorted(self.failed.items())[:10]),
                "peers": peers}

    def describe(self, s: dict) -> str:
        """One line: what was tried (the progress line while waiting, and the error at the end)."""
        bad = {u: w for u, w in s["trackers"].items() if w.startswith("error")}
        ok = [u for u, w in s["trackers"].items() if w.startswith("ok")]
        parts = []
        if s["trackers"]:
            t = plural(len(s["trackers"]), "tracker")
            parts.append(f"{t}: {len(ok)} answered, {len(bad)} failing" +
                         (f" ({next(iter(bad.values()))[7:]})" if bad else ""))
        else:
            parts.append("no trackers")
        parts.append("DHT off" if s["dht_nodes"] is None else f"DHT {plural(s['dht_nodes'], 'node')}")
        parts.append(f"{plural(s['peers_tried'], 'peer')} tried, {s['peers']} connected")
        return "; ".join(parts)


def _endpoint(ep) -> str:
    host, port = ep[0], ep[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Fetcher:
    """One torrent in one session: ``with Fetcher(...) as f: f.fetch(); ...; f.seed()``."""

    def __init__(self, source: Source, opts: FetchOptions, emit: Event):
        self.source, self.opts, self.emit = source, opts, emit
        self.state = Path(state_dir(opts.output))
        self.torrent: Torrent | None = source.torrent
        self.selected: list[str] = (select_files(self.torrent, opts.only, opts.experts, opts.convert)
                                    if self.torrent else [])
        self.ses: lt.session | None = None
        self.handle: lt.torrent_handle | None = None
        self.swarm = Swarm(opts.session.dht)
        self._done_at_start = 0
        self.by_tensor: ByTensor | None = None
        if self.torrent and selects_tensors(self.torrent, opts.experts, opts.convert, opts.only):
            self.by_tensor = ByTensor(self)

    def __enter__(self) -> Fetcher:
        check_output_dir(self.opts.output, empty=False)
        if self.opts.convert is not None:  # refused now, not after the metadata came
            check_output_dir(self.opts.convert, empty=False)
        self.ses = make_session(self.opts.session)  # a bad --listen fails before anything is written
        self.ses.apply_settings({"alert_mask": int(_FETCH_ALERTS)})
        if self.opts.experts is not None or self.opts.convert is not None:
            # Picking tensors, the torrent is "finished" between rounds of the map (the small files are in,
            # the next metadata not asked for yet): libtorrent would drop its seeds then, and redial them
            # only after min_reconnect_time.
            self.ses.apply_settings({"close_redundant_connections": False})
        self.opts.output.mkdir(exist_ok=True)
        self.state.mkdir(exist_ok=True)
        self._lock = lock_exclusive(self.state / f"{self.source.key}.lock", self.opts.output,
                                    "another fetch of this torrent is using this folder")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Resume data after a clean stop, or after the swarm gave up (a rerun continues from it); not
        # after a refused input, whose run could carry that state.
        if exc_type is None or issubclass(exc_type, (Stop, KeyboardInterrupt, SwarmError)):
            self._save_resume()
        if self.by_tensor:
            self.by_tensor.close()
        self.ses.pause()
        self._lock.close()

    def fetch(self) -> FetchResult:
        ses, start = self.ses, time.monotonic()
        self.handle = h = ses.add_torrent(self._params())
        self.emit({"event": "start", "source": self.source.text, "info_hash": self.source.key,
                   "output": str(self.opts.output), "listen_port": ses.listen_port()})
        if self.torrent:
            self._announce_metadata()
        finished = False
        last_emit, last_change, best, last_dht = 0.0, time.monotonic(), -1, 0.0
        while not finished:
            ses.wait_for_alert(250)
            for a in ses.pop_alerts():
                finished |= self._on_alert(a)
            now, st = time.monotonic(), h.status()
            self.swarm.note_peers(h)
            if st.num_peers == 0 and self.opts.peers:
                self._connect()
            if self.by_tensor:
                self.by_tensor.step(h)
            if self.opts.session.dht and now - last_dht >= 5:
                last_dht = now
                ses.post_dht_stats()
            if st.total_wanted_done > best:
                best, last_change = st.total_wanted_done, now
            finished |= bool(self.torrent) and st.is_finished and st.state in _DONE_STATES
            # Picking tensors, the small files complete long before the tensors are even chosen, and a status
            # taken just after they were may not show it yet: the pieces themselves say.
            finished = finished and (self.by_tensor is None or self.by_tensor.complete(h))
            if now - last_emit >= 0.5 or finished:
                last_emit = now
                self.emit(self._progress(st))
            if not finished and self.opts.timeout and now - last_change > self.opts.timeout:
                what = "data" if self.torrent else "metadata"
                tried = self.swarm.summary(h, st.num_peers)
                raise SwarmError(self.source.text, f"could not complete: no {what} for {self.opts.timeout:g} s; "
                                 f"{self.swarm.describe(tried)}",
                                 hint="run the same command again to continue; add peers with --peer HOST:PORT")
        self._flush()
        if self.by_tensor:
            self.by_tensor.finish(h)
        self.swarm.note_peers(h)
        self.emit(self._finished(h.status(), time.monotonic() - start))
        return FetchResult(self.torrent.root(self.opts.output), self.selected, self._piece_findings())

    def _finished(self, st, seconds: float) -> dict:
        """The byte counts of this run, which add up: payload = new file bytes + block padding + redundant +
        failed; protocol overhead comes on top."""
        # Picking tensors, what was wanted at the check was the small files only.
        had = self.by_tensor.already_had if self.by_tensor else self._done_at_start
        new = max(0, st.total_wanted_done - had)
        redundant, failed = st.total_redundant_bytes, st.total_failed_bytes
        padding = max(0, st.total_payload_download - new - redundant - failed)
        return {"event": "finished", "seconds": round(seconds, 3), "downloaded": st.total_payload_download,
                "new": new, "padding": padding, "redundant": redundant, "failed": failed,
                "protocol": max(0, st.total_download - st.total_payload_download),
                "already_had": had, "wanted": st.total_wanted,
                "sources": dict(sorted(self.swarm.sources.items()))}

    def _piece_findings(self) -> list[Finding]:
        done = self.handle.file_progress(lt.torrent_handle.piece_granularity)
        out = []
        for f in self.torrent.payload_files():
            if f.path in self.selected:
                ok = done[f.index] == f.size
                out.append(Finding("pieces", f.path, ok, "every piece passed its hash check on arrival" if ok
                                   else f"incomplete: {done[f.index]} of {f.size} bytes"))
        if self.by_tensor:
            out += self.by_tensor.piece_findings(self.handle)
        return out

    def seed(self) -> None:
        """Keep serving until the --seed-after time or upload ratio is reached (or Ctrl-C)."""
        sa, start = self.opts.seed_after, time.monotonic()
        wanted = self.handle.status().total_wanted
        queue = RequestQueue(self.ses, self.opts.session)
        while True:
            self.ses.wait_for_alert(500)
            for a in self.ses.pop_alerts():
                raise_on_error(a, self.opts.output)
            st = self.handle.status()
            queue.update()
            self.emit(self._progress(st) | {"event": "seeding"})
            if sa.seconds is not None and time.monotonic() - start >= sa.seconds:
                return
            if sa.ratio is not None and wanted and st.all_time_upload / wanted >= sa.ratio:
                return

    def _params(self) -> lt.add_torrent_params:
        atp = self.source.params
        resume = self.state / f"{self.source.key}.resume"
        meta = self.state / f"{self.source.key}.torrent"
        if resume.exists():
            # Consumed now: if this run dies, the next finds none and re-checks the data on disk.
            try:
                atp = lt.read_resume_data(resume.read_bytes())
            except RuntimeError:
                pass  # unreadable: without resume data libtorrent checks the files itself
            resume.unlink()
        if not self.torrent and meta.exists():
            self.torrent = parse_torrent(meta.read_bytes(), meta)
            self.selected = select_files(self.torrent, self.opts.only, self.opts.experts, self.opts.convert)
            if selects_tensors(self.torrent, self.opts.experts, self.opts.convert, self.opts.only):
                self.by_tensor = ByTensor(self)
        if self.torrent:
            atp.ti = self.torrent.info
            atp.file_priorities = self._priorities()
            # The resume data's piece priorities are the last run's selection and would override this
            # run's file priorities: a partial fetch could never be widened.
            atp.piece_priorities = self.by_tensor.first_priorities() if self.by_tensor else []
            atp.flags &= ~lt.torrent_flags.upload_mode
        else:
            # Download nothing until the metadata has been checked for unsafe paths.
            atp.flags |= lt.torrent_flags.upload_mode
        atp.save_path = str(self.opts.output)
        atp.part_file_dir = str(self.state)
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        atp.url_seeds = list(atp.url_seeds) + list(self.opts.web_seeds)
        return atp

    def _priorities(self) -> list[int]:
        """Per file. Picking tensors, weight files get 1: a file of priority 0 has its pieces written to
        the part file, where the tensor map and the converter would not find them; the pieces decide."""
        wanted = set(self.selected)
        low = 1 if self.by_tensor else 0
        return [0 if f.pad else 4 if f.path in wanted else low if is_weight_file(f.path) else 0
                for f in self.torrent.files()]

    def _on_metadata_received(self) -> None:
        info = self.handle.torrent_file().info_section()
        check_info_paths(lt.bdecode(info), self.source.text)
        data = lt.bencode({b"info": lt.bdecode(info)})
        torrent = parse_torrent(data, self.source.text)
        self.selected = select_files(torrent, self.opts.only, self.opts.experts, self.opts.convert)
        self.torrent = torrent  # only now: a refused torrent must leave no state behind
        if selects_tensors(torrent, self.opts.experts, self.opts.convert, self.opts.only):
            self.by_tensor = ByTensor(self)
        atomic_write_bytes(self.state / f"{self.source.key}.torrent", data)
        self.handle.prioritize_files(self._priorities())
        if self.by_tensor:
            self.handle.prioritize_pieces(self.by_tensor.first_priorities())
        self.handle.unset_flags(lt.torrent_flags.upload_mode)
        self._announce_metadata()

    def _announce_metadata(self) -> None:
        files = self.torrent.payload_files()
        self.emit({"event": "metadata", "name": self.torrent.name, "files": len(files),
                   "total_size": sum(f.size for f in files), "selected": self.selected,
                   "selected_size": sum(f.size for f in files if f.path in self.selected)})

    def _on_alert(self, a) -> bool:
        """Handle one alert; True when the wanted files are complete."""
        raise_on_error(a, self.opts.output)
        self.swarm.on_alert(a)
        if isinstance(a, lt.metadata_received_alert):
            self._on_metadata_received()
        elif isinstance(a, lt.torrent_checked_alert):
            st = self.handle.status()
            self._done_at_start = st.total_wanted_done
            self.emit({"event": "checked", "have_bytes": st.total_wanted_done, "wanted_bytes": st.total_wanted})
            if self.by_tensor:
                self.by_tensor.on_checked(self.handle)
            self._connect()
        elif isinstance(a, lt.torrent_finished_alert):
            return self.torrent is not None and (self.by_tensor is None or self.by_tensor.mapped)
        elif isinstance(a, lt.piece_finished_alert) and self.by_tensor:
            self.by_tensor.on_piece(int(a.piece_index))
        elif isinstance(a, lt.cache_flushed_alert) and self.by_tensor:
            self.by_tensor.on_flushed()
        elif isinstance(a, lt.hash_failed_alert):
            self.emit({"event": "hash_failed", "piece": int(a.piece_index)})
        elif isinstance(a, lt.peer_ban_alert):  # libtorrent's smart ban: it sent data that failed its hash
            self.emit({"event": "peer_banned", "peer": f"{a.endpoint[0]}:{a.endpoint[1]}"})
        return False

    def _connect(self) -> None:
        try:
            add_peers(self.handle, list(self.opts.peers))
        except RuntimeError:
            pass  # still checking files; retried on torrent_checked_alert and while no peer is connected

    def _progress(self, st) -> dict:
        ev = {"event": "progress", "state": str(st.state), "done": st.total_wanted_done,
              "wanted": st.total_wanted, "download_rate": st.download_payload_rate,
              "upload_rate": st.upload_payload_rate, "peers": st.num_peers, "seeds": st.num_seeds,
              "pieces": st.num_pieces, "pieces_total": self.torrent.info.num_pieces() if self.torrent else 0,
              "downloaded": st.total_payload_download, "uploaded": st.all_time_upload}
        if st.num_peers == 0 or not self.torrent:
            tried = self.swarm.summary(self.handle, st.num_peers)
            ev["swarm"] = tried | {"text": self.swarm.describe(tried)}
        return ev

    def _flush(self, deadline: float = 30.0) -> None:
        """Wait until libtorrent has handed every downloaded byte to the OS, so verification reads it."""
        self.handle.flush_cache()
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.ses.wait_for_alert(200)
            if any(isinstance(a, lt.cache_flushed_alert) for a in self.ses.pop_alerts()):
                return

    def _save_resume(self, deadline: float = 10.0) -> None:
        """Write resume data for the next run; on any failure the next run simply re-checks."""
        h, ses = self.handle, self.ses
        if not (self.torrent and h and h.is_valid()):
            return
        h.save_resume_data(lt.save_resume_flags_t.flush_disk_cache | lt.save_resume_flags_t.save_info_dict)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            ses.wait_for_alert(200)
            for a in ses.pop_alerts():
                if isinstance(a, lt.save_resume_data_alert):
                    atomic_write_bytes(self.state / f"{self.source.key}.resume", lt.write_resume_data_buf(a.params))
                    return
                if isinstance(a, lt.save_resume_data_failed_alert):
                    return


_DONE_STATES = (lt.torrent_status.finished, lt.torrent_status.seeding)


class ByTensor:
    """A fetch that picks tensors: the small files whole, then the pieces the tensor map is read from
    (at the top priority, with deadlines), then the pieces of the chosen tensors; with --convert, each
    tensor is converted as soon as its last piece is on disk.

    A piece libtorrent has hashed may still wait in its store buffer, not yet in the file: a piece counts
    as on disk only once a cache flush asked for after it arrived has completed."""

    FLUSH_EVERY = 0.5  # s, while converting: how far the converter may lag behind the download

    def __init__(self, fetcher: Fetcher):
        self.opts, self.emit, self.torrent = fetcher.opts, fetcher.emit, fetcher.torrent
        self.root = self.torrent.root(self.opts.output)
        self.small = file_pieces(self.torrent, small_files(self.torrent))
        self.pm: PieceMap | None = None
        self.experts: tuple[int, ...] = ()
        self.names: list[str] = []
        self.wanted: set[int] = set()
        self.asked: set[int] = set()
        self.checked = False
        self.had: set[int] = set()  # on disk when this run began
        self.already_had = 0  # of the wanted bytes
        self.ondisk: set[int] = set()
        self.arrived: set[int] = set()  # hashed, not known to be on disk yet
        self.flushing: set[int] | None = None  # the pieces a flush in flight will put on disk
        self.last_flush = 0.0
        self.sink: StreamConvert | None = None
        self.waiting: dict[int, list[str]] = {}  # piece -> tensors to convert once it is on disk
        self.left: dict[str, set[int]] = {}

    @property
    def mapped(self) -> bool:
        return self.pm is not None

    def complete(self, h: lt.torrent_handle) -> bool:
        if self.pm is None:
            return False
        have = h.status(lt.status_flags_t.query_pieces).pieces
        return all(have[p] for p in self.wanted)

    def first_priorities(self) -> list[int]:
        """The small files, and the pieces the map will almost surely read first (one round, not four)."""
        guess = metadata_guess(self.torrent)
        return [7 if i in guess else 4 if i in self.small else 0 for i in range(self.torrent.info.num_pieces())]

    def on_checked(self, h: lt.torrent_handle) -> None:
        """What the check found is on disk."""
        have = h.status(lt.status_flags_t.query_pieces).pieces
        self.ondisk |= {i for i, b in enumerate(have) if b}
        self.had = set(self.ondisk)
        self.checked = True

    def on_piece(self, piece: int) -> None:
        self.arrived.add(piece)

    def on_flushed(self) -> None:
        if self.flushing is not None:
            landed, self.flushing = self.flushing, None
            self._landed(landed)

    def step(self, h: lt.torrent_handle) -> None:
        """Flush what arrived when it is needed; until the map is read, ask for what it needs next; then
        choose the tensors' pieces."""
        now = time.monotonic()
        if (self.checked and self.flushing is None and self.arrived and (self.pm is None or self.sink)
                and (self.pm is None or now - self.last_flush >= self.FLUSH_EVERY)):
            self.flushing, self.arrived, self.last_flush = self.arrived, set(), now
            h.flush_cache()
        if self.pm is not None or not self.checked or not self.small <= self.ondisk:
            return
        try:
            pm = map_release(self.root, self.torrent, self.ondisk.__contains__)
        except Absent as e:
            for p in sorted(pieces_of(self.torrent, e.ranges) - self.asked):
                h.piece_priority(p, 7)
                h.set_piece_deadline(p, 0)
                self.asked.add(p)
            return
        self.experts = self.opts.experts if self.opts.experts is not None else tuple(pm.experts)
        self.names = pm.tensors(self.experts)
        self.wanted = pm.wanted(self.experts)
        self.already_had = payload_bytes(self.torrent, self.wanted & self.had)
        h.prioritize_pieces([4 if i in self.wanted else 0 for i in range(self.torrent.info.num_pieces())])
        plen, total = self.torrent.info.piece_length(), self.torrent.info.total_size()
        self.emit({"event": "tensor_map", "tensors": len(self.names), "of": len(pm.layout.tensors),
                   "experts": list(self.experts), "layout": pm.layout.kind,
                   "wanted_size": sum(min(plen, total - p * plen) for p in self.wanted), "total_size": total})
        self.pm = pm
        if self.opts.convert is not None:
            self.sink = StreamConvert(pm.layout, self.opts.convert, ConvertOptions(experts=self.opts.experts))
            for name in self.sink.names:
                self.left[name] = pm.tensor_pieces[name] - self.ondisk
                for p in self.left[name]:
                    self.waiting.setdefault(p, []).append(name)
                if not self.left[name]:
                    self.sink.submit(name)

    def _landed(self, pieces: set[int]) -> None:
        self.ondisk |= pieces
        for piece in pieces:
            for name in self.waiting.pop(piece, []):
                self.left[name].discard(piece)
                if not self.left[name]:
                    self.sink.submit(name)

    def finish(self, h: lt.torrent_handle) -> None:
        """After the fetch's last flush: every piece it has is on disk (some may have no alert yet)."""
        have = h.status(lt.status_flags_t.query_pieces).pieces
        self._landed({i for i, b in enumerate(have) if b} - self.ondisk)
        if self.sink:
            manifest = self.sink.finish()
            self.emit({"event": "converted", "output": str(self.opts.convert), "files": len(manifest["files"]),
                       "tensors": len(manifest["tensors"]), "experts": list(self.experts)})

    def close(self) -> None:
        if self.sink:
            self.sink.close()

    def piece_findings(self, h: lt.torrent_handle) -> list[Finding]:
        """Per weight file: its wanted pieces, all passed their hash on arrival (the rest are holes)."""
        out = []
        for f in self.torrent.payload_files():
            if not is_weight_file(f.path):
                continue
            mine = file_pieces(self.torrent, [f.path]) & self.wanted
            have = sum(1 for p in mine if h.have_piece(p))
            ok = have == len(mine)
            out.append(Finding("pieces", f.path, ok, f"{have} of {len(mine)} wanted pieces here (of "
                               f"{len(file_pieces(self.torrent, [f.path]))}), each passed its hash on arrival"
                               if ok else f"incomplete: {have} of {len(mine)} wanted pieces"))
        return out

    def check(self) -> list[Finding]:
        """The structure of what is here: the chosen tensors located and their members' CRCs."""
        pm = self.pm
        ckpt = ", ".join(sorted(pm.files_of(list(pm.layout.tensors))))
        findings = [Finding("params", "params.json" if pm.layout.kind != "hf" else "config.json", True,
                            f"{len(pm.layout.tensors)} tensors match {ckpt}'s metadata")]
        return findings + check_selection(pm, self.names, self.experts)
