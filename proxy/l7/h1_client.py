"""The HTTP/1.1 client side of an exchange: read an upstream's response head (1xx skipped), telling
a stale pooled connection (the keep-alive race, safe to retry) from a real upstream failure."""

from __future__ import annotations

from proxy.l7.connio import ReadTimeout
from proxy.l7.errors import UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from proxy.l7.headparser import FULL_PATH, HeadParseError, forward_response_head, parse_response_head
from proxy.l7.upstream_conn import UpstreamConn

class StaleConnection(UpstreamReset):
    """A reused connection was closed by the upstream before it sent any byte of a response."""


async def read_response_head(up: UpstreamConn, deadline: float, max_head_bytes: int, max_headers: int,
                             plain: bytes | None = None):
    """The final or 101 response head, 1xx interim responses skipped: (minor, status, reason,
    headers); with `plain` (bytes: the exchange may relay a plain response from its field block), a
    plain response comes as (minor, status, reason, retry_headers, (fields, length, keep_alive,
    taken)), sorted in C by forward_response_head (`taken`: the last value of the field named
    `plain`, which is left out of `fields`; None without one; b"": no field to take), and anything
    else as usual."""
    got_any = up.buffered > 0
    while True:
        parsed = None
        if got_any:  # right after sending, the buffer is empty: nothing to parse yet
            forwarded = forward_response_head(up.buf, up.pos, max_headers, plain) if plain is not None else FULL_PATH
            if forwarded is not None and forwarded is not FULL_PATH:
                end, minor, status, reason, fields, length, keep_alive, grpc_status, taken = forwarded
                up.pos = end
                return (minor, status, reason, ((b"grpc-status", grpc_status),) if grpc_status else (),
                        (fields, length, keep_alive, taken))
            if forwarded is FULL_PATH:  # None: incomplete, as the general parser would say too
                try:
                    parsed = parse_response_head(up.buf, up.pos, max_headers)
                except HeadParseError as e:
                    raise UpstreamProtocolError(f"malformed response head: {e}") from None
        if parsed is not None:
            end, minor, status, reason, headers = parsed
            up.pos = end
            if 100 <= status < 200 and status != 101:
                got_any = True
                continue
            return minor, status, reason, headers
        if up.buffered > max_head_bytes:
            raise UpstreamProtocolError("response head too large")
        try:
            # right after sending, nothing is there yet: wait before trying to read
            n = await up.fill(deadline, wait_first=not got_any)
        except ReadTimeout:
            raise UpstreamTimeout("no response before the route timeout") from None
        except OSError as e:
            if not got_any:
                raise _nothing_received(up, f"upstream reset before response headers: {e}") from None
            raise UpstreamReset(f"upstream reset before response headers: {e}") from None
        if n == 0:
            if not got_any:
                raise _nothing_received(up, "upstream closed before response headers")
            raise UpstreamReset("upstream closed before response headers")
        got_any = True


def _nothing_received(up: UpstreamConn, detail: str) -> UpstreamReset:
    """The error for a connection that ended before any response byte: on a reused connection
    that is the keep-alive race (retried once on a fresh one), on a new one an upstream reset."""
    return StaleConnection(detail) if up.requests > 0 else UpstreamReset(detail)
