"""Three network namespaces (client, proxy, origin) joined by emulated links, and their removal.

    client  198.18.1.1 ==link== 198.18.1.2  proxy  198.18.2.1 ==link== 198.18.2.2  origin

Each link is a pair of point-to-point TUN devices bridged by benchmarks/netem.py. The proxy
namespace forwards packets, so the client reaches the origin directly through it too. Names carry a
per-run prefix; everything created is removed on exit, Ctrl-C or a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import spawn, terminate

CLIENT_ADDR, PROXY_CLIENT_SIDE = "198.18.1.1", "198.18.1.2"
PROXY_ORIGIN_SIDE, ORIGIN_ADDR = "198.18.2.1", "198.18.2.2"


class HarnessError(SystemExit):
    """Stops the harness with a one-line reason."""


def require_root_and_ip() -> None:
    if os.geteuid() != 0:
        raise HarnessError("bench net: needs root (network namespaces and TUN devices); "
                           "run it with sudo")
    if not shutil.which("ip"):
        raise HarnessError("bench net: needs `ip` from iproute2 (apt-get install iproute2)")
    if not os.path.exists("/dev/net/tun"):
        raise HarnessError("bench net: needs /dev/net/tun (TUN devices) for the link emulator")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: f"fp{os.getpid()}")
    created: list[str] = field(default_factory=list)
    emulator: subprocess.Popen[bytes] | None = None
    congestion_allowed_before: str | None = None

    @property
    def client(self) -> str:
        return f"{self.prefix}c"

    @property
    def proxy(self) -> str:
        return f"{self.prefix}p"

    @property
    def origin(self) -> str:
        return f"{self.prefix}o"

    def exec_args(self, namespace: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", namespace, *args]

    def ns_run(self, namespace: str, *args: str, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        return run(*self.exec_args(namespace, *args), check=check)

    def build(self, client_link: dict[str, Any], origin_link: dict[str, Any],
              congestion: dict[str, str]) -> None:
        """Namespaces, TUN pairs, addresses, routes, congestion control, then the emulator."""
        for namespace in (self.client, self.proxy, self.origin):
            run("ip", "netns", "add", namespace)
            self.created.append(namespace)
            self.ns_run(namespace, "ip", "link", "set", "lo", "up")
        self.ns_run(self.proxy, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.tun(self.client, "tc0", CLIENT_ADDR, PROXY_CLIENT_SIDE)
        self.tun(self.proxy, "tp0", PROXY_CLIENT_SIDE, CLIENT_ADDR)
        self.tun(self.proxy, "tp1", PROXY_ORIGIN_SIDE, ORIGIN_ADDR)
        self.tun(self.origin, "to0", ORIGIN_ADDR, PROXY_ORIGIN_SIDE)
        self.ns_run(self.client, "ip", "route", "add", "198.18.2.0/24", "dev", "tc0")
        self.ns_run(self.origin, "ip", "route", "add", "198.18.1.0/24", "dev", "to0")
        self.set_congestion(congestion)
        self.start_emulator(client_link, origin_link)

    def tun(self, namespace: str, name: str, address: str, peer: str) -> None:
        self.ns_run(namespace, "ip", "tuntap", "add", "dev", name, "mode", "tun")
        self.ns_run(namespace, "ip", "addr", "add", address, "peer", peer, "dev", name)
        self.ns_run(namespace, "ip", "link", "set", name, "up")
        self.ns_run(namespace, "ip", "route", "replace", peer, "dev", name)

    def set_congestion(self, congestion: dict[str, str]) -> None:
        """Each namespace's default TCP congestion control (it must be in the host's allowed
        list: root adds the ones named, and puts the list back on exit)."""
        allowed_path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
        with open(allowed_path) as handle:
            allowed = handle.read().split()
        wanted = set(congestion.values()) - set(allowed)
        if wanted:
            self.congestion_allowed_before = " ".join(allowed)
            with open(allowed_path, "w") as handle:
                handle.write(" ".join([*allowed, *sorted(wanted)]))
        for role, name in congestion.items():
            namespace = getattr(self, role)
            self.ns_run(namespace, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={name}")

    def start_emulator(self, client_link: dict[str, Any], origin_link: dict[str, Any]) -> None:
        links = [f"{self.client}:tc0:{self.proxy}:tp0:{json.dumps(client_link)}",
                 f"{self.proxy}:tp1:{self.origin}:to0:{json.dumps(origin_link)}"]
        args = [sys.executable, "-m", "benchmarks.netem"]
        for link in links:
            args += ["--link", link]
        self.emulator = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)
        line = self.emulator.stdout.readline().decode().strip() if self.emulator.stdout else ""
        if line != "ready":
            error = self.emulator.stderr.read().decode()[-500:] if self.emulator.stderr else ""
            raise HarnessError(f"bench net: the link emulator did not start: {error}")

    def spawn_in(self, namespace: str, args: Sequence[str], **kwargs: Any
                 ) -> subprocess.Popen[bytes]:
        return spawn(self.exec_args(namespace, *args), **kwargs)

    def emulator_stats(self) -> dict[str, Any]:
        """Stop the emulator and return what it counted."""
        if self.emulator is None:
            return {}
        terminate(self.emulator)
        out = self.emulator.stdout.read().decode().strip().splitlines() \
            if self.emulator.stdout else []
        self.emulator = None
        return json.loads(out[-1]) if out else {}

    def remove(self) -> None:
        """Remove everything this run created; safe to call twice."""
        if self.emulator is not None:
            terminate(self.emulator)
            self.emulator = None
        for namespace in reversed(self.created):
            pids = run("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", namespace, check=False)
        self.created.clear()
        if self.congestion_allowed_before is not None:
            with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control", "w") as handle:
                handle.write(self.congestion_allowed_before)
            self.congestion_allowed_before = None

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
