"""Daemon configuration: one set of defaults, overridden by the TOML file, then the environment, then the CLI;
and the helpers that keep its paths under --data and its token private."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from weightswarm.core.errors import Forbidden, InputError, OptionError
from weightswarm.distrib.daemon.config import DEFAULTS, DaemonConfig, load_config
from weightswarm.distrib.daemon.state import read_or_create_token
from weightswarm.distrib.daemon.torrents import PathGuard


def test_defaults_then_file_then_environment_then_command_line(tmp_path):
    assert load_config({}, env={}) == (DaemonConfig(), frozenset())
    toml = tmp_path / "ws.toml"
    toml.write_text('data = "/srv/weights"\napi = "127.0.0.1:9000"\nscrub-interval = "1h"\n'
                    'max_upload_rate = "10m"\ndht = false\nmax_connections = 50\n')
    cfg, given = load_config({}, toml, env={})
    assert given == {"data", "api", "scrub_interval", "max_upload_rate", "dht", "max_connections"}
    assert (cfg.data, cfg.api, cfg.scrub_interval, cfg.max_upload_rate, cfg.dht, cfg.max_connections) == \
        (Path("/srv/weights"), "127.0.0.1:9000", 3600.0, 10 * 1024 ** 2, False, 50)
    assert cfg.listen == DEFAULTS.listen
    env = {"WEIGHTSWARM_API": "127.0.0.1:9001", "WEIGHTSWARM_DHT": "yes", "WEIGHTSWARM_CONFIG": str(toml)}
    cfg, _ = load_config({"api": None, "scrub_rate": "1m"}, env=env)  # the file named by the environment
    assert (cfg.api, cfg.dht, cfg.scrub_interval, cfg.scrub_rate) == ("127.0.0.1:9001", True, 3600.0, 1024 ** 2)
    cfg, _ = load_config({"api": "127.0.0.1:9002", "dht": False}, toml, env=env)
    assert (cfg.api, cfg.dht, cfg.data) == ("127.0.0.1:9002", False, Path("/srv/weights"))
    assert DaemonConfig(state=Path("/s")).token_path == Path("/s/api-token")
    assert DaemonConfig(state=Path("/s"), token_file=Path("/t")).token_path == Path("/t")


def test_bad_settings_name_where_they_came_from(tmp_path):
    toml = tmp_path / "ws.toml"
    toml.write_text("scrub_speed = 1\n")
    with pytest.raises(InputError, match="unknown setting 'scrub_speed'"):
        load_config({}, toml, env={})
    toml.write_text("data = \n")
    with pytest.raises(InputError, match="not a valid TOML file"):
        load_config({}, toml, env={})
    with pytest.raises(OptionError) as e:
        load_config({}, env={"WEIGHTSWARM_MAX_UPLOAD_RATE": "fast"})
    assert (e.value.option, e.value.value, e.value.path) == ("WEIGHTSWARM_MAX_UPLOAD_RATE", "fast", "")
    with pytest.raises(OptionError) as e:
        load_config({"api": "localhost"}, env={})
    assert e.value.option == "--api"
    with pytest.raises(OptionError) as e:  # a unit that is not one: said plainly, not as a float parse error
        load_config({"scrub_interval": "7x"}, env={})
    assert e.value.subject == "--scrub-interval 7x" and e.value.problem.startswith("not a duration")
    with pytest.raises(InputError, match="missing: give --data"):
        load_config({}, env={})[0].require_dirs()


def test_token_is_created_private_once(tmp_path):
    path = tmp_path / "state" / "api-token"
    token = read_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_token(path) == token


def test_save_paths_stay_under_data(tmp_path):
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    os.symlink(tmp_path, data / "up")
    guard = PathGuard(data)
    assert guard.confine_save_path("models/") == "models"
    assert guard.confine_save_path("") == guard.confine_save_path(".") == ""
    assert guard.confine_save_path("up/data/models") == "models"  # a detour that ends inside is fine
    assert guard.confine_save_path(str(data / "models")) == "models"  # absolute inside --data too
    assert guard.confine_save_path(str(data.resolve())) == ""
    for bad in ("..", "models/../..", "/etc", str(tmp_path), "up", "up/x", "models\\..\\.."):
        with pytest.raises(Forbidden):
            guard.confine_save_path(bad)
