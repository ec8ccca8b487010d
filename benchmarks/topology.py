"""Three network namespaces (client, proxy, origin) joined by emulated links, and their removal.

    client  198.18.1.1 ==link== 198.18.1.2  proxy  198.18.2.1 ==link== 198.18.2.2  origin

Links are emulated one of three ways (`emulation`; "auto" picks netem when the kernel has it):
- "netem": veth pairs; each direction is shaped on the receiving end's ingress (redirected to an
  ifb device whose root qdisc is netem: delay, jitter, loss, rate, queue limit), so the sender's
  TCP small-queues accounting never sees the emulated queue;
- "tun": point-to-point TUN devices bridged by the user-space delay line (benchmarks/netem.py),
  for kernels without netem (like ours);
- "tbf": the netem plumbing with a tbf rate limit instead (rate only; no delay or loss), which
  is how that plumbing is tested where netem is missing.
The proxy namespace forwards packets, so the client reaches the origin directly through it too.
Names carry a per-run prefix; everything created is removed on exit, Ctrl-C or a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
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


def kernel_has_netem() -> bool:
    """Try a netem qdisc in a scratch namespace (the host's own devices are never touched)."""
    scratch = f"fpnetem{os.getpid()}"
    if run("ip", "netns", "add", scratch, check=False).returncode:
        return False
    try:
        return run("ip", "netns", "exec", scratch, "tc", "qdisc", "add", "dev", "lo", "root",
                   "netem", "delay", "1ms", check=False).returncode == 0
    finally:
        run("ip", "netns", "del", scratch, check=False)


EMULATIONS = ("auto", "netem", "tun", "tbf")
DESCRIPTIONS = {"netem": "netem qdisc on each receiver's ingress (veth + ifb)",
                "tun": "user-space TUN delay line",
                "tbf": "tbf rate limit on each receiver's ingress (veth + ifb; no delay or loss)"}
MTU_BYTES = 1500


def shaping_qdisc(kind: str, link: dict[str, Any]) -> list[str]:
    """The root qdisc of an ifb device for one direction of a link (a netem_spec dict)."""
    rate = link["rate_mbit"]
    queue_packets = int(link["queue_ms"] / 1000 * rate * 1e6 / 8 / MTU_BYTES) if rate else 1000
    if kind == "tbf":
        if link["delay_ms"] or link["jitter_ms"] or link["loss"] or not rate:
            raise HarnessError("bench net: the tbf emulation does rate limits only (no delay, "
                               "jitter or loss); use netem or tun for this profile")
        return ["tbf", "rate", f"{rate}mbit", "burst", "32kb",
                "limit", str(max(queue_packets, 10) * MTU_BYTES)]
    # netem's limit counts the packets in its delay line as well as the queue.
    in_flight = int((link["delay_ms"] + link["jitter_ms"]) / 1000 * (rate or 10_000) * 1e6 / 8
                    / MTU_BYTES)
    args = ["netem", "delay", f"{link['delay_ms']}ms", f"{link['jitter_ms']}ms",
            "loss", f"{link['loss'] * 100:g}%", "limit", str(max(in_flight + queue_packets, 100))]
    return args + (["rate", f"{rate}mbit"] if rate else [])


def impaired(link: dict[str, Any]) -> bool:
    return any(link[key] for key in ("delay_ms", "jitter_ms", "rate_mbit", "loss"))


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: f"fp{os.getpid()}")
    created: list[str] = field(default_factory=list)
    emulator: subprocess.Popen[bytes] | None = None
    congestion_allowed_before: str | None = None
    emulation: str = "auto"

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.emulation, self.emulation)

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
        """Namespaces, links, addresses, routes, congestion control, then the emulation."""
        if self.emulation == "auto":
            self.emulation = "netem" if kernel_has_netem() else "tun"
        if self.emulation not in DESCRIPTIONS:
            raise HarnessError(f"bench net: unknown emulation {self.emulation!r} "
                               f"(choose from {', '.join(EMULATIONS)})")
        for namespace in (self.client, self.proxy, self.origin):
            run("ip", "netns", "add", namespace)
            self.created.append(namespace)
            self.ns_run(namespace, "ip", "link", "set", "lo", "up")
        self.ns_run(self.proxy, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ends = ((self.client, "tc0", CLIENT_ADDR, PROXY_CLIENT_SIDE),
                (self.proxy, "tp0", PROXY_CLIENT_SIDE, CLIENT_ADDR),
                (self.proxy, "tp1", PROXY_ORIGIN_SIDE, ORIGIN_ADDR),
                (self.origin, "to0", ORIGIN_ADDR, PROXY_ORIGIN_SIDE))
        if self.emulation == "tun":
            for end in ends:
                self.tun(*end)
        else:
            self.veth(ends[0][:2], ends[1][:2])
            self.veth(ends[2][:2], ends[3][:2])
            for end in ends:
                self.address(*end)
        # Through the proxy namespace as a gateway: veth links are Ethernet (nobody would answer
        # ARP for the far network); TUN links are point to point.
        for namespace, network, gateway, device in (
                (self.client, "198.18.2.0/24", PROXY_CLIENT_SIDE, "tc0"),
                (self.origin, "198.18.1.0/24", PROXY_ORIGIN_SIDE, "to0")):
            via = () if self.emulation == "tun" else ("via", gateway)
            self.ns_run(namespace, "ip", "route", "add", network, *via, "dev", device)
        self.set_congestion(congestion)
        if self.emulation == "tun":
            self.start_emulator(client_link, origin_link)
        else:
            for namespace, device, link in ((self.client, "tc0", client_link),
                                            (self.proxy, "tp0", client_link),
                                            (self.proxy, "tp1", origin_link),
                                            (self.origin, "to0", origin_link)):
                if impaired(link):
                    self.shape_ingress(namespace, device, link)

    def veth(self, one: tuple[str, str], other: tuple[str, str]) -> None:
        (ns_a, dev_a), (ns_b, dev_b) = one, other
        run("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b,
            "netns", ns_b)
        for namespace, device in one, other:
            # One segment per packet: the shaper must see wire-sized packets, not 64 KiB TSO
            # bursts (netem would drop or delay a whole burst as one packet).
            self.ns_run(namespace, "ip", "link", "set", "dev", device, "gso_max_segs", "1")

    def address(self, namespace: str, name: str, address: str, peer: str) -> None:
        self.ns_run(namespace, "ip", "addr", "add", address, "peer", peer, "dev", name)
        self.ns_run(namespace, "ip", "link", "set", name, "up")
        self.ns_run(namespace, "ip", "route", "replace", peer, "dev", name)

    def shape_ingress(self, namespace: str, device: str, link: dict[str, Any]) -> None:
        """What arrives on `device` goes through an ifb device whose root qdisc shapes it."""
        ifb = f"{device}i"
        self.ns_run(namespace, "ip", "link", "add", ifb, "type", "ifb")
        self.ns_run(namespace, "ip", "link", "set", ifb, "up")
        self.ns_run(namespace, "tc", "qdisc", "add", "dev", device, "handle", "ffff:", "ingress")
        self.ns_run(namespace, "tc", "filter", "add", "dev", device, "parent", "ffff:",
                    "protocol", "all", "u32", "match", "u32", "0", "0",
                    "action", "mirred", "egress", "redirect", "dev", ifb)
        self.ns_run(namespace, "tc", "qdisc", "add", "dev", ifb, "root",
                    *shaping_qdisc(self.emulation, link))

    def tun(self, namespace: str, name: str, address: str, peer: str) -> None:
        self.ns_run(namespace, "ip", "tuntap", "add", "dev", name, "mode", "tun")
        self.address(namespace, name, address, peer)

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
        """Stop the user-space emulator and return what it counted (kernel qdiscs: their
        statistics as `tc -s` prints them)."""
        if self.emulation != "tun":
            return {f"{namespace}:{device}i": self.ns_run(
                namespace, "tc", "-s", "qdisc", "show", "dev", f"{device}i", check=False).stdout
                for namespace, device in ((self.client, "tc0"), (self.proxy, "tp0"),
                                          (self.proxy, "tp1"), (self.origin, "to0"))}
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


@dataclass
class Kills:
    """What a connection killer did."""

    rounds: int = 0  # rounds that closed at least one connection
    connections: int = 0


@contextlib.contextmanager
def killing(topology: Topology, namespace: str, selector: Sequence[str],
            every: float) -> Iterator[Kills]:
    """Abort the TCP connections `selector` (an `ss` filter) picks in `namespace` every `every`
    seconds (`ss -K`: the socket is aborted and its peer gets a reset, as when a link drops)."""
    kills, stop = Kills(), threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            killed = topology.ns_run(namespace, "ss", "-K", "-t", "-H", *selector,
                                     check=False).stdout
            count = sum(1 for line in killed.splitlines() if line.strip())
            kills.rounds += count > 0
            kills.connections += count

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield kills
    finally:
        stop.set()
        thread.join()
