"""fileproxy's gunicorn settings and hooks, read from the activated Config; gunicorn takes this module."""

# How gunicorn reads this module: `fileproxy serve` loads it by name
# (python:fileproxy.server.gunicorn_settings, see fileproxy/server/run.py), and the documented
# deployment file gunicorn.conf.py star-imports it for a plain `gunicorn -c gunicorn.conf.py`.
# Every public lower-case name here that gunicorn knows is one of its settings (and `config` is
# one too: gunicorn's own -c), so helpers stay private (_name) and unknown names are ignored.
# The values users tune come from fileproxy's Config; the rest is fixed here, each line explained.

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fileproxy.config import active_config
from fileproxy.observability import metrics
from fileproxy.server.listeners import (
    LISTEN_BACKLOG,
    listening_note,
    listening_problem,
    socket_per_worker,
)
from fileproxy.upstream.sockets import SocketOptions

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

_config = active_config()  # --flags via `fileproxy serve`, or FILEPROXY_* env / FILEPROXY_CONFIG file

# ---------------------------------------------------------------- listening

# Where clients connect (--bind, FILEPROXY_BIND); gunicorn owns the listening sockets.
bind = [_config.bind]
# Pending connections the kernel queues per listener before refusing; bursts of clients fit.
backlog = LISTEN_BACKLOG
# Each worker binds a socket of its own (SO_REUSEPORT) rather than sharing the master's
# (--reuse-port; server/listeners.py says when).
reuse_port = socket_per_worker(_config)

# ---------------------------------------------------------------- TLS

# HTTPS when --certfile/--keyfile are set: gunicorn checks the files; fileproxy's worker builds the
# context itself (server/tls.py: ALPN h2 and http/1.1, --tls-min-version, session tickets) and
# reads the certificate again on SIGHUP, which the master passes on (server/run.py).
certfile = _config.certfile or None
keyfile = _config.keyfile or None

# ---------------------------------------------------------------- workers

# Worker processes (--workers, FILEPROXY_WORKERS; default 2 per CPU): each runs its own event loop.
workers = _config.workers
# aiohttp on uvloop: one event loop per worker streams thousands of transfers at once (with
# fileproxy's TLS context and its reload on SIGHUP: server/worker.py).
worker_class = "fileproxy.server.worker.Worker"
# The worker factory returns fileproxy's tuned AppRunner (keep-alive, limits, handler cancellation).
wsgi_app = "fileproxy.app:gunicorn_app"
# Idle client keep-alive; clients 300 ms away need far more than gunicorn's 2 s (the runner uses it).
keepalive = int(_config.client_keepalive)
# A stopping worker lets running transfers finish this long before they are cut (SIGTERM, reload).
graceful_timeout = int(_config.graceful_timeout)
# Heartbeat: an async worker reports every second; one silent this long is stuck and replaced.
timeout = 60
# Recycle workers after this many requests (a guard against slow leaks; at 7,000 small requests/s
# per worker that is every few minutes), with jitter so they never all restart at once.
max_requests = 2_000_000
max_requests_jitter = 200_000
# Heartbeat files on tmpfs, so a slow or busy disk never makes a healthy worker look dead.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# ---------------------------------------------------------------- logging and control

# gunicorn's own log to stderr; the per-request access log is written by the aiohttp runner.
errorlog = "-"
loglevel = _config.log_level
# Requests are logged by fileproxy's runner (bytes and duration per line), not by gunicorn.
accesslog = None
# No shared control socket: several fileproxy instances on one host would fight over its path.
control_socket_disable = True
# Keep the process name recognisable in ps/top.
proc_name = "fileproxy"

# ---------------------------------------------------------------- hooks


def on_starting(server: Arbiter) -> None:
    """How the workers will listen (said in one line, and a --bind that cannot be had stops
    start-up with one), and a fresh directory where every worker's metrics meet
    (prometheus-client multiprocess)."""
    if problem := listening_problem(_config, server.cfg.reuse_port):
        raise SystemExit(f"fileproxy: error: {problem}")
    if server.log is not None:
        server.log.info(listening_note(_config, server.cfg.reuse_port))
    metrics.prepare_multiprocess_dir()


def child_exit(server: Arbiter, worker: Worker) -> None:
    """A worker that exited no longer counts in live gauges (active requests, queue, ...)."""
    metrics.worker_exited(int(worker.pid))  # (an int by now; typed str for its booting placeholder)


def on_exit(server: Arbiter) -> None:
    metrics.remove_multiprocess_dir()


def post_fork(server: Arbiter, worker: Worker) -> None:
    """Tune a worker's listening sockets (the master's shared ones, or its own) before it
    accepts: accepted sockets inherit buffers and congestion control from them (aiohttp sets
    TCP_NODELAY on each accepted socket)."""
    options = SocketOptions.from_config(_config)
    for listener in worker.sockets:
        options.apply_to_listener(listener)  # (gunicorn's wrapper passes calls to its socket)
