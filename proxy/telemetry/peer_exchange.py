"""The peer metadata exchange for TCP between sidecars (sans-IO: frames in, identity out).

HTTP carries a sidecar's workload facts in the `x-triomesh-peer` header (peer.py); an opaque TCP
stream has no place for them, so they travel in a frame before the app's bytes, as Istio's
`istio-peer-exchange` does. A client sidecar originating mesh mTLS to a TCP endpoint offers the ALPN
id `triomesh-peer-exchange` before `istio`; a server sidecar that selects it promises the exchange.
Then each side sends one frame first, and reads the other's before relaying anything:

    magic "TMX1" | length (2 bytes, big-endian) | the x-triomesh-peer value (at most 512 bytes)

The payload is the header's own format, parsed by the same function, with the same limits. Frames
are stripped: the apps never see them. A server that does not know the id (an older sidecar, or
Envoy) selects `istio`, and the connection carries the app's bytes only, reported from the registry.
"""

from __future__ import annotations

import struct

from proxy.telemetry.peer import MAX_HEADER_BYTES, WorkloadIdentity, parse_peer_header

PEER_EXCHANGE_ALPN = "triomesh-peer-exchange"
MAGIC = b"TMX1"
_PREFIX = struct.Struct("!4sH")
PREFIX_BYTES = _PREFIX.size


class PeerExchangeError(Exception):
    """The peer promised the exchange (ALPN) but sent something else, or too much."""


def encode_frame(value: bytes) -> bytes:
    """The frame of this sidecar's facts (WorkloadIdentity.header_value())."""
    if len(value) > MAX_HEADER_BYTES:
        raise ValueError(f"peer facts of {len(value)} bytes exceed {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(value)) + value


def decode_frame(data: bytes) -> tuple[WorkloadIdentity | None, int] | None:
    """(the peer's identity, the frame's size) from the start of `data`; None while incomplete.
    The identity is None when the facts break the header's rules (reported as unknown, as a
    malformed header is). PeerExchangeError for a wrong magic or an oversized frame."""
    if len(data) < PREFIX_BYTES:
        if not MAGIC.startswith(bytes(data[:4])):
            raise PeerExchangeError(f"expected the peer exchange magic {MAGIC!r}, got {bytes(data[:4])!r}")
        return None
    magic, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PeerExchangeError(f"expected the peer exchange magic {MAGIC!r}, got {magic!r}")
    if length > MAX_HEADER_BYTES:
        raise PeerExchangeError(f"peer exchange frame of {length} bytes exceeds {MAX_HEADER_BYTES}")
    end = PREFIX_BYTES + length
    if len(data) < end:
        return None
    value = bytes(data[PREFIX_BYTES:end])
    return (parse_peer_header(value) if value else None), end


EMPTY_FRAME = encode_frame(b"")  # a sidecar that reports no facts (metrics off) still keeps the promise
