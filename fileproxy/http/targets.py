"""Target policy shared by every request path and by work stored for later (upload deliveries): no
dot-segments above the root, origin-form only; a method that is a token, never CONNECT; field
values without CR, LF or NUL."""

from __future__ import annotations

import re

from fileproxy.http.errors import ProxyError

# RFC 9110 5.6.2: a token (method, field name).
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
UNSAFE_IN_VALUES = re.compile(r"[\r\n\x00]")


def check_method(method: str) -> None:
    """A method fileproxy will send: a token, not CONNECT."""
    if not TOKEN.fullmatch(method.encode("utf-8", "replace")) or method == "CONNECT":
        raise ProxyError(400, f"Bad Request: {method[:32]!r} is not a method fileproxy sends")


def check_value(name: str, value: str) -> None:
    """A header value to be sent later: no CR, LF or NUL (they would split or end the head)."""
    if UNSAFE_IN_VALUES.search(value):
        raise ProxyError(400, f"Bad Request: {name} holds CR, LF or NUL")


def check_dot_segments(target: str) -> None:
    """Refuse a path whose `..` segments (percent-encoded too) climb above the root, as nginx
    does: an upstream that resolves them could serve what lies outside its tree."""
    path = target.partition("?")[0]
    if "." not in path and "%2" not in path:
        return
    depth = 0
    for segment in path.split("/")[1:]:
        plain = segment.replace("%2e", ".").replace("%2E", ".")
        if plain == "..":
            if depth == 0:
                raise ProxyError(400, "Bad Request: the target's dot-segments climb above the "
                                      "root")
            depth -= 1
        elif plain != ".":
            depth += 1


def origin_form_path(target: str) -> str:
    """A target accepted for later delivery (an upload's `target`): origin-form only."""
    if not target.startswith("/"):
        raise ProxyError(400, "Bad Request: the target must be an origin-form path such as "
                              "/files/name")
    check_dot_segments(target)
    return target
