"""What benchmarks measure: origins (nginx static or our aiohttp one) and the proxies set side by side.

Every proxy runs 2 workers on the same origin: fileproxy under gunicorn, nginx tuned for streaming,
HAProxy and Caddy when installed, and a naive aiohttp proxy as the floor.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import free_port, spawn, terminate, wait_http

WORKERS = 2


@dataclass(frozen=True)
class Place:
    """Where a server runs: an address to bind and, for the bad-network harness, a namespace."""

    host: str = "127.0.0.1"
    namespace: str | None = None

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args] if self.namespace else args

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return spawn(self.command(args), **kwargs)

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    def wait(self, url: str, process: subprocess.Popen[bytes]) -> None:
        """Until the server answers, asked from its own place."""
        if self.namespace is None:
            wait_http(url, process)
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            probe = subprocess.run(self.command(["curl", "-s", "-k", "-o", "/dev/null", "-m", "1",
                                                 url]), check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{url} did not answer within 30 s")


LOOPBACK = Place()


@dataclass
class Running:
    """A started server: its URL, its process (the tree is what gets measured) and a label."""

    name: str
    url: str
    process: subprocess.Popen[bytes] | None
    note: str = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)


@dataclass
class Workdir:
    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fileproxy-bench-")))
    extra: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path.chmod(0o755)  # nginx workers run as an unprivileged user and read files here

    def file(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(text)
        return target

    def remove(self) -> None:
        for path in [self.path, *self.extra]:
            shutil.rmtree(path, ignore_errors=True)


def tmpfs_or(fallback: Path) -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else fallback


# ---------------------------------------------------------------- origins

NGINX_HEAD = """
worker_processes {workers};
daemon off;
pid {dir}/{role}-nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
"""

NGINX_ORIGIN = NGINX_HEAD.replace("{role}", "origin") + """
  sendfile on;
  tcp_nopush on;
  server {{
    listen {host}:{port} backlog=4096;
    root {files};
    # An upload sink that reads the whole body before answering (return 200 would answer first):
    # WebDAV PUT into tmpfs.
    location /upload/ {{
      root {sink};
      client_max_body_size 0;
      client_body_temp_path {sink}/tmp;
      dav_methods PUT;
      create_full_put_path on;
    }}
  }}
}}
"""


def make_files(directory: Path, sizes: dict[str, int]) -> None:
    """Sparse files of the given sizes (zeros: the proxies cannot tell)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        with open(directory / name, "wb") as handle:
            handle.truncate(size)


def start_origin(work: Workdir, sizes: dict[str, int], place: Place = LOOPBACK) -> Running:
    """nginx serving static files when installed (the fastest origin), else tests/origin.py."""
    port = free_port()
    if shutil.which("nginx"):
        files = work.path / "files"
        make_files(files, sizes)
        sink = Path(tempfile.mkdtemp(prefix="fileproxy-sink-", dir=tmpfs_or(work.path)))
        sink.chmod(0o777)
        work.extra.append(sink)
        conf = work.file("origin-nginx.conf", NGINX_ORIGIN.format(
            workers=WORKERS, dir=work.path, host=place.host, port=port, files=files, sink=sink))
        process = place.spawn(["nginx", "-p", str(work.path), "-c", str(conf)])
        running = Running("origin (nginx static)", place.url(port), process)
    else:
        process = place.spawn([sys.executable, "-m", "tests.origin", "--host", place.host,
                               "--port", str(port)])
        running = Running("origin (aiohttp)", place.url(port), process,
                          note="nginx not installed: the aiohttp test origin serves")
    place.wait(running.url + "/", process)
    return running


def origin_path(origin: Running, name: str, size: int) -> str:
    """The path of a file of `size` bytes on this origin."""
    return f"/{name}" if "nginx" in origin.name else f"/bytes/{size}"


# ---------------------------------------------------------------- proxies

NGINX_PROXY = NGINX_HEAD.replace("{role}", "proxy") + """
  client_body_temp_path {dir}/proxy-body;
  proxy_temp_path {dir}/proxy-temp;
  upstream origin {{ server {origin}; keepalive 64; }}
  server {{
    listen {host}:{port} backlog=4096;
    client_max_body_size 0;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_buffer_size 256k;
      proxy_buffers 8 256k;
      proxy_busy_buffers_size 512k;
    }}
  }}
}}
"""

HAPROXY = """
global
  nbthread {workers}
  maxconn 8000
defaults
  mode http
  timeout connect 10s
  timeout client 300s
  timeout server 300s
  http-reuse safe
frontend in
  bind {host}:{port}
  default_backend origin
backend origin
  server o1 {origin}
"""

CADDY = """
{{
  admin off
  auto_https off
}}
http://{host}:{port} {{
  reverse_proxy {origin} {{
    flush_interval -1
  }}
}}
"""


def hostport(url: str) -> str:
    return url.removeprefix("http://")


def start_fileproxy(origin: Running, work: Workdir, extra: list[str],
                    place: Place = LOOPBACK) -> Running:
    port = free_port()
    process = place.spawn([sys.executable, "-m", "fileproxy", "serve", "--upstream", origin.url,
                           "--bind", f"{place.host}:{port}", "--workers", str(WORKERS),
                           "--no-access-log", *extra], log=work.path / "fileproxy.log")
    url = place.url(port)
    if "--certfile" in extra:
        url = url.replace("http://", "https://", 1)
    running = Running("fileproxy", url, process, note=" ".join(extra))
    place.wait(running.url + "/_fileproxy/health", process)
    return running


def start_nginx(origin: Running, work: Workdir, place: Place = LOOPBACK) -> Running | None:
    if not shutil.which("nginx"):
        return None
    port = free_port()
    conf = work.file("proxy-nginx.conf", NGINX_PROXY.format(
        workers=WORKERS, dir=work.path, host=place.host, port=port,
        origin=hostport(origin.url)))
    process = place.spawn(["nginx", "-p", str(work.path), "-c", str(conf)],
                          log=work.path / "nginx.log")
    running = Running("nginx", place.url(port), process,
                      note="proxy_buffering off, proxy_request_buffering off, "
                           "proxy_buffer_size 256k, upstream keepalive 64")
    place.wait(running.url + "/", process)
    return running


def start_haproxy(origin: Running, work: Workdir, place: Place = LOOPBACK) -> Running | None:
    if not shutil.which("haproxy"):
        return None
    port = free_port()
    conf = work.file("haproxy.cfg", HAPROXY.format(workers=WORKERS, host=place.host, port=port,
                                                   origin=hostport(origin.url)))
    process = place.spawn(["haproxy", "-db", "-f", str(conf)], log=work.path / "haproxy.log")
    running = Running("haproxy", place.url(port), process, note="nbthread 2")
    place.wait(running.url + "/", process)
    return running


def start_caddy(origin: Running, work: Workdir, place: Place = LOOPBACK) -> Running | None:
    if not shutil.which("caddy"):
        return None
    port = free_port()
    conf = work.file("Caddyfile", CADDY.format(host=place.host, port=port,
                                               origin=hostport(origin.url)))
    process = place.spawn(["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"],
                          log=work.path / "caddy.log",
                          env={"GOMAXPROCS": str(WORKERS), "HOME": str(work.path),
                               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    running = Running("caddy", place.url(port), process, note="GOMAXPROCS=2")
    place.wait(running.url + "/", process)
    return running


def start_naive(origin: Running, work: Workdir, place: Place = LOOPBACK) -> Running:
    port = free_port()
    empty_conf = work.file("naive_gunicorn.py", "")  # not the repo's gunicorn.conf.py
    process = place.spawn([sys.executable, "-m", "gunicorn", "-c", str(empty_conf),
                           "--workers", str(WORKERS), "--worker-class",
                           "aiohttp.GunicornWebWorker", "--bind", f"{place.host}:{port}",
                           "--no-control-socket",
                           f"benchmarks.naive_proxy:make_app('{origin.url}')"],
                          log=work.path / "naive.log")
    running = Running("naive aiohttp", place.url(port), process,
                      note="session per request, 16 KiB iter_chunked, asyncio loop")
    place.wait(running.url + "/", process)
    return running


# ---------------------------------------------------------------- TLS (HTTP/1.1 and h2 by ALPN)

NGINX_TLS_PROXY = NGINX_PROXY.replace(
    "listen {host}:{port} backlog=4096;",
    "listen {host}:{port} ssl http2 backlog=4096;\n"
    "    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
    "    ssl_protocols TLSv1.3;\n    ssl_session_cache shared:tls:10m;\n"
    "    http2_body_preread_size 1m;")


def make_certificate(work: Workdir) -> tuple[str, str]:
    """A self-signed P-256 certificate for 127.0.0.1 and its key (openssl)."""
    cert, key = work.path / "tls.pem", work.path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=bench", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o644)  # (nginx reads it as root before dropping privileges, but be plain)
    return str(cert), str(key)


def start_tls_proxies(origin: Running, work: Workdir, fileproxy_flags: list[str]
                      ) -> tuple[list[Running], list[str]]:
    """fileproxy and nginx serving HTTPS (TLS 1.3; h2 and http/1.1 by ALPN) on loopback."""
    cert, key = make_certificate(work)
    fileproxy = start_fileproxy(origin, work, [*fileproxy_flags, "--certfile", cert,
                                               "--keyfile", key, "--tls-min-version", "1.3"])
    started = [Running("fileproxy TLS", fileproxy.url, fileproxy.process,
                       note="--certfile, --tls-min-version 1.3")]
    if not shutil.which("nginx"):
        return started, ["nginx TLS: nginx not installed, row skipped"]
    port = free_port()
    conf = work.file("proxy-nginx-tls.conf", NGINX_TLS_PROXY.format(
        workers=WORKERS, dir=work.path, host=LOOPBACK.host, port=port,
        origin=hostport(origin.url), cert=cert, key=key))
    process = LOOPBACK.spawn(["nginx", "-p", str(work.path), "-c", str(conf)],
                             log=work.path / "nginx-tls.log")
    nginx = Running("nginx TLS", f"https://{LOOPBACK.host}:{port}", process,
                    note="ssl_protocols TLSv1.3, http2, the proxy settings of the nginx row")
    wait_http(nginx.url + "/", process)
    return [*started, nginx], []


def start_proxies(origin: Running, work: Workdir, fileproxy_flags: list[str],
                  place: Place = LOOPBACK, peers: tuple[str, ...] = ("nginx", "haproxy", "caddy")
                  ) -> tuple[list[Running], list[str]]:
    """Every proxy that can run here, and a note for each that cannot."""
    started = [start_fileproxy(origin, work, fileproxy_flags, place)]
    notes = []
    starters = {"nginx": start_nginx, "haproxy": start_haproxy, "caddy": start_caddy}
    for name in peers:
        running = starters[name](origin, work, place)
        if running is None:
            notes.append(f"{name}: not installed, row skipped (apt-get install {name})")
        else:
            started.append(running)
    started.append(start_naive(origin, work, place))
    return started, notes
