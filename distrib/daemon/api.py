"""The daemon's HTTP API (aiohttp): /v1 JSON routes, /healthz, /metrics and the BEP 19 web seed.

Every /v1 route needs ``Authorization: Bearer <token>``; /healthz, /metrics and /seed do not (web seeds
cannot send a token; they serve only what the daemon has verified). Errors are JSON: ``{"error", "status"}``.
The routes are described in openapi.yaml.
"""
from __future__ import annotations

import hmac
import logging
import socket
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from weightswarm.core.errors import Conflict, Forbidden, InputError, NotFound
from weightswarm.core.units import check_limit
from weightswarm.distrib.session import parse_endpoint

if TYPE_CHECKING:
    from weightswarm.distrib.daemon.daemon import Daemon

log = logging.getLogger("weightswarm.api")
DAEMON = web.AppKey("daemon", object)
REGISTRY = web.AppKey("registry", CollectorRegistry)
STATUS_OF = ((Forbidden, 403), (NotFound, 404), (Conflict, 409), (InputError, 400))


def json_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


@web.middleware
async def guard(request: web.Request, handler):
    """Authentication and body size first, then every error as JSON with its status code."""
    d: Daemon = request.app[DAEMON]
    if request.path.startswith("/v1/") and not _authorized(request, d.token):
        return json_error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    if (request.content_length or 0) > d.cfg.max_body:
        return json_error(413, f"request body over {d.cfg.max_body} bytes")
    try:
        return await handler(request)
    except web.HTTPException as e:  # no such route, wrong method, body over client_max_size
        if e.status < 400:
            raise
        return json_error(e.status, e.reason, {k: v for k, v in e.headers.items() if k in ("Allow",)})
    except InputError as e:
        status = next(code for cls, code in STATUS_OF if isinstance(e, cls))
        return json_error(status, f"{e.subject}: {e.problem}")
    except Exception:
        log.exception("%s %s", request.method, request.path)
        return json_error(500, "internal error (see the daemon's log)")


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # surrogateescape: a header of arbitrary bytes is simply a wrong token, not a crash.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                              token.encode())


async def list_torrents(request: web.Request) -> web.Response:
    return web.json_response({"torrents": [m.status() for m in request.app[DAEMON].torrents.values()]})


async def get_torrent(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].lookup(request.match_info["id"]).status())


async def add_torrent(request: web.Request) -> web.Response:
    """multipart/form-data: ``torrent`` (file) or ``magnet``; ``save_path``; optional per-torrent limits."""
    try:
        form = await request.post()
    except web.HTTPException:
        raise  # a body over --max-body: 413
    except Exception as e:  # aiohttp's parsers raise whatever a malformed body makes them: the client's error
        raise InputError("body", f"not a valid form: {type(e).__name__}: {str(e)[:200]}") from None
    field = form.get("torrent")
    if field is not None and not isinstance(field, web.FileField):
        raise InputError("torrent", "must be a file upload (multipart/form-data)")

    def text(key: str) -> str:
        value = form.get(key)
        if isinstance(value, web.FileField):
            raise InputError(key, "must be a text field, not a file")
        return value or ""

    limits = {}
    for key in ("upload_rate", "download_rate", "max_connections"):
        if text(key):
            try:
                limits[key] = check_limit(key, int(text(key)))
            except ValueError:
                raise InputError(key, f"not a whole number: {text(key)!r:.40}") from None
    status = await request.app[DAEMON].add(field.file.read() if field is not None else None,
                                           text("magnet") or None, text("save_path"), limits)
    return web.json_response(status, status=201)


async def delete_torrent(request: web.Request) -> web.Response:
    delete_data = request.query.get("delete_data", "false").lower() in ("1", "true", "yes")
    return web.json_response(await request.app[DAEMON].remove(request.match_info["id"], delete_data))


async def scrub_torrent(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].request_scrub(request.match_info["id"]), status=202)


async def recheck_torrent(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].recheck(request.match_info["id"]), status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].health())


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def web_seed(request: web.Request) -> web.StreamResponse:
    """BEP 19: ``/seed/{infohash}/{name}/{path}``; only pieces the daemon has verified are served."""
    d: Daemon = request.app[DAEMON]
    m = d.lookup(request.match_info["infohash"])
    if m.torrent is None:
        raise NotFound(m.entry.id, "metadata not known yet")
    name, _, rest = request.match_info["tail"].partition("/")
    if name in ("..", "."):
        raise Forbidden(name, "path escapes the torrent's folder")
    if name != m.torrent.name:
        raise NotFound(name, "not this torrent's name")
    path, f = d.paths.file(m.torrent, m.entry.save_path, rest)
    try:
        rng = request.http_range
    except ValueError:
        rng = slice(None, None)  # FileResponse answers a malformed range itself
    start = rng.start or 0
    start = max(0, f.size + start) if start < 0 else start  # a suffix longer than the file means all of it
    stop = min(f.size, rng.stop if rng.stop is not None else f.size)
    pieces = m.pieces_of(f.offset + start, max(0, stop - start))
    if not m.serves(pieces) or (m.lazy and not await d.verify_for_upload(m, pieces)):
        return json_error(503, "those pieces are not verified here (missing, being checked or repaired)",
                          {"Retry-After": "60"})
    return web.FileResponse(path, headers={"Cache-Control": "no-store"})


class _Metrics:
    """Collected at scrape time from the daemon's own state, so the numbers agree with the status API."""

    def __init__(self, daemon: Daemon):
        self.d = daemon

    def collect(self):
        d, labels = self.d, ["id", "name"]
        states = GaugeMetricFamily("weightswarm_torrents", "Registered torrents by state", labels=["state"])
        for state, n in d.health()["states"].items():
            states.add_metric([state], n)
        per = {
            "up": CounterMetricFamily("weightswarm_uploaded_bytes", "Payload bytes uploaded", labels=labels),
            "down": CounterMetricFamily("weightswarm_downloaded_bytes", "Payload bytes downloaded", labels=labels),
            "peers": GaugeMetricFamily("weightswarm_peers", "Connected peers", labels=labels),
            "hf": CounterMetricFamily("weightswarm_hash_failures", "Downloaded pieces that failed their hash",
                                      labels=labels),
            "bad": GaugeMetricFamily("weightswarm_bad_pieces", "Corrupt pieces found by scrubs, not yet fetched again",
                                     labels=labels),
        }
        for m in d.torrents.values():
            s, lv = m.status(), [m.entry.id, m.name]
            for key, value in (("up", s["uploaded"]), ("down", s["downloaded"]), ("peers", s["peers"]),
                               ("hf", s["hash_failures"]), ("bad", len(s["bad_pieces"]))):
                per[key].add_metric(lv, value)
        scrubs = CounterMetricFamily("weightswarm_scrubs", "Finished scrubs by result", labels=["result"])
        for result in ("ok", "corrupt", "error"):
            scrubs.add_metric([result], d.counters[f"scrubs_{result}"])
        yield states
        yield from per.values()
        yield scrubs
        for key, help_ in (("scrub_bytes", "Bytes read by scrubs"),
                           ("scrub_bad_pieces", "Corrupt pieces found by scrubs"),
                           ("scrub_manifest_mismatches", "Files whose blake3 differed from manifest.json"),
                           ("resume_failures", "Resume data saves that failed")):
            yield CounterMetricFamily(f"weightswarm_{key}", help_, value=d.counters[key])


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=daemon.cfg.max_body)
    app[DAEMON] = daemon
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(daemon))
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/torrents", list_torrents)
    app.router.add_post("/v1/torrents", add_torrent)
    app.router.add_get("/v1/torrents/{id}", get_torrent)
    app.router.add_delete("/v1/torrents/{id}", delete_torrent)
    app.router.add_post("/v1/torrents/{id}/scrub", scrub_torrent)
    app.router.add_post("/v1/torrents/{id}/recheck", recheck_torrent)
    app.router.add_get("/seed/{infohash}/{tail:.+}", web_seed)
    return app


async def start_api(daemon: Daemon) -> tuple[web.AppRunner, str]:
    """Serve the API on the configured address; returns the runner and the base URL (with the real port)."""
    host, port = parse_endpoint(daemon.cfg.api, "--api")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise InputError(daemon.cfg.api, f"cannot listen: {e.strerror or e}") from None
    runner = web.AppRunner(make_app(daemon), handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    return runner, f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
