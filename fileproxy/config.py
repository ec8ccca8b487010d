"""Every fileproxy setting: one Config dataclass that CLI flags, FILEPROXY_* env and a TOML file land on."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from yarl import URL

ENV_PREFIX = "FILEPROXY_"
CONFIG_FILE_ENV = "FILEPROXY_CONFIG"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting and where it came from."""


# ---------------------------------------------------------------- value parsers

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """'256k', '1MiB', '4096' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 4096, 256k or 1MiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_seconds(text: str) -> float:
    """'30', '1.5', '500ms', '5m', '2h' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", str(text))
    if not match or match.group(2) not in _TIME_UNITS:
        raise ValueError("expected a duration such as 30, 1.5, 500ms, 5m or 2h")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def parse_segments(text: str) -> int:
    """'auto' -> 0 (adaptive), else a positive count (1: off)."""
    if str(text).strip().lower() == "auto":
        return 0
    count = parse_count(text)
    if count < 1:
        raise ValueError("expected auto or a positive count")
    return count


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_count(text: str) -> int:
    value = int(str(text).strip())
    if value < 0:
        raise ValueError("must not be negative")
    return value


def parse_upstream(text: str) -> str:
    """An upstream: http(s)://host[:port][/prefix], no query or fragment, optionally followed by
    ` weight=N` (as nginx's `server ... weight=N`)."""
    url_text, *options = str(text).split()
    url = URL(url_text, encoded=True)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected a URL such as http://10.0.0.5:8000 [weight=N]")
    if url.raw_query_string or url.raw_fragment:
        raise ValueError("an upstream URL takes no query or fragment")
    spec = str(url).rstrip("/")
    for option in options:
        name, _, value = option.partition("=")
        if name != "weight" or not value.isdigit() or int(value) < 1:
            raise ValueError(f"unknown upstream option {option!r} (only weight=N, N >= 1)")
        spec += f" weight={int(value)}"
    return spec


SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db], taken apart:
    the sentinels to ask, the service (master) name they monitor, and the master's db and
    credentials (the sentinels themselves are asked without a password)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(text: str) -> SentinelURL:
    parts = urlsplit(str(text).strip())
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"expected a {SENTINEL_SCHEME}:// URL")
    if parts.query or parts.fragment:
        raise ValueError(f"a {SENTINEL_SCHEME} URL takes no query or fragment")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = []
    for address in hosts.split(","):
        match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/]+)(?::(\d{1,5}))?", address.strip())
        if not match or not 0 < int(match.group(2) or SENTINEL_PORT) < 65536:
            raise ValueError(f"bad sentinel address {address!r} (expected HOST:PORT)")
        sentinels.append((match.group(1).strip("[]"), int(match.group(2) or SENTINEL_PORT)))
    path = parts.path.strip("/").split("/")
    if not path[0] or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("expected the service name after the sentinels, then optionally the "
                         f"db: {SENTINEL_SCHEME}://host:26379/mymaster/0")
    return SentinelURL(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       username, password)


def parse_redis_url(text: str) -> str:
    url = str(text).strip()
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        parse_sentinel_url(url)
    elif url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://host:port/db, rediss://..., unix:///path or "
                         f"{SENTINEL_SCHEME}://host:port[,host:port...]/service[/db]")
    return url


def parse_status(text: str) -> int:
    value = int(str(text).strip())
    if not 100 <= value <= 599:
        raise ValueError("expected an HTTP status code")
    return value


def parse_ratio(text: str) -> float:
    value = float(str(text).strip())
    if not 0 <= value <= 1:
        raise ValueError("expected a fraction from 0 to 1")
    return value


def parse_bind(text: str) -> str:
    """HOST:PORT, [IPv6]:PORT or unix:PATH, as gunicorn names it."""
    text = str(text).strip()
    if text.startswith("unix:") and len(text) > 5:
        return text
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d{1,5})", text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError("expected HOST:PORT (e.g. 0.0.0.0:8080) or unix:PATH")
    return text


def parse_admin_prefix(text: str) -> str:
    text = "/" + str(text).strip().strip("/")
    if text == "/" or not re.fullmatch(r"/[A-Za-z0-9._~\-/]+", text):
        raise ValueError("expected a path such as /_fileproxy")
    return text


def parse_congestion(text: str) -> str:
    """A congestion control name; "auto" is bbr where the kernel has it (it keeps a lossy,
    long-RTT link full where cubic collapses), else the system default; "" is the system default."""
    name = str(text).strip()
    available = _available_congestion_controls()
    if name == "auto":
        return "bbr" if available is None or "bbr" in available else ""
    if not name:
        return ""
    if available is not None and name not in available:
        raise ValueError(f"not available in this kernel (available: {' '.join(sorted(available))})")
    return name


def _available_congestion_controls() -> set[str] | None:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as handle:
            return set(handle.read().split())
    except OSError:
        return None


def parse_readable_file(text: str) -> str:
    """A file that exists and can be read (empty: none)."""
    path = str(text).strip()
    if path and not os.access(path, os.R_OK):
        raise ValueError("the file does not exist" if not os.path.exists(path)
                         else "the file cannot be read")
    return path


def parse_h2_window(text: str) -> int:
    """An HTTP/2 window: 64 KiB up to 2^31 - 1 bytes (RFC 9113 6.9.1)."""
    size = parse_size(text)
    if not 65535 <= size <= 2**31 - 1:
        raise ValueError("expected 64k up to 2147483647 bytes")
    return size


def parse_signing_key(text: str) -> str:
    """ID=SECRET: an id of letters, digits, '-', '_' and '.', a secret of 16 bytes or more."""
    key_id, equals, secret = str(text).strip().partition("=")
    if not equals or not re.fullmatch(r"[A-Za-z0-9._-]+", key_id):
        raise ValueError("expected ID=SECRET, the id made of letters, digits, '.', '-' or '_'")
    if len(secret.encode()) < 16:
        raise ValueError(f"the secret of key {key_id!r} is shorter than 16 bytes")
    return f"{key_id}={secret}"


def parse_path_prefix(text: str) -> str:
    prefix = str(text).strip()
    if not prefix.startswith("/"):
        raise ValueError("expected a path prefix starting with /")
    return prefix


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of: {', '.join(allowed)}")
        return value

    return parse


def positive(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_positive(text: str) -> Any:
        value = parse(text)
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    return parse_positive


# ---------------------------------------------------------------- the settings

def setting(default: Any, parse: Callable[[str], Any], help: str, *, aliases: tuple[str, ...] = (),
            metavar: str = "", repeat: bool = False) -> Any:
    """A Config field with what the CLI, env and file loaders need to know about it."""
    meta = {"parse": parse, "help": help, "aliases": aliases, "metavar": metavar, "repeat": repeat}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_workers() -> int:
    """Two workers per core keeps both cores busy while one worker waits on a slow disk or peer."""
    return max(2, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class Config:
    """All settings. CLI beats env (FILEPROXY_*) beats the TOML file beats these defaults."""

    upstream: tuple[str, ...] = setting(
        (), parse_upstream, "upstream base URL, e.g. http://10.0.0.5:8000 (repeat for several)",
        metavar="URL", repeat=True)
    bind: str = setting("0.0.0.0:8080", parse_bind, "address to listen on: HOST:PORT or unix:PATH",
                        metavar="HOST:PORT")
    workers: int = setting(default_workers(), positive(parse_count),
                           "gunicorn worker processes (default: 2 per CPU)", metavar="N")
    reuse_port: str = setting(
        "auto", choice("auto", "yes", "no"),
        "a listening socket per worker (SO_REUSEPORT): the kernel spreads new connections "
        "evenly over the workers, where on one shared socket the first worker awake takes a "
        "burst; auto: yes when net.ipv4.tcp_migrate_req is 1, so that a worker that stops or "
        "dies hands the connections waiting on its socket to another (with 0 they are reset)",
        metavar="auto|yes|no")
    certfile: str = setting("", parse_readable_file,
                            "PEM certificate (with its chain) to serve HTTPS with (needs "
                            "--keyfile); re-read on SIGHUP", metavar="FILE")
    keyfile: str = setting("", parse_readable_file, "PEM private key of --certfile",
                           metavar="FILE")
    tls_min_version: str = setting("1.2", choice("1.2", "1.3"), "oldest TLS version accepted",
                                   metavar="1.2|1.3")
    upstream_ca: str = setting("", parse_readable_file,
                               "PEM bundle of CAs to verify https:// upstreams with (default: "
                               "the system's)", metavar="FILE")
    http2: bool = setting(True, parse_bool,
                          "serve HTTP/2: over TLS when the client offers h2 (ALPN), and in clear "
                          "text to a client that starts with its preface (h2c, prior knowledge)")
    h2_window: int = setting(
        16 << 20, parse_h2_window,
        "HTTP/2 flow-control window per stream and per connection: one stream moves at most "
        "window / round trip (16 MiB at 150 ms: about 890 Mbit/s)", metavar="SIZE")
    h2_max_streams: int = setting(100, positive(parse_count),
                                  "HTTP/2 streams a client may have open at once on one "
                                  "connection", metavar="N")
    signing_key: tuple[str, ...] = setting(
        (), parse_signing_key,
        "ID=SECRET for signed links (repeat: several keys while one is rotated out)",
        metavar="ID=SECRET", repeat=True)
    require_signature: tuple[str, ...] = setting(
        (), parse_path_prefix, "path prefix whose requests need a valid signed link (repeat)",
        metavar="PREFIX", repeat=True)
    signature_skew: float = setting(
        60.0, parse_seconds, "seconds a signed link is still taken after it expired (clocks "
        "differ)", metavar="SECONDS")
    admin_prefix: str = setting("/_fileproxy", parse_admin_prefix,
                                "path prefix reserved for fileproxy's own endpoints", metavar="PATH")
    read_size: int = setting(256 * 1024, positive(parse_size),
                             "bytes read from a peer per chunk and buffered per direction",
                             metavar="SIZE")
    upstream_resume_attempts: int = setting(
        5, parse_count,
        "a GET response with a strong validator and Accept-Ranges whose upstream connection "
        "dies, stalls past --read-timeout or is reset mid-body is continued with Range + "
        "If-Range into the same client response; the client is cut after this many attempts "
        "in a row bring no new byte (0: cut at once, as nginx)", metavar="N")
    upstream_segments: int = setting(
        0, parse_segments,
        "fetch a large GET's body from the upstream as byte ranges on several connections, "
        "relayed in order (needs Accept-Ranges and a strong ETag): auto (one connection, more "
        "while each raises the goodput, none on a short path), N at once, or 1 (off)",
        metavar="auto|N")
    upstream_segments_max: int = setting(
        16, positive(parse_count), "the most connections --upstream-segments auto opens for "
        "one response", metavar="N")
    segment_spool: int = setting(
        256 << 20, parse_size,
        "per transfer, how many bytes of finished segments --upstream-segments auto may keep in "
        "--spool-dir while the relay catches up, so connections can run further ahead than "
        "memory allows (0: none)", metavar="SIZE")
    segment_size: int = setting(1024 * 1024, positive(parse_size),
                                "bytes per range with --upstream-segments; memory per transfer "
                                "stays under N of them", metavar="SIZE")
    connect_timeout: float = setting(10.0, positive(parse_seconds),
                                     "seconds to open an upstream connection", metavar="SECONDS")
    read_timeout: float = setting(
        300.0, positive(parse_seconds),
        "seconds the upstream may stay silent (before headers: 504; mid-body: abort)",
        metavar="SECONDS")
    client_timeout: float = setting(
        60.0, parse_seconds,
        "seconds a client may stall mid-transfer (send no body byte, take no response byte) "
        "before its connection is closed, as nginx's client_body_timeout/send_timeout; 0: never",
        metavar="SECONDS")
    client_header_timeout: float = setting(
        60.0, positive(parse_seconds),
        "seconds a client may take to send a request's head once it began (nginx's "
        "client_header_timeout); then its connection is closed", metavar="SECONDS")
    client_keepalive: float = setting(
        75.0, positive(parse_seconds), "seconds an idle client connection is kept open",
        metavar="SECONDS")
    upstream_keepalive: float = setting(
        60.0, positive(parse_seconds), "seconds an idle pooled upstream connection is kept",
        metavar="SECONDS")
    pool_size: int = setting(1000, parse_count,
                             "upstream connections per worker, all hosts (0: no limit)",
                             metavar="N")
    pool_size_per_host: int = setting(0, parse_count,
                                      "upstream connections per worker and host (0: no limit)",
                                      metavar="N")
    dns_ttl: int = setting(300, parse_count, "seconds upstream DNS answers are cached",
                           metavar="SECONDS")
    tcp_nodelay: bool = setting(True, parse_bool, "TCP_NODELAY on client and upstream sockets")
    tcp_congestion: str = setting("auto", parse_congestion,
                                  "TCP congestion control for proxy sockets, e.g. bbr or cubic; "
                                  "auto: bbr where available; empty: the system's",
                                  metavar="NAME")
    tcp_congestion_min_rtt: float = setting(
        0.002, parse_seconds,
        "a connection whose handshake round trip was shorter than this (loopback, a LAN) keeps "
        "cubic; longer ones switch to --tcp-congestion: bbr's pacing only costs on a short "
        "path (0: --tcp-congestion everywhere)",
        metavar="SECONDS")
    socket_sndbuf: int = setting(0, parse_size,
                                 "SO_SNDBUF for client and upstream sockets (0: kernel autotuning)",
                                 metavar="SIZE")
    socket_rcvbuf: int = setting(0, parse_size,
                                 "SO_RCVBUF for client and upstream sockets (0: kernel autotuning)",
                                 metavar="SIZE")
    # -- admission control (per worker)
    max_concurrent: int = setting(1000, positive(parse_count),
                                  "concurrent upstream exchanges per worker; more wait in the queue",
                                  aliases=("--max-concurrent-requests",), metavar="N")
    max_queue_size: int = setting(1000, parse_count,
                                  "requests per worker that may wait for a slot; more get 503 at once",
                                  metavar="N")
    queue_timeout: float = setting(30.0, positive(parse_seconds),
                                   "longest wait for a slot before 503 + Retry-After",
                                   metavar="SECONDS")
    max_per_client: int = setting(0, parse_count,
                                  "concurrent exchanges per client address and worker (0: no "
                                  "limit; beyond: 429)", metavar="N")
    total_timeout: float = setting(0.0, parse_seconds,
                                   "limit on a whole exchange (0: none, as a 10 GiB transfer may "
                                   "take hours)", metavar="SECONDS")
    # -- retries
    max_retries: int = setting(2, parse_count, "retries of a failed attempt, only when safe",
                               metavar="N")
    retry_backoff_factor: float = setting(0.1, parse_seconds,
                                          "first retry waits up to this long (full jitter), "
                                          "doubling after", metavar="SECONDS")
    retry_backoff_max: float = setting(2.0, parse_seconds, "longest wait before a retry",
                                       metavar="SECONDS")
    retry_statuses: tuple[int, ...] = setting(
        (), parse_status,
        "upstream statuses that count as failures (retried when safe, and for the breaker); "
        "none by default: an upstream's own answer is passed on as it is",
        metavar="CODES", repeat=True)
    retry_budget: float = setting(0.2, parse_ratio,
                                  "retries may be at most this share of recent requests",
                                  metavar="RATIO")
    # -- several upstreams, circuit breakers, active health checks
    balance: str = setting("round_robin", choice("round_robin", "least_in_flight"),
                           "how an upstream is chosen (both weighted)")
    circuit_breaker_threshold: int = setting(5, parse_count,
                                             "consecutive failures that open an upstream's "
                                             "circuit (0: never by count)", metavar="N")
    circuit_breaker_timeout: float = setting(30.0, positive(parse_seconds),
                                             "seconds a circuit stays open before probing",
                                             metavar="SECONDS")
    circuit_breaker_failure_ratio: float = setting(0.0, parse_ratio,
                                                   "or open at this share of failures over the "
                                                   "window (0: off)", metavar="RATIO")
    circuit_breaker_window: int = setting(20, positive(parse_count),
                                          "outcomes the failure ratio is taken over", metavar="N")
    circuit_breaker_half_open_probes: int = setting(1, positive(parse_count),
                                                    "requests let through at once while half-open",
                                                    metavar="N")
    health_check_path: str = setting("", str,
                                     "path to probe on each upstream (empty: no active checks)",
                                     metavar="PATH")
    health_check_interval: float = setting(5.0, positive(parse_seconds),
                                           "seconds between active checks", metavar="SECONDS")
    health_check_timeout: float = setting(2.0, positive(parse_seconds),
                                          "seconds an active check may take", metavar="SECONDS")
    healthy_threshold: int = setting(2, positive(parse_count),
                                     "passed checks that restore an upstream", metavar="N")
    unhealthy_threshold: int = setting(3, positive(parse_count),
                                       "failed checks that eject an upstream", metavar="N")
    # -- admin endpoints
    admin_token: str = setting("", str, "bearer token the admin endpoints require (empty: none)",
                               metavar="TOKEN")
    legacy_endpoints: bool = setting(False, parse_bool,
                                     "also answer /stats, /proxy-metrics and /proxy-health, as "
                                     "the services fileproxy replaces did")
    # -- shared state and async tasks
    redis_url: str = setting(
        "", parse_redis_url,
        "Redis for state shared by workers and instances (redis://, rediss://, unix://), or a "
        "master found through Redis Sentinel: redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT"
        "...]/SERVICE[/DB] (the sentinels' addresses, port 26379 if left out; the service name "
        "they monitor; PASSWORD is the master's, sentinels are asked without one); after a "
        "failover the new master is used by itself; empty: in-memory, one process",
        metavar="URL")
    state_prefix: str = setting("fileproxy", str, "prefix of every key fileproxy stores",
                                metavar="PREFIX")
    cors_origin: tuple[str, ...] = setting(
        (), str, "a web origin (https://app.example) whose pages may use the upload and task "
                 "endpoints (CORS); * for any (repeat)", metavar="ORIGIN", repeat=True)
    async_route: tuple[str, ...] = setting(
        (), str, "requests run as async tasks without Prefer: respond-async, e.g. 'POST /api/*' "
                 "(repeat)", metavar="'METHOD /path*'", repeat=True)
    task_ttl: float = setting(86400.0, positive(parse_seconds),
                              "how long a task and its result are kept", metavar="SECONDS")
    task_inline_max: int = setting(1024 * 1024, parse_size,
                                   "task bodies and results up to this size live in the store, "
                                   "larger ones in the spool directory", metavar="SIZE")
    spool_dir: str = setting(os.path.join(tempfile.gettempdir(), "fileproxy-spool"), str,
                             "directory for large task bodies and results (share it between "
                             "instances that share Redis)", metavar="DIR")
    task_concurrency: int = setting(4, positive(parse_count),
                                    "async tasks each worker runs at once", metavar="N")
    task_queue_size: int = setting(10000, positive(parse_count),
                                   "queued tasks before new ones get 503", metavar="N")
    task_timeout: float = setting(0.0, parse_seconds,
                                  "limit on a whole task (0: none; hours are fine)",
                                  metavar="SECONDS")
    task_read_timeout: float = setting(3600.0, positive(parse_seconds),
                                       "how long a task's upstream may stay silent",
                                       metavar="SECONDS")
    task_visibility_timeout: float = setting(
        30.0, positive(parse_seconds),
        "a task claimed by a worker that stopped answering is run again after this",
        metavar="SECONDS")
    # -- resumable uploads (tus 1.0)
    upload_max_size: int = setting(100 * 1024**3, positive(parse_size),
                                   "largest resumable upload", metavar="SIZE")
    upload_spool_quota: int = setting(200 * 1024**3, positive(parse_size),
                                      "spool space all unfinished uploads may take (beyond: "
                                      "507)", metavar="SIZE")
    upload_ttl: float = setting(86400.0, positive(parse_seconds),
                                "an unfinished upload expires this long after creation",
                                metavar="SECONDS")
    upload_token: str = setting("", str, "bearer token needed to create an upload (empty: "
                                "none), so an open proxy is not open storage", metavar="TOKEN")
    upload_sweep_interval: float = setting(60.0, positive(parse_seconds),
                                           "how often expired uploads free their spool space",
                                           metavar="SECONDS")
    upload_lock_ttl: float = setting(4.0, positive(parse_seconds),
                                     "an upload's PATCH lease, renewed by a heartbeat while the "
                                     "PATCH runs; a crashed worker's lock frees after this",
                                     metavar="SECONDS")
    upload_stall: float = setting(2.0, positive(parse_seconds),
                                  "a PATCH that received no byte for this long gives its upload "
                                  "up to a newer HEAD or PATCH for it (keeping what arrived)",
                                  metavar="SECONDS")
    resumable_uploads: bool = setting(
        True, parse_bool,
        "a POST, PUT or PATCH to a proxied path that carries Upload-Complete (the IETF resumable "
        "uploads draft, interop versions 6 and 8) becomes a resumable upload, delivered upstream "
        "once complete; off: forwarded as it is")
    upload_delivery_wait: float = setting(5.0, parse_seconds,
                                          "how long the final PATCH waits for the upstream's "
                                          "answer before returning", metavar="SECONDS")
    upload_delivery_backoff: float = setting(
        1.0, positive(parse_seconds),
        "a finished upload the upstream did not accept (no answer, 408, 425, 429, 5xx) is sent "
        "again after this long, doubling up to 60 s, until it is accepted or the upload expires",
        metavar="SECONDS")
    socket_relay: str = setting(
        "copy", choice("copy", "splice", "off"),
        "bodies over 1 MiB with a known length go socket to socket once the headers are through, "
        "both ways: copy (one reusable 256 KiB buffer), splice (a kernel pipe, Linux) or off "
        "(through aiohttp's streams)")
    fast_path: bool = setting(True, parse_bool,
                              "plain HTTP/1.1 GETs are served by fileproxy's own protocol "
                              "(httptools), the rest by aiohttp's server; off: aiohttp for all")
    lean_client: bool = setting(True, parse_bool,
                                "GETs to http:// upstreams use fileproxy's lean HTTP/1.1 client "
                                "(httptools, own keep-alive pool); off: aiohttp's for all")
    host_header: str = setting("preserve", choice("preserve", "upstream"),
                               "Host sent upstream: the client's (preserve) or the upstream's")
    trust_forwarded: bool = setting(
        False, parse_bool,
        "keep incoming X-Forwarded-Proto/-Host (behind a trusted proxy); X-Forwarded-For is "
        "always appended to")
    via: str = setting("fileproxy", str, "pseudonym added to the Via header (empty: no Via)",
                       metavar="NAME")
    max_header_size: int = setting(64 * 1024, positive(parse_size),
                                   "largest request header block accepted (else 431)",
                                   metavar="SIZE")
    max_headers: int = setting(200, positive(parse_count),
                               "most request header fields accepted (else 431)", metavar="N")
    graceful_timeout: float = setting(
        600.0, positive(parse_seconds),
        "seconds a stopping worker lets running transfers finish", metavar="SECONDS")
    access_log: bool = setting(True, parse_bool, "write one access-log line per request")
    access_log_format: str = setting("plain", choice("plain", "json"),
                                     "access-log lines as key=value text or one JSON object")
    log_level: str = setting("info", choice("debug", "info", "warning", "error"),
                             "log level")

    def __post_init__(self) -> None:
        if self.tcp_congestion == "auto":  # the default, not yet resolved against this kernel
            object.__setattr__(self, "tcp_congestion", parse_congestion("auto"))
        if not self.upstream:
            raise ConfigError("--upstream: at least one upstream URL is required "
                              "(e.g. --upstream http://127.0.0.1:8000)")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("--certfile and --keyfile: HTTPS needs both")
        key_ids = [key.partition("=")[0] for key in self.signing_key]
        if len(set(key_ids)) != len(key_ids):
            raise ConfigError("--signing-key: a key id is given twice")
        if self.require_signature and not self.signing_key:
            raise ConfigError("--require-signature needs at least one --signing-key")
        if self.reuse_port == "yes" and self.bind.startswith("unix:"):
            raise ConfigError("--reuse-port yes: a unix socket cannot be shared out that way "
                              "(use a HOST:PORT --bind, or --reuse-port auto)")

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


SETTINGS = {f.name: f for f in fields(Config)}
SECRET_SETTINGS = frozenset({"signing_key"})  # never echoed in an error


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def coerce(name: str, raw: Any, source: str) -> Any:
    """Turn one raw value (string, or list for repeatable settings) into the field's value."""
    spec = SETTINGS[name]
    parse = spec.metadata["parse"]
    try:
        if spec.metadata["repeat"]:
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            parts = [part for item in items for part in str(item).split(",")]
            return tuple(parse(part) for part in parts if part.strip())
        if isinstance(raw, bool) and parse is parse_bool:
            return raw
        return parse(raw)
    except (TypeError, ValueError) as error:
        shown = "the value is not shown: it holds secrets" if name in SECRET_SETTINGS \
            else f"got {raw!r}"
        raise ConfigError(f"{flag_name(name)} (from {source}): {error} ({shown})") from None


def values_from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from None
    values = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(f"--config: unknown setting {key!r} in {path}")
        values[name] = coerce(name, raw, path)
    return values


def values_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in SETTINGS:
        if env_name(name) in environ:
            values[name] = coerce(name, environ[env_name(name)], env_name(name))
    return values


def load_config(cli_values: Mapping[str, Any] | None = None, config_file: str | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then FILEPROXY_* env vars, then CLI values (already raw)."""
    return Config(**setting_values(cli_values, config_file, environ))


def setting_values(cli_values: Mapping[str, Any] | None = None, config_file: str | None = None,
                   environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given (not the defaults), parsed, each from where it wins: the command line,
    else FILEPROXY_* env, else the TOML file."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(CONFIG_FILE_ENV)
    values: dict[str, Any] = values_from_file(config_file) if config_file else {}
    values.update(values_from_env(environ))
    for name, raw in (cli_values or {}).items():
        values[name] = coerce(name, raw, "command line")
    return values


_active: Config | None = None


def activate(config: Config) -> None:
    """Make `config` the one the gunicorn settings and the worker app factory read."""
    global _active
    _active = config


def active_config() -> Config:
    """The Config the CLI activated, or (plain `gunicorn -c gunicorn.conf.py`) env + file."""
    global _active
    if _active is None:
        _active = load_config()
    return _active
