"""The daemon's API refuses what it must: no token (401), paths outside --data (403), big bodies (413),
malformed input (400); and the web seed never serves a byte outside the torrent's files."""
from __future__ import annotations

import os
import stat

import libtorrent as lt
import pytest

from tests.support import Daemon, place


@pytest.fixture
def daemon(nodes, tiny_release, tiny_torrent, tmp_path):
    data = tmp_path / "data"
    place(tiny_release, data / "rel")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("not for the web\n")
    return Daemon(nodes, data, tmp_path / "state", "--max-body", "64k")


def test_token_file_is_private_and_required(daemon, tiny_torrent):
    assert stat.S_IMODE((daemon.state / "api-token").stat().st_mode) == 0o600
    for token in (None, "wrong"):
        code, body, headers = daemon.request("GET", "/v1/torrents", token=token)
        assert code == 401 and body["status"] == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert daemon.add(tiny_torrent.read_bytes(), "rel", token=token)[0] == 401
        assert daemon.request("DELETE", "/v1/torrents/" + "0" * 40, token=token)[0] == 401
    assert daemon.request("GET", "/healthz", token=None)[0] == 200  # open: no secrets in it
    assert daemon.request("GET", "/v1/torrents")[1] == {"torrents": []}


def test_save_paths_outside_data_are_forbidden(daemon, tiny_release, tiny_torrent, tmp_path):
    torrent = tiny_torrent.read_bytes()
    os.symlink(tmp_path / "outside", daemon.data / "link-out")
    os.symlink(tiny_release.parent, daemon.data / "release-link")  # the payload itself lies outside
    for save_path in ("..", "../outside", "rel/../..", str(tmp_path / "outside"), "/etc", "link-out",
                      "release-link"):
        code, body = daemon.add(torrent, save_path)
        assert code == 403, (save_path, body)
        assert body["status"] == 403 and "error" in body
    assert daemon.request("GET", "/v1/torrents")[1] == {"torrents": []}


def test_malformed_input_and_big_bodies(daemon, tiny_torrent):
    good = tiny_torrent.read_bytes()
    info = lt.bdecode(good)[b"info"]
    escaping = lt.bencode({b"info": {**info, b"name": b".."}})
    for torrent, magnet in ((b"not a torrent", None), (good[:200], None), (escaping, None),
                            (None, "magnet:?xt=urn:btih:nothex"), (None, None)):
        code, body = daemon.add(torrent, "rel", magnet=magnet)
        assert code == 400 and body["status"] == 400 and body["error"], body
    code, body = daemon.add(b"x" * (65 * 1024), "rel")
    assert code == 413 and body["status"] == 413
    code, body, _ = daemon.request("POST", "/v1/torrents", b"torrent=abc",
                                   {"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 400 and "file upload" in body["error"]
    assert daemon.request("GET", "/v1/torrents/" + "ab" * 20)[0] == 404
    assert daemon.request("GET", "/v1/nothing")[0] == 404


def test_add_conflict_remove_and_remove_with_data(daemon, tiny_torrent):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    assert daemon.add(tiny_torrent.read_bytes(), "rel")[0] == 201
    assert daemon.add(tiny_torrent.read_bytes(), "rel")[0] == 409
    code, body, _ = daemon.request("DELETE", f"/v1/torrents/{t.v2}")  # either info-hash names it
    assert code == 200 and body == {"id": t.info_hash, "removed": True, "data_deleted": False}
    assert daemon.request("GET", f"/v1/torrents/{t.info_hash}")[0] == 404
    assert (daemon.data / "rel" / t.name / "params.json").exists()
    assert daemon.add(tiny_torrent.read_bytes(), "rel")[0] == 201
    daemon.event("resume_saved", t.info_hash)
    code, body, _ = daemon.request("DELETE", f"/v1/torrents/{t.info_hash}?delete_data=true")
    assert code == 200 and body["data_deleted"] is True
    assert daemon.until(lambda: not (daemon.data / "rel" / t.name / "params.json").exists())
    assert not list((daemon.state / "torrents").iterdir())


def test_web_seed_stays_inside_the_torrent(daemon, tiny_torrent, tmp_path):
    from weightswarm.distrib.torrentfile import load_torrent

    t = load_torrent(tiny_torrent)
    assert daemon.add(tiny_torrent.read_bytes(), "rel")[0] == 201
    daemon.event("seeding", t.info_hash)
    base = f"/seed/{t.info_hash}/{t.name}"
    assert daemon.request("GET", f"{base}/params.json", token=None)[0] == 200
    for path in (f"{base}/../../../outside/secret", f"{base}/%2e%2e/%2e%2e/%2e%2e/outside/secret",
                 f"/seed/{t.info_hash}/%2e%2e/outside/secret", f"{base}/..%2F..%2F..%2Foutside%2Fsecret"):
        code, body, _ = daemon.request("GET", path, token=None)
        assert code == 403, (path, code, body)
    for path in (f"{base}/RELEASE.orig", f"/seed/{t.info_hash}/other-name/params.json", f"/seed/{'0' * 40}/x/y"):
        code, body, _ = daemon.request("GET", path, token=None)
        assert code == 404, (path, code, body)
    # A file of the torrent swapped for a symlink out of --data is refused too.
    target = daemon.data / "rel" / t.name / "params.json"
    target.unlink()
    os.symlink(tmp_path / "outside" / "secret", target)
    code, body, _ = daemon.request("GET", f"{base}/params.json", token=None)
    assert code == 403 and b"not for the web" not in str(body).encode()


def test_openapi_file_describes_every_route():
    import types
    from pathlib import Path

    import yaml

    from weightswarm.distrib.daemon.api import make_app
    from weightswarm.distrib.daemon.config import DaemonConfig

    spec = yaml.safe_load((Path(__file__).parent.parent / "openapi.yaml").read_text())
    documented = {(method.upper(), path.replace("{path}", "{tail}")) for path, ops in spec["paths"].items()
                  for method in ops if method != "parameters"}
    app = make_app(types.SimpleNamespace(cfg=DaemonConfig()))
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    assert documented == served
