"""What the h2 library alone costs per HTTP/2 request on fileproxy's server side.

    ./run.sh bench h2floor [--requests 20000] [--peer-rps 35000]

In this process, with no socket, no TLS and no proxying: h2 (with fileproxy's H2Configuration
and its request check, compat.h2_request_problem) takes a GET's HEADERS frame as h2load sends it
and writes a 1 KiB answer (HEADERS as fileproxy relays nginx's, one DATA frame). That is a floor
under fileproxy's h2 cost per request: with --peer-rps (nginx's h2 1 KiB rate measured by `bench
loopback`), it says how many of this machine's cores h2 alone would need at half that rate.
"""

from __future__ import annotations

import argparse
import os
import time

import h2.config
import h2.connection
import h2.settings

from fileproxy.compat import h2_request_problem

REQUEST = [(b":method", b"GET"), (b":path", b"/small.bin"), (b":scheme", b"https"),
           (b":authority", b"127.0.0.1:8443"), (b"accept", b"*/*"),
           (b"accept-encoding", b"gzip, deflate"), (b"user-agent", b"h2load nghttp2/1.52.0")]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"),
            (b"date", b"Tue, 01 Dec 2026 02:00:00 GMT"),
            (b"content-type", b"application/octet-stream"), (b"content-length", b"1024"),
            (b"last-modified", b"Tue, 01 Dec 2026 01:50:00 GMT"), (b"etag", b'"6925e8a8-400"'),
            (b"accept-ranges", b"bytes"), (b"via", b"2 fileproxy")]
BODY = bytes(1024)


def server_connection() -> h2.connection.H2Connection:
    """As fileproxy's H2Connection sets h2 up (server/h2server.py)."""
    return h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False,
        validate_outbound_headers=False, normalize_outbound_headers=False))


def connected() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = server_connection()
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.increment_flow_control_window(2**30 - 65_535)  # as h2load does (-W 30)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return client, server


def request_frames(client: h2.connection.H2Connection, count: int) -> list[tuple[int, bytes]]:
    """`count` GETs as the client's bytes, made before the clock starts."""
    frames = []
    for _ in range(count):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, REQUEST, end_stream=True)
        frames.append((stream_id, client.data_to_send()))
        client.streams.pop(stream_id, None)  # (the client never reads the answers)
    return frames


def h2_seconds_per_request(count: int = 20_000) -> float:
    client, server = connected()
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: count + 1})
    server.data_to_send()
    frames = request_frames(client, count)
    started = time.perf_counter()
    for stream_id, data in frames:
        for event in server.receive_data(data):
            headers = getattr(event, "headers", None)
            if headers is not None and h2_request_problem(headers) is not None:
                raise RuntimeError("the benchmark's request fails h2's check")
        server.send_headers(stream_id, RESPONSE)
        server.send_data(stream_id, BODY, end_stream=True)
        server.data_to_send()
    return (time.perf_counter() - started) / count


def floor_note(seconds: float, peer_rps: float, cores: int) -> str:
    half = peer_rps / 2
    return (f"h2 library alone (bench h2floor: in one process, no socket, no TLS, no proxying): "
            f"{seconds * 1e6:.0f} us per request = {1 / seconds:,.0f} req/s per core; at half "
            f"nginx's h2 rate ({half:,.0f}/s) that alone is {half * seconds:.2f} of the "
            f"{cores} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--peer-rps", type=float, default=0.0,
                        help="nginx's h2 1 KiB req/s from bench loopback, for the cores needed")
    args = parser.parse_args()
    best = min(h2_seconds_per_request(args.requests) for _ in range(3))
    if args.peer_rps:
        print(floor_note(best, args.peer_rps, os.cpu_count() or 1))
    else:
        print(f"h2 library alone: {best * 1e6:.1f} us per request = {1 / best:,.0f} req/s per core")


if __name__ == "__main__":
    main()
