"""Target policy shared by every request path and by work stored for later (upload deliveries): no
dot-segments above the root, origin-form only."""

from __future__ import annotations

from fileproxy.http.errors import ProxyError


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
