"""How gunicorn's workers listen: one socket shared by all, or one each (SO_REUSEPORT)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from fileproxy.config import Config

# Connections the kernel may hold for a worker to accept (gunicorn's --backlog default too).
LISTEN_BACKLOG = 2048

# Linux 5.14+: when a SO_REUSEPORT listener closes (its worker stopped or died), the connections
# waiting in its accept queue move to another listener of the group instead of being reset.
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def tcp_address(bind: str) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The family and address of a HOST:PORT --bind ([v6]:port too; an empty host: all)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def kernel_migrates_waiting_connections(setting: Path = MIGRATE_REQ) -> bool:
    try:
        return setting.read_text().strip() == "1"
    except OSError:  # an older kernel, or no /proc
        return False


def inherits_sockets() -> bool:
    """Were the listening sockets handed over (systemd socket activation, or the old master of a
    gunicorn USR2 upgrade)? gunicorn's reuse_port would ignore them."""
    return bool(os.environ.get("LISTEN_FDS") or os.environ.get("GUNICORN_FD"))


def socket_per_worker(config: Config) -> bool:
    """Does each worker listen on a socket of its own? (--reuse-port; only with several workers
    on a TCP address with a port: on port 0 each worker would get a port of its own.)"""
    if config.workers < 2 or config.bind.startswith("unix:") \
            or tcp_address(config.bind)[1][1] == 0 or inherits_sockets():
        return False
    if config.reuse_port == "auto":
        return kernel_migrates_waiting_connections()
    return config.reuse_port == "yes"


def listening_problem(config: Config, per_worker: bool) -> str | None:
    """Why the workers cannot each bind --bind (probed before they do: with SO_REUSEPORT a
    second server of the same user would otherwise join the group silently)."""
    if not per_worker or os.environ.get("GUNICORN_PID"):  # (a USR2 child: the old one has it)
        return None
    return address_problem(config)


def listening_note(config: Config, per_worker: bool) -> str:
    """One line for the log: how the workers listen, and why."""
    if per_worker:
        return f"fileproxy: each worker listens on a socket of its own at {config.bind}"
    if config.reuse_port == "auto" and config.workers > 1 and not inherits_sockets() \
            and not kernel_migrates_waiting_connections():
        return ("fileproxy: the workers share one listening socket (--reuse-port auto: "
                "net.ipv4.tcp_migrate_req is not 1); new connections may fall unevenly on them")
    return f"fileproxy: the workers share one listening socket at {config.bind}"


def address_problem(config: Config) -> str | None:
    """Why --bind cannot be listened on, found before the workers each bind it: with
    SO_REUSEPORT a second server of the same user would otherwise join the group silently."""
    family, address = tcp_address(config.bind)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = "in use" if error.errno == errno.EADDRINUSE else os.strerror(error.errno or 0)
            return f"--bind {config.bind}: {reason}"
    return None
