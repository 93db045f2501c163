"""The rules DEVELOPERS.md states, checked: ruff, the import layers, every module importable alone, and torch
absent from the commands that compute no tensor."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support import LOOPBACK, Daemon, place, run_ws

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]
FOLDERS = PYPROJECT["tool"]["setuptools"]["package-dir"]


def package_folder(package: str) -> Path:
    """Where a package's files are in this checkout, by the build configuration's package-dir."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FOLDERS:
            return ROOT / FOLDERS[".".join(parts[:n])] / Path(*parts[n:])
    raise AssertionError(f"{package} has no folder in package-dir")


def modules() -> list[str]:
    out = []
    for package in PACKAGES:
        out.append(package)
        out += [f"{package}.{p.stem}" for p in sorted(package_folder(package).glob("*.py")) if p.stem != "__init__"]
    return out


def test_every_folder_with_an_init_is_a_listed_package():
    listed = {package_folder(p).resolve() for p in PACKAGES}
    found = {p.parent.resolve() for folder in set(FOLDERS.values()) for p in (ROOT / folder).rglob("__init__.py")}
    assert found == listed


def test_ruff():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_layers(tmp_path):
    """import-linter's contracts (pyproject.toml) on the package as it is installed: one tree under
    weightswarm/, laid out from the build configuration (grimp reads a package from one folder)."""
    for package in PACKAGES:
        dest = tmp_path / Path(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for p in package_folder(package).glob("*.py"):
            shutil.copy(p, dest / p.name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


IMPORT_ALONE = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "weightswarm" or m.startswith("weightswarm.")]:
        del sys.modules[m]  # each module starts from nothing of ours, as in a fresh interpreter
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""


def test_every_module_imports_alone():
    """No module needs another to be imported first (a cycle shows up as 'partially initialized')."""
    r = subprocess.run([sys.executable, "-c", IMPORT_ALONE, *modules()], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


# Runs a weightswarm command in this interpreter and says, when it exits (also by SIGTERM), whether torch
# was ever imported.
TORCH_PROBE = """
import atexit, sys
flag = sys.argv[1]
atexit.register(lambda: open(flag, "w").write(str("torch" in sys.modules)))
from weightswarm.cli import main
sys.argv = ["weightswarm", *sys.argv[2:]]
main()
"""


def probe(flag: Path) -> list[str]:
    return [sys.executable, "-c", TORCH_PROBE, str(flag)]


def run_probed(tmp_path, *args, timeout=120) -> tuple[subprocess.CompletedProcess, bool]:
    flag = tmp_path / "torch-imported"
    r = subprocess.run([*probe(flag), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return r, flag.read_text() == "True"


def test_torch_free_commands_never_import_torch(tmp_path, release_copy, tiny_torrent, converted, nodes):
    manifest = tmp_path / "release.manifest.json"
    for args in (["verify", release_copy, "--torrent", tiny_torrent],  # pieces, checksums, structure, params
                 ["manifest", release_copy, "-o", manifest, "--tensors"],
                 ["verify", release_copy, "--manifest", manifest],
                 ["verify", converted, "--manifest", converted / "manifest.json", "--source", release_copy],
                 ["create", converted, "-o", tmp_path / "experts.torrent"],
                 ["catalog", "--json"]):
        r, torch_imported = run_probed(tmp_path, *args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        assert not torch_imported, args

    # fetch (with --experts) from a seeder; the seeder itself stops by SIGTERM and reports on exit
    flag = tmp_path / "seed-torch"
    seed = nodes("seed", converted, "--torrent", tmp_path / "experts.torrent", *LOOPBACK, "--json",
                 prefix=probe(flag))
    r, torch_imported = run_probed(tmp_path, "fetch", tmp_path / "experts.torrent", "-o", tmp_path / "node",
                                   "--experts", "1", "--peer", f"127.0.0.1:{seed.port}", *LOOPBACK, "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not torch_imported
    assert seed.stop(signal.SIGTERM) == 0
    assert flag.read_text() == "False"


def test_the_daemon_scrubs_a_manifest_without_torch(tmp_path, converted, nodes):
    from weightswarm.distrib.create import write_torrent

    data = tmp_path / "data"
    root = place(converted, data)
    torrent = write_torrent(root, tmp_path / "experts.torrent")
    flag = tmp_path / "daemon-torch"
    d = Daemon(lambda *a: nodes(*a, prefix=probe(flag)), data, tmp_path / "state")
    assert d.add((tmp_path / "experts.torrent").read_bytes())[0] == 201
    d.event("seeding", torrent.info_hash)
    assert d.request("POST", f"/v1/torrents/{torrent.info_hash}/scrub")[0] == 202
    finished = d.event("scrub_finished", torrent.info_hash)
    assert finished["ok"] and finished["manifest_mismatches"] == []
    assert d.node.stop(signal.SIGTERM) == 0
    assert flag.read_text() == "False"


@pytest.mark.parametrize("command", ["verify", "fetch", "daemon"])
def test_help_shows_defaults_and_metavars_as_users_type_them(command):
    r = run_ws(command, "--help")
    assert r.returncode == 0
    assert "TEXT" not in r.stdout and "INTEGER" not in r.stdout and "FLOAT" not in r.stdout, r.stdout
    if command == "daemon":
        assert "[default: 7d]" in r.stdout and "[default: 64MiB]" in r.stdout and "[default: 16MiB]" in r.stdout
