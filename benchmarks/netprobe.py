"""Measures an emulated link from inside the namespaces: RTT, loss and bottleneck rate (UDP).

    python -m benchmarks.netprobe serve ADDR PORT           echo server and rate sink
    python -m benchmarks.netprobe rtt ADDR PORT COUNT        -> {"rtt_ms": ..., "loss": ...}
    python -m benchmarks.netprobe rate ADDR PORT SECONDS MBIT -> {"mbit": ...} at the receiver
"""

from __future__ import annotations

import json
import math
import socket
import statistics
import struct
import sys
import time

PACKET = struct.Struct("!4sId")  # tag, sequence, send time


def serve(address: str, port: int) -> None:
    """Echo probes; count rate-test bytes and report them on request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((address, port))
    received, first, last = 0, 0.0, 0.0
    while True:
        data, peer = sock.recvfrom(65536)
        tag = data[:4]
        if tag == b"RATE":
            now = time.monotonic()
            if not received:
                first = now
            received += len(data) + 28  # IP + UDP headers count against the link
            last = now
        elif tag == b"STAT":  # answered again unchanged if the answer got lost
            sock.sendto(json.dumps({"bytes": received, "seconds": last - first}).encode(), peer)
        else:
            sock.sendto(data, peer)


def rtt(address: str, port: int, count: int, interval: float = 0.01) -> dict[str, float]:
    """`count` echo probes `interval` apart; RTT percentiles and the loss each way (assumed
    symmetric: one-way = 1 - sqrt(1 - round-trip loss))."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    rtts: list[float] = []
    start = time.monotonic()
    deadline = start + count * interval + 3.0
    sequence = 0
    while time.monotonic() < deadline and len(rtts) < count:
        if sequence < count and time.monotonic() >= start + sequence * interval:
            sock.sendto(PACKET.pack(b"ECHO", sequence, time.monotonic()), (address, port))
            sequence += 1
        try:
            _, _, stamp = PACKET.unpack(sock.recv(2048)[:PACKET.size])
            rtts.append((time.monotonic() - stamp) * 1000)
        except BlockingIOError:
            time.sleep(0.0005)
    ordered = sorted(rtts)
    round_trip_loss = 1 - len(rtts) / count
    return {"rtt_ms": round(statistics.median(ordered), 2) if ordered else math.nan,
            "rtt_p10_ms": round(ordered[len(ordered) // 10], 2) if ordered else math.nan,
            "rtt_p90_ms": round(ordered[9 * len(ordered) // 10], 2) if ordered else math.nan,
            "round_trip_loss": round(round_trip_loss, 4),
            "loss": round(1 - math.sqrt(max(0.0, 1 - round_trip_loss)), 4)}


def rate(address: str, port: int, seconds: float, mbit: float) -> dict[str, float]:
    """Send at 1.5x the configured rate (or flat out when it is 0); the sink says what arrived."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"RATE" + b"x" * 1368
    gap = (len(payload) + 28) * 8 / (mbit * 1.5e6) if mbit else 0.0
    end = time.monotonic() + seconds
    next_send = time.monotonic()
    while time.monotonic() < end:
        if time.monotonic() >= next_send:
            try:
                sock.sendto(payload, (address, port))
            except OSError:
                pass
            next_send += gap
        elif gap > 0.0005:
            time.sleep(gap / 2)
    time.sleep(1.0)  # let the queue drain
    sock.settimeout(1)
    for _ in range(10):  # the link may lose the question or the answer: ask again
        sock.sendto(b"STAT", (address, port))
        try:
            report = json.loads(sock.recv(2048))
            break
        except TimeoutError:
            continue
    else:
        raise SystemExit("netprobe: the rate sink never answered")
    measured = report["bytes"] * 8 / report["seconds"] / 1e6 if report["seconds"] else math.nan
    return {"mbit": round(measured, 2)}


def main() -> None:
    mode, address, port, *rest = sys.argv[1:]
    if mode == "serve":
        serve(address, int(port))
    elif mode == "rtt":
        print(json.dumps(rtt(address, int(port), int(rest[0]))))
    elif mode == "rate":
        print(json.dumps(rate(address, int(port), float(rest[0]), float(rest[1]))))
    else:
        raise SystemExit(f"netprobe: unknown mode {mode!r}")


if __name__ == "__main__":
    main()
