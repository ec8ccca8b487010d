"""TLS for client connections: the server context (chain, oldest version, ALPN), reloaded on SIGHUP.

Session resumption is on (TLS 1.3 tickets, TLS 1.2 tickets); ALPN offers h2 then http/1.1.
"""

from __future__ import annotations

import logging
import ssl

from fileproxy.config import Config

log = logging.getLogger("fileproxy.tls")

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertificateError(Exception):
    """The certificate or key cannot be used; the message names the file and why, in one line."""


def server_context(config: Config) -> ssl.SSLContext | None:
    """The context client connections are served with, or None without --certfile."""
    if not config.certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[config.tls_min_version]
    context.set_alpn_protocols(["h2", "http/1.1"] if config.http2 else ["http/1.1"])
    # Resumption: TLS 1.3 session tickets (OpenSSL's default, two per handshake) and TLS 1.2
    # tickets; a reconnecting client over a long round trip skips the full handshake.
    context.options &= ~ssl.OP_NO_TICKET
    load_certificate(context, config)
    return context


def load_certificate(context: ssl.SSLContext, config: Config) -> None:
    """(Re)load the chain and key into `context`: handshakes from now on use them; connections
    already open keep theirs."""
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except ssl.SSLError as error:
        raise CertificateError(why_unusable(config, error)) from None
    except OSError as error:
        raise CertificateError(f"--certfile {config.certfile} / --keyfile {config.keyfile}: "
                               f"{error.strerror or error}") from None


def why_unusable(config: Config, error: ssl.SSLError) -> str:
    """OpenSSL's reason in words a user can act on (its own is often just "PEM lib")."""
    if not pem_holds(config.certfile, "CERTIFICATE"):
        return f"--certfile {config.certfile}: no PEM certificate in it"
    if not pem_holds(config.keyfile, "PRIVATE KEY"):
        return f"--keyfile {config.keyfile}: no PEM private key in it"
    if error.reason == "KEY_VALUES_MISMATCH":
        return f"--keyfile {config.keyfile} is not the key of --certfile {config.certfile}"
    return f"--certfile {config.certfile} / --keyfile {config.keyfile}: {error.reason or error}"


def pem_holds(path: str, kind: str) -> bool:
    """Does the file hold a PEM block of this kind (CERTIFICATE, ... PRIVATE KEY)?"""
    try:
        with open(path, encoding="latin-1") as handle:
            text = handle.read(1 << 20)
    except OSError:
        return False
    return any(line.startswith("-----BEGIN ") and line.rstrip().endswith(f"{kind}-----")
               for line in text.splitlines())


def reload_certificate(context: ssl.SSLContext | None, config: Config) -> None:
    """SIGHUP: the certificate read again; a bad one is logged and the old one kept."""
    if context is None:
        return
    try:
        load_certificate(context, config)
    except CertificateError as error:
        log.error("certificate not reloaded, the old one stays: %s", error)
        return
    log.info("certificate reloaded from %s", config.certfile)
