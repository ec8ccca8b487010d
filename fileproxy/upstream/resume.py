"""Mid-body resume: a response whose upstream connection dies, stalls or is reset mid-body is
continued with `Range` + `If-Range` into the same client response, without a seam.

Only a response that can be continued safely takes part: a GET answered 200 (or 206 for the
client's own single range) with a known length, `Accept-Ranges: bytes` (or a 206, which shows it)
and a strong validator (a strong ETag, or a Last-Modified at least a second older than the
response's Date, RFC 9110 8.8.2.2 and 13.1.5). The rest is asked for from the byte where the
client's copy stops; the answer must be a 206 for exactly that span of the same object (same
Content-Range total, same validator), else the client connection is cut as before: never a clean
end, never bytes of two versions. Attempts that bring no new byte are counted; after
--upstream-resume-attempts in a row the client is cut.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from aiohttp import hdrs

from fileproxy.http.headers import Outgoing, response_length
from fileproxy.upstream.aiohttp_client import UpstreamResponse
from fileproxy.upstream.segments import FETCH_ERRORS

log = logging.getLogger("fileproxy.upstream.resume")

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0  # seconds before attempt 2, doubling up to this

# Sends one ranged request (choosing an upstream, the failed one last) and returns its response.
Fetch = Callable[[Outgoing], Awaitable[UpstreamResponse]]


class ResumeRefused(Exception):
    """The rest of the body cannot be had (the object changed, ranges refused, attempts spent)."""


class ResumeFailed(Exception):
    """This attempt got no usable answer (408, 429, 5xx); another may."""


@dataclass(frozen=True)
class Span:
    """Where a response's body lies in the object, and what identifies the object."""

    first: int  # the object's byte the body starts with
    end: int  # exclusive
    total: str  # the object's size as Content-Range gives it ("*": unknown)
    validator: str  # for If-Range
    etag: str | None


def resumable_span(outgoing: Outgoing, response: UpstreamResponse) -> Span | None:
    """The span of a response that can be continued after a cut, else None."""
    if outgoing.method != "GET" or response.status not in (200, 206):
        return None
    headers = response.headers
    length = response_length(response)
    validator = strong_validator(headers.get(hdrs.ETAG), headers.get(hdrs.LAST_MODIFIED),
                                 headers.get(hdrs.DATE))
    if length is None or validator is None:
        return None
    if response.status == 200:
        if headers.get(hdrs.ACCEPT_RANGES, "").lower() != "bytes":
            return None
        return Span(0, length, str(length), validator, headers.get(hdrs.ETAG))
    match = CONTENT_RANGE.fullmatch(headers.get(hdrs.CONTENT_RANGE, ""))
    if match is None or int(match[2]) + 1 - int(match[1]) != length:
        return None  # (several ranges, multipart/byteranges: not continued)
    return Span(int(match[1]), int(match[2]) + 1, match[3], validator, headers.get(hdrs.ETAG))


def strong_validator(etag: str | None, last_modified: str | None, date: str | None) -> str | None:
    """A strong ETag, else a Last-Modified that RFC 9110 lets If-Range use (a second or more
    before Date), else None."""
    if etag:
        return etag if etag.startswith('"') else None
    if not last_modified or not date:
        return None
    try:
        modified, dated = parsedate_to_datetime(last_modified), parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    return last_modified if (dated - modified).total_seconds() >= 1 else None


class Resumer:
    """Fetches the rest of one response's body, as often as it is cut."""

    def __init__(self, span: Span, outgoing: Outgoing, fetch: Fetch, attempts: int,
                 count: Callable[[str], None] = lambda outcome: None) -> None:
        self.span, self.outgoing, self.fetch, self.attempts = span, outgoing, fetch, attempts
        self.count = count  # outcomes for the metrics: resumed, refused
        self.resumes = 0
        self._fruitless = 0  # attempts in a row that brought no new byte
        self._last_delivered = -1

    async def resume(self, delivered: int) -> UpstreamResponse:
        """The rest of the body from its `delivered`-th byte, attempts that got no usable
        answer tried again (counted as fruitless); ResumeRefused when it cannot be had."""
        while True:
            try:
                rest = await self.rest(delivered)
            except ResumeRefused:
                self.count("refused")
                raise
            except (ResumeFailed, *FETCH_ERRORS) as error:
                log.info("resuming at byte %d failed (%s); again", delivered, error)
                continue
            self.count("resumed")
            return rest

    async def rest(self, delivered: int) -> UpstreamResponse:
        """A checked 206 for the body from its `delivered`-th byte on; ResumeRefused when the
        attempts are spent or the answer is not the same object's exact span."""
        self._fruitless = self._fruitless + 1 if delivered == self._last_delivered else 1
        self._last_delivered = delivered
        if self._fruitless > self.attempts:
            raise ResumeRefused(f"{self.attempts} attempts in a row brought no new byte")
        if self._fruitless > 1:
            await asyncio.sleep(min(BACKOFF_FIRST * 2 ** (self._fruitless - 2), BACKOFF_MAX))
        first, last = self.span.first + delivered, self.span.end - 1
        headers = self.outgoing.headers.copy()
        headers[hdrs.RANGE] = f"bytes={first}-{last}"
        headers[hdrs.IF_RANGE] = self.span.validator
        response = await self.fetch(dataclasses.replace(self.outgoing, headers=headers))
        if response.status in (408, 429) or response.status >= 500:
            response.close()
            raise ResumeFailed(f"the upstream answered {response.status}")
        self.check(response, f"bytes {first}-{last}/")
        self.resumes += 1
        return response

    def check(self, response: UpstreamResponse, expected: str) -> None:
        """The exact span asked for, of the same object."""
        content_range = response.headers.get(hdrs.CONTENT_RANGE, "")
        same_total = self.span.total == "*" or content_range.endswith(f"/{self.span.total}")
        same_object = response.headers.get(hdrs.ETAG, self.span.etag) == self.span.etag
        if response.status != 206 or not content_range.startswith(expected) \
                or not same_total or not same_object:
            response.close()
            raise ResumeRefused(f"the upstream answered {response.status} "
                                f"{content_range!r} for {expected}{self.span.total}: the object "
                                f"changed or ranges are not served")
