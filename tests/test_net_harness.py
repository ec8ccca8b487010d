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

import pytest

from benchmarks.net import LAN, Run, verify_links
from benchmarks.topology import Topology

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun")

IMPAIRED = {"rtt_ms": 60, "jitter_ms": 10, "rate_mbit": 20, "loss": 0.05, "concurrency": 10}


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("profile", [LAN | {"concurrency": 10}, IMPAIRED],
                         ids=["lan", "impaired"])
def test_links_measure_as_configured_and_nothing_is_left_behind(profile):
    before = namespaces()
    run = Run("test", profile, {"queue_ms": 100}, "client", quick=True)
    with Topology() as topology:
        topology.build(run.netem_spec("client"), run.netem_spec("origin"),
                       {"client": "cubic", "proxy": "cubic", "origin": "cubic"})
        assert {topology.client, topology.proxy, topology.origin} <= namespaces()
        assert topology.emulator is not None
        emulator_pid = topology.emulator.pid
        checks, valid = verify_links(topology, run)
        emulator = topology.emulator_stats()
    by_name = {c["check"]: c for c in checks}
    assert valid, checks
    rtt = by_name["client link RTT ms"]["measured"]
    assert abs(rtt - profile["rtt_ms"]) <= 0.2 * profile["rtt_ms"] + 2
    if profile["loss"]:
        assert emulator["tc0->tp0"]["lost"] > 0 and emulator["tp0->tc0"]["lost"] > 0
    assert namespaces() == before
    assert not alive(emulator_pid)


def test_refuses_clearly_without_root(tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-m", "benchmarks.net", "--quick"],
                            capture_output=True, text=True, cwd=os.getcwd(), timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("bench net: needs root")
