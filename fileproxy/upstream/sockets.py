"""TCP socket options (TCP_NODELAY, buffers, congestion control) for client-side and upstream sockets."""

from __future__ import annotations

import functools
import logging
import socket
import struct
from dataclasses import dataclass

from aiohappyeyeballs import AddrInfoType

from fileproxy.config import Config

log = logging.getLogger("fileproxy.upstream.sockets")
_warned: list[bool] = []
TCP_INFO_RTT = struct.Struct("=I")  # tcpi_rtt, microseconds (linux/tcp.h)
TCP_INFO_RTT_OFFSET = 68


@dataclass(frozen=True)
class SocketOptions:
    nodelay: bool = True
    sndbuf: int = 0
    rcvbuf: int = 0
    congestion: str = ""
    congestion_min_rtt: float = 0.0  # seconds; shorter paths use short_path_congestion
    short_path_congestion: str = ""

    @classmethod
    def from_config(cls, config: Config) -> SocketOptions:
        return cls(nodelay=config.tcp_nodelay, sndbuf=config.socket_sndbuf,
                   rcvbuf=config.socket_rcvbuf, congestion=config.tcp_congestion,
                   congestion_min_rtt=config.tcp_congestion_min_rtt,
                   short_path_congestion=short_path_congestion())

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
        if self.initial_congestion:
            self.set_congestion(sock, self.initial_congestion)

    @property
    def decided_by_rtt(self) -> bool:
        """Whether the path's round trip chooses between two algorithms."""
        return bool(self.congestion and self.congestion_min_rtt and self.short_path_congestion
                    and self.congestion != self.short_path_congestion)

    @property
    def initial_congestion(self) -> str:
        """What a socket starts with: the short-path algorithm while its path is unmeasured.
        (A switch to bbr once the path proves long works; a switch away from bbr would leave
        its pacing on, which measured worse than bbr itself.)"""
        return self.short_path_congestion if self.decided_by_rtt else self.congestion

    def set_congestion(self, sock: socket.socket, name: str) -> None:
        """A tuning knob, not a reason to fail a connection: if the kernel refuses (the algorithm
        is not in net.ipv4.tcp_allowed_congestion_control for an unprivileged process), say so
        once and keep the system default."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as error:
            if not _warned:
                _warned.append(True)
                log.warning("cannot use TCP congestion control %r (%s); using the system "
                            "default", name, error.strerror)

    def fit_congestion(self, sock: socket.socket | None) -> None:
        """Once connected: a path whose handshake took at least congestion_min_rtt (or was not
        measured) switches from cubic to the configured algorithm (bbr), a shorter one keeps
        (or, on a socket that did not start with it, takes) cubic. bbr's pacing is what
        keeps a long lossy link full, but on a short fast one it only costs: on a veth LAN with
        wire-sized packets it held one stream to 0.7 Gbit/s where cubic moved 1.7-1.9, and on
        loopback it costs about a tenth."""
        if not self.decided_by_rtt or sock is None \
                or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        rtt = handshake_rtt(sock)
        long_path = rtt is None or rtt >= self.congestion_min_rtt
        self.set_congestion(sock, self.congestion if long_path else self.short_path_congestion)

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


def handshake_rtt(sock: socket.socket) -> float | None:
    """The connection's smoothed round trip in seconds (right after the handshake, the
    handshake's own), or None when the kernel has not measured one."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < TCP_INFO_RTT_OFFSET + TCP_INFO_RTT.size:
        return None
    micros = TCP_INFO_RTT.unpack_from(info, TCP_INFO_RTT_OFFSET)[0]
    return micros / 1e6 if micros else None


@functools.cache
def short_path_congestion() -> str:
    """cubic where the kernel has it, else its default for new sockets ("" when neither can
    be read); read once per process."""
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as handle:
            if "cubic" in handle.read().split():
                return "cubic"
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def read_options(sock: socket.socket) -> dict[str, object]:
    """The options in force on a socket, for tests and diagnostics."""
    return {
        "nodelay": bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)),
        "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "congestion": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        .split(b"\0", 1)[0].decode(),
    }
