"""The test origin's deterministic bodies (standard library only: the harnesses import it too)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from functools import lru_cache

BLOCK = 1 << 20
WRITE_SIZE = 256 * 1024


@lru_cache(maxsize=8)
def base_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def page(seed: int, index: int) -> bytes:
    """Page `index` of the body: the base block rotated, so misplaced pages are detected."""
    base = base_block(seed)
    shift = (index * 7919) % BLOCK
    return base[shift:] + base[:shift]


def pattern(offset: int, length: int, seed: int = 1) -> Iterator[bytes]:
    """The bytes [offset, offset+length) of the deterministic body, in pieces."""
    end = offset + length
    while offset < end:
        index, start = divmod(offset, BLOCK)
        piece = page(seed, index)[start:start + min(BLOCK - start, end - offset)]
        for cut in range(0, len(piece), WRITE_SIZE):
            yield piece[cut:cut + WRITE_SIZE]
        offset += len(piece)


def pattern_sha256(length: int, seed: int = 1) -> str:
    digest = hashlib.sha256()
    for piece in pattern(0, length, seed):
        digest.update(piece)
    return digest.hexdigest()
