"""The downstream stream: what the router and the stages know of one request, whatever the protocol.

A downstream codec (HTTP/1.1: h1_stream.H1Stream, HTTP/2: h2_server.H2Stream) turns a connection
into streams. Stages, routing, retries, mirrors, timeouts, fault injection and the access log see a
request only through this interface, never through a connection:

request side
    `body`: the request body source: `buffered_pieces()` (what has arrived, without waiting),
    `await next_pieces()` (the next pieces, [] at the end), `done`, `bytes_read`, `kind`;
    `upstream_framing`: what is known of its length (h1.Framing: NONE, LENGTH n, or CHUNKED for a
    length not known in advance), from which an HTTP/1.1 upstream request is framed;
    `expect_continue` and `await send_continue()`; `is_upgrade` (an HTTP/1.1 Upgrade request);
    `chain`: the listener's stages; `grpc`: the request is gRPC (content-type application/grpc*),
    so local replies go out as gRPC statuses.
response side (the encoder)
    `start_response(ctx, head, framing, raw_length)` prepares a head; `start_plain_response(...)`
    the HTTP/1.1 fast path's pre-sorted field block (only where `relays_plain`);
    `send_whole_nowait(body)` / `await send_rest(rest)` a complete response without a coroutine
    when the transport takes it at once; `await send(pieces, end_stream)`;
    `await send_trailers(ctx, trailers)`; `await send_local(ctx, status, body, headers, generated=)`
    for responses the proxy makes; `reset()` ends this stream only where the protocol can (HTTP/2
    RST_STREAM), the connection where it cannot (HTTP/1.1).
`keep_alive`: whether the connection may serve another request afterwards (HTTP/1.1; always true
on HTTP/2, where streams end on their own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.l7.chain import Chain
    from proxy.l7.context import RequestContext
    from proxy.l7.events import Headers, ResponseHead
    from proxy.l7.h1 import Framing


class DownstreamStream(Protocol):
    protocol: str
    relays_plain: bool
    body: object
    upstream_framing: Framing
    keep_alive: bool
    expect_continue: bool
    is_upgrade: bool
    grpc: bool
    chain: Chain

    async def send_continue(self) -> None: ...

    def start_plain_response(self, status: int, reason: bytes, fields: bytes, length: int) -> None: ...

    def start_response(self, ctx: RequestContext, response: ResponseHead, framing: Framing,
                       raw_length: bytes | None) -> None: ...

    def send_whole_nowait(self, body: memoryview | None): ...

    async def send_rest(self, rest) -> None: ...

    async def send(self, pieces: list, end_stream: bool) -> None: ...

    async def send_trailers(self, ctx: RequestContext, trailers: Headers) -> None: ...

    async def send_local(self, ctx: RequestContext, status: int, body: bytes, headers: Headers, *,
                         generated: bool) -> bool: ...

    def reset(self) -> None: ...
