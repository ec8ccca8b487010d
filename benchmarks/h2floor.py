"""About what the h2 library alone costs per HTTP/2 request on fileproxy's server side.

    ./run.sh bench h2floor [--requests 20000] [--peer-rps 35000]

In this process, with no socket, no TLS and no proxying: h2 set up as fileproxy sets it up
(server/h2server.py server_machine) takes GETs as h2load sends them, 16 streams in one read as
with h2load -m 16, checks each request's fields (compat.h2_request_problem) and answers each with
1 KiB (HEADERS as fileproxy relays nginx's, the window looked up as fileproxy does, one DATA
frame), the frames of the 16 answers taken in one write. An approximate floor under fileproxy's
h2 cost per request: with --peer-rps (nginx's h2 1 KiB rate from `bench loopback`) it says how
many of this machine's cores h2 alone would take at half that rate. Results go to
benchmarks/results/h2floor-*.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import time

import h2.config
import h2.connection
import h2.events

from benchmarks.common import save_results
from fileproxy.compat import h2_request_problem
from fileproxy.config import Config
from fileproxy.server.h2server import server_machine

BATCH = 16  # streams in flight per connection, as bench loopback's h2load -m 16
REQUEST = [(b":method", b"GET"), (b":path", b"/small.bin"), (b":scheme", b"https"),
           (b":authority", b"127.0.0.1:8443"), (b"accept", b"*/*"),
           (b"accept-encoding", b"gzip, deflate"), (b"user-agent", b"h2load nghttp2/1.52.0")]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"),
            (b"date", b"Tue, 01 Dec 2026 02:00:00 GMT"),
            (b"content-type", b"application/octet-stream"), (b"content-length", b"1024"),
            (b"last-modified", b"Tue, 01 Dec 2026 01:50:00 GMT"), (b"etag", b'"6925e8a8-400"'),
            (b"accept-ranges", b"bytes"), (b"via", b"2 fileproxy")]
BODY = bytes(1024)


def connected() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = server_machine(Config(upstream=("http://127.0.0.1:1",)))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())  # (the client acknowledges fileproxy's settings)
    client.increment_flow_control_window(2**30 - 65_535)  # as h2load does (-W 30)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return client, server


def request_batches(client: h2.connection.H2Connection, count: int) -> list[bytes]:
    """`count` GETs as the client's bytes, BATCH to a read, made before the clock starts."""
    batches = []
    for _ in range(count // BATCH):
        for _ in range(BATCH):
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, REQUEST, end_stream=True)
            client.streams.pop(stream_id, None)  # (the client never reads the answers)
        batches.append(client.data_to_send())
    return batches


def answer(server: h2.connection.H2Connection, event: h2.events.Event) -> None:
    if not isinstance(event, h2.events.RequestReceived):
        return
    if event.headers is None or h2_request_problem(event.headers) is not None:
        raise RuntimeError("the benchmark's request fails h2's check")
    server.send_headers(event.stream_id, RESPONSE)
    window = min(server.local_flow_control_window(event.stream_id),
                 server.max_outbound_frame_size)
    assert window >= len(BODY)
    server.send_data(event.stream_id, BODY, end_stream=True)


def h2_seconds_per_request(count: int = 20_000) -> float:
    client, server = connected()
    batches = request_batches(client, count)
    started = time.perf_counter()
    for data in batches:
        for event in server.receive_data(data):
            answer(server, event)
        server.data_to_send()
    return (time.perf_counter() - started) / (len(batches) * BATCH)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def floor_note(seconds: float, peer_rps: float, cores: int) -> str:
    half = peer_rps / 2
    return (f"h2 library alone (bench h2floor: in one process, no socket, no TLS, no proxying): "
            f"about {seconds * 1e6:.0f} us per request = {1 / seconds:,.0f} req/s per core; at "
            f"half nginx's h2 rate ({half:,.0f}/s) that alone is {half * seconds:.2f} of the "
            f"{cores} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--peer-rps", type=float, default=0.0,
                        help="nginx's h2 1 KiB req/s from bench loopback, for the cores needed")
    args = parser.parse_args()
    runs = [h2_seconds_per_request(args.requests) for _ in range(5)]
    best = min(runs)
    line = floor_note(best, args.peer_rps, cores()) if args.peer_rps else \
        f"h2 library alone: about {best * 1e6:.1f} us per request = {1 / best:,.0f} req/s per core"
    markdown = (f"{line}\n\nRuns (us per request, the best counts): "
                f"{', '.join(f'{run * 1e6:.1f}' for run in runs)}; {BATCH} streams per read.")
    print(markdown)
    save_results("h2floor", {"us_per_request": [run * 1e6 for run in runs],
                             "peer_rps": args.peer_rps, "cores": cores(), "batch": BATCH},
                 markdown)


if __name__ == "__main__":
    main()
