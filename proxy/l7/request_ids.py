"""Random version 4 UUIDs for x-request-id, made in batches.

Formatting one UUID in Python (a 128-bit random number, its version and variant bits, hex digits and
dashes) cost about 9,500 instructions, the largest single step of a small proxied request. A batch
formats BATCH of them with a few whole-buffer operations (strided slice assignments put the dashes
and version of every UUID in place at once, one split cuts them apart), so a request takes one
from a list. The random bits come from the kernel (os.urandom, one call per batch), not from Python's
`random`: its Mersenne Twister can be reconstructed from 624 consecutive 32-bit outputs, fewer than one
batch shows, and would then predict later ids and the balancer's, faults' and sampling's draws. Each
worker process makes its own batches: the ones made before a fork are dropped in the child, so two
workers never hand out the same id.
"""

from __future__ import annotations

import os

BATCH = 256
_TEXT_BYTES = 36  # 8-4-4-4-12 hex digits with four dashes
_DASHES = (8, 13, 18, 23)
_VERSION_POSITION = 14  # the 13th digit: the version, 4 (random)
_VARIANT_POSITION = 19  # the 17th digit: RFC 4122's variant, 10xx in binary (8, 9, a or b)
_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")  # keeps the digit's two low bits


def uuid4_batch(count: int) -> list[bytes]:
    """`count` random version 4 UUIDs in their text form (lowercase, as uuid.uuid4() prints them).
    Each starts as 36 random hex digits and a space (what split() cuts the batch on); the dashes and
    the version overwrite five digits and the variant keeps two bits of a sixth: the 122 random bits
    of a version 4 UUID."""
    record = _TEXT_BYTES + 1
    random_bytes = (record * count + 1) // 2  # two hex digits each
    text = bytearray(os.urandom(random_bytes).hex(), "ascii")
    for position in _DASHES:
        text[position::record] = b"-" * count
    text[_VERSION_POSITION::record] = b"4" * count
    text[_VARIANT_POSITION::record] = text[_VARIANT_POSITION::record].translate(_VARIANT)
    text[_TEXT_BYTES::record] = b" " * count
    return bytes(text[:record * count]).split()


def _make_source():
    ready: list[bytes] = []
    take = ready.pop
    refill = ready.extend

    def new_request_id() -> bytes:
        """A random UUID version 4 in its text form."""
        if not ready:
            refill(uuid4_batch(BATCH))
        return take()

    os.register_at_fork(after_in_child=ready.clear)
    return new_request_id


new_request_id = _make_source()
