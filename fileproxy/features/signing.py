"""Signed links (as nginx's secure_link): fp-expires, fp-key, fp-signature checked before any upstream."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from urllib.parse import unquote

from yarl import URL

from fileproxy.config import Config
from fileproxy.http.errors import ProxyError

# Query parameters with this prefix belong to the link: never signed, never forwarded.
LINK_PARAMETER_PREFIX = "fp-"
EXPIRES = "fp-expires"
KEY = "fp-key"
SIGNATURE = "fp-signature"
LINK_PARAMETERS = (EXPIRES, KEY, SIGNATURE)
UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------- what is signed, and how

def canonical_string(method: str, target: str, expires: int) -> str:
    """What a signature covers, one line each (joined by "\\n"): the method; the path as in the
    link (percent-encoding kept); the query's items (NAME=VALUE as in the link) without fp- ones
    and empty ones, sorted by name, repeated names in link order, joined by '&'; the expiry."""
    path, _, query = target.partition("?")
    items = sorted(signed_items(query), key=item_name)
    return f"{method}\n{path}\n{'&'.join(items)}\n{expires}"


def signed_items(query: str) -> list[str]:
    """The query's items a signature covers and the upstream receives, in link order."""
    return [item for item in query.split("&")
            if item and not item.startswith(LINK_PARAMETER_PREFIX)]


def item_name(item: str) -> str:
    return item.partition("=")[0]


def signature(secret: str, canonical: str) -> str:
    """HMAC-SHA256 of the canonical string under the secret (both UTF-8), in lowercase hex."""
    message = canonical.encode("utf-8", "surrogateescape")
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def without_link_parameters(target: str) -> str:
    """The target as it goes upstream: the fp- (and empty) query items taken off."""
    path, has_query, query = target.partition("?")
    kept = "&".join(signed_items(query)) if has_query else ""
    return f"{path}?{kept}" if kept else path


# ---------------------------------------------------------------- signing

def signed_target(method: str, target: str, key_id: str, secret: str, expires: int) -> str:
    """The origin-form target with its link parameters, valid for `method` until `expires`
    (unix seconds); fp- parameters it already had are replaced."""
    proof = signature(secret, canonical_string(method.upper(), target, expires))
    unsigned = without_link_parameters(target)
    joiner = "&" if "?" in unsigned else "?"
    return f"{unsigned}{joiner}{EXPIRES}={expires}&{KEY}={key_id}&{SIGNATURE}={proof}"


def signed_link(url: str, key_id: str, secret: str, expires: int, method: str = "GET") -> str:
    """An absolute URL or a path, signed: first spelled as yarl (so aiohttp, curl and browsers)
    will send it, so that the path and query signed are the ones the proxy receives."""
    parsed = URL(url)
    if not parsed.raw_path.startswith("/"):
        raise ValueError(f"expected an absolute URL or a path starting with /, got {url!r}")
    base = str(parsed.with_path("").with_query(None).with_fragment(None)) \
        if parsed.absolute else ""
    fragment = f"#{parsed.raw_fragment}" if parsed.raw_fragment else ""
    return base + signed_target(method, parsed.raw_path_qs, key_id, secret, expires) + fragment


# ---------------------------------------------------------------- checking

def verified_target(method: str, target: str, config: Config) -> str:
    """The target to forward. Under a --require-signature prefix its link must verify (else 403,
    or 410 once expired past the skew); elsewhere a link that verifies is taken off too and one
    that does not is left alone (not fileproxy's to judge). Verified links lose their fp- items."""
    if not (config.require_signature or config.signing_key):
        return target
    path, _, query = target.partition("?")
    required = requires_signature(path, config.require_signature)
    if not required and f"{SIGNATURE}=" not in query:
        return target
    try:
        check_link(method, target, config, time.time())
    except ProxyError:
        if required:
            raise
        return target
    return without_link_parameters(target)


def requires_signature(raw_path: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and any(resolved_path(raw_path).startswith(prefix)
                                  for prefix in prefixes)


def resolved_path(raw_path: str) -> str:
    """The path as a lenient upstream may resolve it, ending in '/': percent-decoded, empty and
    '.' segments dropped, '..' applied; so `/a/../private/x`, `//private/x` or `/%70rivate/x`
    still fall under the prefix /private/ (and `/private` does too)."""
    segments: list[str] = []
    for segment in unquote(raw_path).split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "".join(f"{segment}/" for segment in segments)


def check_link(method: str, target: str, config: Config, now: float) -> None:
    """403 for a link missing, malformed, of an unknown key or whose signature does not match
    this method, path, query and expiry; 410 for a genuine one past its expiry and the skew."""
    expires_text, key_id, given = link_parameters(target.partition("?")[2])
    if not UNIX_SECONDS.fullmatch(expires_text) or not KEY_ID.fullmatch(key_id) \
            or not HEX_SIGNATURE.fullmatch(given):
        raise ProxyError(403, f"Forbidden: malformed signed link ({EXPIRES}: unix seconds, "
                              f"{KEY}: a key id, {SIGNATURE}: 64 lowercase hex digits)")
    secret = signing_secrets(config.signing_key).get(key_id)
    if secret is None:
        raise ProxyError(403, f"Forbidden: the link's signing key {key_id!r} is not known")
    expires = int(expires_text)
    if not hmac.compare_digest(signature(secret, canonical_string(method, target, expires)),
                               given):
        raise ProxyError(403, "Forbidden: the link's signature does not match this method, "
                              "path, query and expiry")
    if now > expires + config.signature_skew:
        expired_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise ProxyError(410, f"Gone: the signed link expired at {expired_at}")


def link_parameters(query: str) -> tuple[str, str, str]:
    """fp-expires, fp-key and fp-signature, each present once (else 403)."""
    found: dict[str, list[str]] = {name: [] for name in LINK_PARAMETERS}
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if name in found:
            found[name].append(value)
    if any(len(values) != 1 for values in found.values()):
        raise ProxyError(403, f"Forbidden: this path needs a signed link ({EXPIRES}, {KEY} and "
                              f"{SIGNATURE}, each once)")
    return found[EXPIRES][0], found[KEY][0], found[SIGNATURE][0]


@functools.lru_cache(maxsize=8)
def signing_secrets(keys: tuple[str, ...]) -> dict[str, str]:
    """--signing-key ID=SECRET values by id."""
    return {key_id: secret for key_id, _, secret in (key.partition("=") for key in keys)}
