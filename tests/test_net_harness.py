"""The bad-network harness's own plumbing: namespaces, the TUN delay line, and clean-up.

Needs root, `ip` and /dev/net/tun; skipped otherwise. Builds the topology for a few seconds with the
lan profile and with an impaired one, checks the measured RTT and loss against the configured ones,
and that no namespace, device or process is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from benchmarks.net import LAN, Run, verify_links
from benchmarks.topology import Topology, kernel_has_netem

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun")

IMPAIRED = {"rtt_ms": 60, "jitter_ms": 10, "rate_mbit": 20, "loss": 0.05, "concurrency": 10}
RATE_ONLY = {"rtt_ms": 0, "jitter_ms": 0, "rate_mbit": 20, "loss": 0.0, "concurrency": 10}


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


NETEM = pytest.mark.skipif(not kernel_has_netem(), reason="this kernel has no netem qdisc")


@pytest.mark.parametrize(("profile", "emulation"), [
    (LAN | {"concurrency": 10}, "tun"), (IMPAIRED, "tun"),
    (RATE_ONLY, "tbf"), pytest.param(IMPAIRED, "netem", marks=NETEM)],
    ids=["lan-tun", "impaired-tun", "rate-tbf", "impaired-netem"])
def test_links_measure_as_configured_and_nothing_is_left_behind(profile, emulation):
    """The user-space delay line (tun), and the kernel path (veth + ifb on each receiver's
    ingress): with netem where the kernel has it, with a tbf rate limit everywhere (ours has no
    netem, so tbf is what shows that plumbing works here)."""
    before = namespaces()
    run = Run("test", profile, {"queue_ms": 100}, "client", quick=True)
    with Topology(emulation=emulation) as topology:
        topology.build(run.netem_spec("client"), run.netem_spec("origin"),
                       {"client": "cubic", "proxy": "cubic", "origin": "cubic"})
        assert {topology.client, topology.proxy, topology.origin} <= namespaces()
        emulator_pid = topology.emulator.pid if topology.emulator else None
        checks, valid = verify_links(topology, run)
        emulator = topology.emulator_stats()
    by_name = {c["check"]: c for c in checks}
    assert valid, checks
    rtt = by_name["client link RTT ms"]["measured"]
    assert abs(rtt - profile["rtt_ms"]) <= 0.2 * profile["rtt_ms"] + 2
    if profile["loss"] and emulation == "tun":
        assert emulator["tc0->tp0"]["lost"] > 0 and emulator["tp0->tc0"]["lost"] > 0
    if emulation != "tun":
        shaped = [stats for device, stats in emulator.items() if device.endswith("tc0i")]
        assert shaped and f"qdisc {emulation}" in shaped[0], emulator
    assert namespaces() == before
    assert emulator_pid is None or not alive(emulator_pid)


def test_refuses_clearly_without_root():
    """`bench net` run by an ordinary user stops with one line. The user (nobody) gets a
    world-readable copy of what the harness imports before it checks, since the checkout may sit
    in a directory only root can enter (a clone under /root or in `mktemp -d`)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    sandbox = Path(tempfile.mkdtemp(prefix="fileproxy-nobody-"))
    try:
        shutil.copytree(ROOT / "benchmarks", sandbox / "benchmarks",
                        ignore=shutil.ignore_patterns("results", "__pycache__"))
        shutil.copytree(Path(psutil.__file__).parent, sandbox / "psutil")
        (sandbox / "tests").mkdir()
        for name in ("__init__.py", "pattern.py"):
            shutil.copy(ROOT / "tests" / name, sandbox / "tests" / name)
        for path in [sandbox, *sandbox.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 getattr(sys, "_base_executable", sys.executable), "-m",
                                 "benchmarks.net", "--quick"],
                                capture_output=True, text=True, cwd=sandbox, timeout=60,
                                env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(sandbox),
                                     "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        shutil.rmtree(sandbox)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("bench net: needs root"), \
        result.stderr


def test_an_unknown_row_stops_it_with_one_line():
    result = subprocess.run([sys.executable, "-m", "benchmarks.net", "--targets",
                             "fileproxy,squid"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == \
        "bench net: --targets: unknown row(s) squid (rows: direct, fileproxy, nginx, naive, " \
        "aria2c)", result.stderr
