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


def socket_per_worker(config: Config) -> bool:
    """Does each worker listen on a socket of its own? (--reuse-port; only with several workers
    on a TCP address with a port: on port 0 each worker would get a port of its own.)"""
    if config.workers < 2 or config.bind.startswith("unix:") \
            or tcp_address(config.bind)[1][1] == 0:
        return False
    if config.reuse_port == "auto":
        return kernel_migrates_waiting_connections()
    return config.reuse_port == "yes"


def listening_note(config: Config) -> str | None:
    """One line for the log when the workers share one socket because of the kernel setting."""
    if config.reuse_port != "auto" or config.workers < 2 or config.bind.startswith("unix:") \
            or kernel_migrates_waiting_connections():
        return None
    return ("fileproxy: the workers share one listening socket (--reuse-port auto: "
            "net.ipv4.tcp_migrate_req is not 1); new connections may fall unevenly on them")


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
