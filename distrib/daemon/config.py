"""The daemon's configuration: one frozen dataclass holds every default; a TOML file, WEIGHTSWARM_*
environment variables and command-line options override it, in that order.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightswarm.core.errors import InputError, OptionError
from weightswarm.core.inputs import read_regular
from weightswarm.core.units import check_limit, parse_bytes, parse_duration
from weightswarm.distrib.session import parse_endpoint

ENV_PREFIX = "WEIGHTSWARM_"


@dataclass(frozen=True)
class DaemonConfig:
    """Every option of ``weightswarm daemon``; the field's default is the one default."""

    data: Path | None = None  # root of all data paths (required to run)
    state: Path | None = None  # registry, .torrent files, resume data (required to run)
    api: str = "127.0.0.1:8765"  # HTTP API and web seed
    listen: str = "0.0.0.0:6881"  # BitTorrent peers
    dht: bool = True  # DHT and local peer discovery
    token_file: Path | None = None  # default: STATE/api-token
    max_upload_rate: int = 0  # bytes/s for the whole daemon, 0 = unlimited
    max_download_rate: int = 0
    max_connections: int = 200
    distinct_pieces: bool = True  # serve so that each piece leaves about once (distrib.session.DISTINCT_PIECES)
    torrent_max_upload_rate: int = 0  # default limits of each torrent (the API can set others per torrent)
    torrent_max_download_rate: int = 0
    torrent_max_connections: int = 0  # 0 = only the daemon's limit
    resume_interval: float = 300.0  # seconds between resume data saves
    scrub_interval: float = 7 * 86400.0  # seconds between scrubs of a torrent, 0 = only on request
    scrub_rate: int = 64 * 1024 * 1024  # bytes/s a scrub reads, 0 = unlimited
    max_body: int = 16 * 1024 * 1024  # largest API request body
    log_level: str = "info"

    @property
    def token_path(self) -> Path:
        if self.token_file is not None:
            return self.token_file
        if self.state is None:
            raise InputError("--token-file", "no token file: give --token-file or --state")
        return self.state / "api-token"

    def require_dirs(self) -> None:
        """Running the daemon (not talking to one) needs both folders."""
        for name in ("data", "state"):
            if getattr(self, name) is None:
                raise InputError(f"--{name}", f"missing: give --{name} DIR, `{name} = ...` in the config file "
                                 f"or {ENV_PREFIX}{name.upper()}")
        if not self.data.is_dir():
            raise InputError(self.data, "data folder does not exist")


FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}
DEFAULTS = DaemonConfig()


def load_config(cli: Mapping[str, Any], config_file: str | os.PathLike | None = None,
                env: Mapping[str, str] = os.environ) -> tuple[DaemonConfig, frozenset[str]]:
    """defaults < TOML file < environment < CLI; ``cli`` values that are None were not given.
    Returns the config and the names of the settings given anywhere (the rest are defaults)."""
    values: dict[str, Any] = {}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        for key, value in _read_toml(Path(config_file)).items():
            values[key] = _convert(key, value, f"{config_file}: {key}")
    for name in FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _convert(name, env[var], var)
    for name, value in cli.items():
        if value is not None:
            values[name] = _convert(name, value, "--" + name.replace("_", "-"))
    return DaemonConfig(**values), frozenset(values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(read_regular(path, 1 << 20, "config file").decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not a valid TOML file: {e}") from None
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise InputError(path, f"unknown setting {key!r}", hint="settings: " + ", ".join(FIELDS))
        out[name] = value
    return out


def _convert(name: str, value: Any, where: str) -> Any:
    """A value from TOML, the environment or click, as the field's type."""
    kind = FIELDS[name].type
    try:
        if "Path" in kind:
            return Path(os.path.expanduser(str(value)))
        if kind == "bool":
            return _bool(value)
        if kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                n = value
            else:
                n = parse_bytes(str(value), where) if name.endswith(("_rate", "_body")) else _whole(value)
            if name.endswith(("_rate", "_connections")):
                check_limit(name, n)
            elif n < 0:
                raise ValueError("must not be negative")
            return n
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("not a duration")
            return parse_duration(str(value), where)
        if name in ("api", "listen"):
            parse_endpoint(str(value), where)
        if name == "log_level" and str(value).lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("not one of debug, info, warning, error")
        return str(value)
    except OptionError as e:
        raise OptionError(where, value, e.problem) from None
    except (ValueError, InputError) as e:
        raise OptionError(where, value, getattr(e, "problem", str(e))) from None


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (true/false)")


def _whole(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError("not a whole number") from None
