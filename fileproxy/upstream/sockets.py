"""TCP socket options (TCP_NODELAY, buffers, congestion control) for client-side and upstream sockets."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from aiohappyeyeballs import AddrInfoType

from fileproxy.config import Config

log = logging.getLogger("fileproxy.upstream.sockets")
_warned: list[bool] = []


@dataclass(frozen=True)
class SocketOptions:
    nodelay: bool = True
    sndbuf: int = 0
    rcvbuf: int = 0
    congestion: str = ""

    @classmethod
    def from_config(cls, config: Config) -> SocketOptions:
        return cls(nodelay=config.tcp_nodelay, sndbuf=config.socket_sndbuf,
                   rcvbuf=config.socket_rcvbuf, congestion=config.tcp_congestion)

    def apply(self, sock: socket.socket) -> None:
        """Set the options on a TCP socket; buffers must be set before connect/listen to count."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        if self.congestion:
            self.set_congestion(sock)

    def set_congestion(self, sock: socket.socket) -> None:
        """A tuning knob, not a reason to fail a connection: if the kernel refuses (the algorithm
        is not in net.ipv4.tcp_allowed_congestion_control for an unprivileged process), say so
        once and keep the system default."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion.encode())
        except OSError as error:
            if not _warned:
                _warned.append(True)
                log.warning("cannot use TCP congestion control %r (%s); using the system "
                            "default", self.congestion, error.strerror)

    def upstream_socket_factory(self, addr_info: AddrInfoType) -> socket.socket:
        """aiohttp TCPConnector(socket_factory=...): a new upstream socket, tuned before connect."""
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=kind, proto=proto)
        try:
            self.apply(sock)
        except OSError:
            sock.close()
            raise
        return sock

    def apply_to_listener(self, sock: socket.socket) -> None:
        """Accepted sockets inherit buffers and congestion control from their listener (Linux)."""
        try:
            self.apply(sock)
        except OSError as error:
            log.warning("cannot set socket options on listener %s: %s", sock.getsockname(), error)


def read_options(sock: socket.socket) -> dict[str, object]:
    """The options in force on a socket, for tests and diagnostics."""
    return {
        "nodelay": bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)),
        "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "congestion": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        .split(b"\0", 1)[0].decode(),
    }
