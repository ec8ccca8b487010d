"""The fault soak's short variant (benchmarks/soak.py): two instances, one Redis, HAProxy in front when
installed, every kind of fault once or more in about a minute; every invariant must hold."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(200)
def test_a_short_soak_keeps_every_invariant():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "40", "--fault-every", "7",
         "--settle", "40", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    line = next((line for line in result.stdout.splitlines() if line.startswith("SOAK-JSON ")),
                None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-2000:]
    payload = json.loads(line.removeprefix("SOAK-JSON "))
    invariants = payload["invariants"]
    assert {name: value for name, value in invariants.items()
            if value and name != "largest RSS growth of a long-lived worker (MiB)"} == {}, \
        payload["examples"]
    assert len(payload["faults"]) >= 4
    assert payload["outcomes"].get("tus: delivered once, byte-exact", 0) > 0
    assert payload["outcomes"].get("task: completed", 0) > 0
    assert result.returncode == 0, result.stderr[-2000:]
