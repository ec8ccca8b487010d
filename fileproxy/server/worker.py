"""fileproxy's gunicorn worker: aiohttp's on uvloop, with fileproxy's TLS context, reloaded on SIGHUP."""

from __future__ import annotations

import signal
import ssl

from fileproxy.compat import ContextWorker
from fileproxy.config import active_config
from fileproxy.server.tls import reload_certificate, server_context


class Worker(ContextWorker):
    """A worker whose certificate is read again on SIGHUP: handshakes from then on use the new
    one, connections already open (and their transfers) go on untouched."""

    tls: ssl.SSLContext | None = None

    def server_tls(self) -> ssl.SSLContext | None:
        self.tls = server_context(active_config())
        return self.tls

    def init_signals(self) -> None:
        super().init_signals()
        self.loop.add_signal_handler(signal.SIGHUP, self.reload_certificate)

    def reload_certificate(self) -> None:
        reload_certificate(self.tls, active_config())
