"""fileproxy as installed with pip, run outside the checkout; examples/ kept in step with Config."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from packaging.requirements import Requirement

from fileproxy import example_config
from fileproxy.cli import parse_args
from fileproxy.config import SETTINGS, Config, values_from_file
from tests.conftest import ROOT, free_port, stop, wait_for_http
from tests.pattern import pattern_sha256

EXAMPLE_TOML = ROOT / "examples" / "fileproxy.toml"
EXAMPLE_UNIT = ROOT / "examples" / "fileproxy.service"
SOURCES = ("fileproxy", "setup.cfg", "pyproject.toml", "README.md")  # what `pip install .` reads
BODY = 16 * 1024 * 1024
SETTING_LINE = re.compile(r"#(?P<name>[a-z0-9_]+) = ")  # a setting in the example, commented out


# ---------------------------------------------------------------- a pip install of the checkout

def copy_sources(destination: Path) -> Path:
    """The package's sources, so pip builds in a scratch copy and never writes into the checkout."""
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, destination / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, destination / name)
    return destination


def this_environment_can_build() -> bool:
    """Whether this environment has pyproject.toml's build requirements: then pip builds with
    them, offline (--no-build-isolation); else it fetches just those into a build environment."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    for requirement in map(Requirement, build["requires"]):
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(version, prereleases=True):
            return False
    return True


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([python, "-c", code], check=True, capture_output=True,
                               text=True).stdout.strip())


def make_venv(venv: Path) -> Path:
    """A venv of this interpreter that sees this environment's packages (a .pth file), so
    fileproxy's dependencies are not downloaded again; its own site-packages comes first."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages(python) / "test-parent-env.pth").write_text("\n".join(ours) + "\n")
    return python


def pip_install(python: Path, source: Path) -> None:
    """Not editable, no dependencies (they come through the .pth), nothing uninstalled from
    the parent environment (--ignore-installed)."""
    offline = ["--no-build-isolation", "--no-index"] if this_environment_can_build() else []
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
                    "--disable-pip-version-check", "--root-user-action=ignore", *offline,
                    source], check=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with fileproxy pip-installed from a copy of the checkout: the venv's path."""
    base = tmp_path_factory.mktemp("install")
    source = copy_sources(base / "source")
    venv = base / "venv"
    pip_install(make_venv(venv), source)
    shutil.rmtree(source)  # the installed copy must not need it
    return venv


def clean_env() -> dict[str, str]:
    """This environment without what could point Python or fileproxy elsewhere."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "PROMETHEUS_MULTIPROC_DIR", "FILEPROXY_OWNS_METRICS_DIR")
    return {name: value for name, value in os.environ.items()
            if name not in dropped and not name.startswith("FILEPROXY_")}


def package_location(venv: Path, cwd: Path) -> Path:
    code = "import fileproxy; print(fileproxy.__file__)"
    return Path(subprocess.run([venv / "bin" / "python", "-c", code], cwd=cwd, env=clean_env(),
                               check=True, capture_output=True, text=True).stdout.strip())


def body_digest(url: str) -> tuple[str, int]:
    digest, length = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


@pytest.fixture
def running(installed: Path, origin_process: str, tmp_path: Path) -> Iterator[tuple[str, psutil.Popen]]:
    """`fileproxy serve` of the installed venv, started in an empty directory: its URL, process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [installed / "bin" / "fileproxy", "serve", "--config", EXAMPLE_TOML, "--upstream",
            origin_process, "--bind", f"127.0.0.1:{port}", "--workers", "2", "--no-access-log"]
    with open(tmp_path / "fileproxy.log", "wb") as log:
        process = psutil.Popen(args, cwd=tmp_path, env=clean_env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"{url}/_fileproxy/health", process)
        yield url, process
    finally:
        stop(process)


def test_pip_installed_copy_is_in_its_venv(installed: Path, tmp_path: Path):
    location = package_location(installed, tmp_path)
    assert location.is_relative_to(installed), location
    assert not location.is_relative_to(ROOT), location


def test_installed_serve_runs_outside_the_checkout(running: tuple[str, psutil.Popen],
                                                   tmp_path: Path):
    """No gunicorn.conf.py where it runs: the settings come from the installed package. A body
    arrives byte-exact; SIGTERM stops the master, its workers and its private redis-server."""
    url, process = running
    assert body_digest(f"{url}/bytes/{BODY}") == (pattern_sha256(BODY), BODY)
    children = process.children(recursive=True)
    assert children, "gunicorn runs its workers"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    output = (tmp_path / "fileproxy.log").read_text()
    assert "Traceback" not in output and "ERROR" not in output, output


def test_plain_gunicorn_with_the_checkout_conf_still_serves(origin_process: str):
    """gunicorn.conf.py, the documented deployment file, star-imports the package's settings."""
    port = free_port()
    env = {**clean_env(), "FILEPROXY_UPSTREAM": origin_process, "FILEPROXY_WORKERS": "1",
           "FILEPROXY_BIND": f"127.0.0.1:{port}", "FILEPROXY_ACCESS_LOG": "false"}
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                               cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/_fileproxy/health", process)
        assert body_digest(f"http://127.0.0.1:{port}/bytes/{1 << 20}") == (pattern_sha256(1 << 20),
                                                                          1 << 20)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        stop(process)


# ---------------------------------------------------------------- examples/

def test_example_config_is_what_the_generator_writes():
    assert EXAMPLE_TOML.read_text() == example_config.render(), \
        "run: python -m fileproxy.example_config > examples/fileproxy.toml"


def uncommented(text: str, names: set[str] | None = None) -> str:
    """The example with the `#name = value` lines of `names` (default: all) made settings."""
    lines = []
    for line in text.splitlines(keepends=True):
        match = SETTING_LINE.match(line)
        lines.append(line[1:] if match and (names is None or match["name"] in names) else line)
    return "".join(lines)


def test_example_config_shows_every_setting_with_its_default(tmp_path: Path):
    """Every line uncommented still loads, and gives the defaults (but for the few the example
    shows an example value of: upstream, and those that depend on the machine)."""
    path = tmp_path / "all.toml"
    path.write_text(uncommented(EXAMPLE_TOML.read_text()))
    values = values_from_file(str(path))
    assert set(values) == set(SETTINGS)
    loaded, defaults = Config(**values), Config(upstream=values["upstream"])
    for name in set(SETTINGS) - set(example_config.EXAMPLES):
        assert getattr(loaded, name) == getattr(defaults, name), name
    assert loaded.upstream == example_config.EXAMPLES["upstream"][0]


def test_cli_loads_the_example_config(tmp_path: Path):
    """As it is, with an upstream given; and with just its upstream line uncommented."""
    command, config = parse_args(["--config", str(EXAMPLE_TOML), "--upstream", "http://10.9.9.9"])
    assert (command, config.upstream) == ("serve", ("http://10.9.9.9",))
    path = tmp_path / "fileproxy.toml"
    path.write_text(uncommented(EXAMPLE_TOML.read_text(), {"upstream"}))
    _, config = parse_args(["dev", "--config", str(path)])
    assert config.upstream == example_config.EXAMPLES["upstream"][0]


def unit_settings() -> dict[str, str]:
    lines = EXAMPLE_UNIT.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Za-z]+=", line))


def test_systemd_unit_waits_out_graceful_stop():
    unit = unit_settings()
    assert unit["ExecStart"].split()[1:] == ["serve", "--config", "/etc/fileproxy/fileproxy.toml"]
    assert int(unit["TimeoutStopSec"]) > SETTINGS["graceful_timeout"].default
    assert (unit["KillSignal"], unit["KillMode"]) == ("SIGTERM", "mixed")


def test_systemd_unit_verifies(installed: Path, tmp_path: Path):
    """systemd-analyze verify, its ExecStart pointed at the installed binary (which must exist)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "fileproxy.service"
    unit.write_text(EXAMPLE_UNIT.read_text().replace("/usr/local/bin/fileproxy",
                                                     str(installed / "bin" / "fileproxy")))
    result = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
