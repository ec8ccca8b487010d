"""A user-space link emulator for kernels without the netem qdisc: a delay line between TUN devices.

Each emulated link joins two point-to-point TUN devices living in two network namespaces. Every IP
packet read from one end goes, per direction: random loss, then a rate limit with a bounded queue
(tail drop), then a one-way delay with jitter that never reorders, then out of the other end.

    python -m benchmarks.netem --link NS_A:TUN_A:NS_B:TUN_B:PROFILE_JSON [--link ...]

PROFILE_JSON: {"delay_ms": one-way, "jitter_ms": +-, "rate_mbit": 0 for none, "loss": fraction,
"queue_ms": queue bound at the link rate}. Runs until SIGTERM; prints one JSON stats line then.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import heapq
import json
import os
import random
import signal
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65536


def enter_netns(name: str) -> None:
    """Switch this thread's network namespace (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    with open(f"/var/run/netns/{name}") as handle:
        if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")


def open_tun(name: str) -> int:
    """Attach to an existing TUN device (created with `ip tuntap add`) in the current namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


@dataclass
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float = 0.0
    loss: float = 0.0
    queue_ms: float = 100.0

    @property
    def queue_bytes(self) -> float:
        return self.rate_mbit * 1e6 / 8 * self.queue_ms / 1000 if self.rate_mbit else float("inf")


@dataclass
class Direction:
    """One direction of a link: reads `source`, writes `sink`."""

    name: str
    source: int
    sink: int
    impairment: Impairment
    wire_free_at: float = 0.0  # when the rate limiter finishes the last accepted packet
    last_delivery: float = 0.0  # deliveries never overtake each other
    stats: dict[str, int] = field(default_factory=lambda: {
        "packets": 0, "bytes": 0, "lost": 0, "queue_drops": 0, "delivered": 0})

    def accept(self, now: float, size: int) -> float | None:
        """When the packet leaves the far end, or None when it is dropped."""
        imp = self.impairment
        self.stats["packets"] += 1
        self.stats["bytes"] += size
        if imp.loss and random.random() < imp.loss:
            self.stats["lost"] += 1
            return None
        start = now
        if imp.rate_mbit:
            backlog = max(0.0, self.wire_free_at - now) * imp.rate_mbit * 1e6 / 8
            if backlog + size > imp.queue_bytes:
                self.stats["queue_drops"] += 1
                return None
            start = max(now, self.wire_free_at) + size * 8 / (imp.rate_mbit * 1e6)
            self.wire_free_at = start
        delay = imp.delay_ms / 1000
        if imp.jitter_ms:
            delay += random.uniform(-imp.jitter_ms, imp.jitter_ms) / 1000
        departure = max(start + max(delay, 0.0), self.last_delivery)
        self.last_delivery = departure
        return departure


class DelayLine:
    """All directions of all links, in one asyncio loop: a heap of packets in flight."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.directions: list[Direction] = []
        self.in_flight: list[tuple[float, int, Direction, bytes]] = []
        self.sequence = 0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, direction: Direction) -> None:
        self.directions.append(direction)
        self.loop.add_reader(direction.source, self.read, direction)

    def read(self, direction: Direction) -> None:
        now = self.loop.time()
        for _ in range(64):  # drain a burst, then let the loop breathe
            try:
                packet = os.read(direction.source, MAX_PACKET)
            except BlockingIOError:
                break
            departure = direction.accept(now, len(packet))
            if departure is not None:
                self.sequence += 1
                heapq.heappush(self.in_flight, (departure, self.sequence, direction, packet))
        self.schedule()

    def schedule(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.in_flight:
            self.timer = self.loop.call_at(self.in_flight[0][0], self.deliver)

    def deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.in_flight and self.in_flight[0][0] <= now + 0.0002:
            _, _, direction, packet = heapq.heappop(self.in_flight)
            try:
                os.write(direction.sink, packet)
                direction.stats["delivered"] += 1
            except (BlockingIOError, OSError):
                direction.stats["queue_drops"] += 1
        self.schedule()

    def stats(self) -> dict[str, Any]:
        return {d.name: d.stats for d in self.directions}


def parse_link(text: str) -> tuple[str, str, str, str, Impairment, Impairment]:
    """NS_A:TUN_A:NS_B:TUN_B:JSON where JSON is one impairment or {"a_to_b": ..., "b_to_a": ...}."""
    ns_a, tun_a, ns_b, tun_b, spec = text.split(":", 4)
    data = json.loads(spec)
    if "a_to_b" in data:
        return ns_a, tun_a, ns_b, tun_b, Impairment(**data["a_to_b"]), Impairment(**data["b_to_a"])
    return ns_a, tun_a, ns_b, tun_b, Impairment(**data), Impairment(**data)


async def run(links: list[str]) -> None:
    line = DelayLine()
    for text in links:
        ns_a, tun_a, ns_b, tun_b, a_to_b, b_to_a = parse_link(text)
        enter_netns(ns_a)
        fd_a = open_tun(tun_a)
        enter_netns(ns_b)
        fd_b = open_tun(tun_b)
        line.add(Direction(f"{tun_a}->{tun_b}", fd_a, fd_b, a_to_b))
        line.add(Direction(f"{tun_b}->{tun_a}", fd_b, fd_a, b_to_a))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        line.loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    print(json.dumps(line.stats()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link", action="append", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args.link))
    except ImportError:  # pragma: no cover
        asyncio.run(run(args.link))
    sys.exit(0)


if __name__ == "__main__":
    main()
