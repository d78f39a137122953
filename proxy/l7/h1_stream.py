"""The HTTP/1.1 downstream stream: one request of a connection, its body, and its response encoder.

The router (router.py) sees a downstream request only through the stream interface described in
stream.py; this is its HTTP/1.1 implementation. HTTP/1.1 knowledge that used to sit in the router
lives here: the response framing the client gets (content-length, chunked for a 1.1 client, close
for 1.0), `Connection: keep-alive` to a kept HTTP/1.0 client, `Connection: close` when the connection cannot continue, 100-continue, trailers written
in the last chunk (only to a client that said `TE: trailers`), and a reset that closes the
connection (HTTP/1.1 has no way to end one exchange alone).

Responses go out with as few sends as possible: the head waits in `_head` until the first body
bytes (or the end), and a small complete response leaves in one buffer without a coroutine
(`send_whole_nowait`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.l7 import h1
from proxy.l7.body import encode_pieces
from proxy.l7.errors import DownstreamDisconnect
from proxy.l7.events import ResponseHead
from proxy.l7.local_reply import local_reply_bytes, reason_phrase

if TYPE_CHECKING:
    from proxy.l7.chain import Chain
    from proxy.l7.connio import Conn
    from proxy.l7.context import RequestContext
    from proxy.l7.events import Headers

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# a whole buffered response body up to this size goes out in one buffer with its head (cheaper than
# a scatter list); a bigger one is sent as a second buffer of the same sendmsg
SMALL_BODY_BYTES = 16 * 1024


class H1Stream:
    """One HTTP/1.1 request/response exchange on a downstream connection."""

    protocol = "HTTP/1.1"
    relays_plain = True  # a plain upstream response's field block may go out as is (headparser)

    __slots__ = ("conn", "body", "upstream_framing", "keep_alive", "minor_version", "expect_continue", "is_upgrade",
                 "chain", "grpc", "_head", "_out_kind")

    def __init__(self, conn: Conn, body, upstream_framing: h1.Framing, keep_alive: bool, minor_version: int,
                 expect_continue: bool, is_upgrade: bool, chain: Chain | None) -> None:
        self.conn = conn
        self.body = body  # BodyReader or NO_BODY
        self.upstream_framing = upstream_framing  # the request body's length as the upstream will see it
        self.keep_alive = keep_alive  # may the connection serve another request after this one
        self.minor_version = minor_version
        self.expect_continue = expect_continue
        self.is_upgrade = is_upgrade
        self.chain = chain
        self.grpc = False  # gRPC is spoken over HTTP/2 only
        self._head: bytes | None = None
        self._out_kind = h1.NONE

    # ---- request side

    async def send_continue(self) -> None:
        """Answer `Expect: 100-continue` once, when the body is about to be read."""
        if self.expect_continue:
            self.expect_continue = False
            try:
                await self.conn.send_all(CONTINUE_100)
            except OSError as e:
                raise DownstreamDisconnect(str(e)) from None

    # ---- response side

    def start_plain_response(self, status: int, reason: bytes, fields: bytes, length: int) -> None:
        """The head of a plain upstream response, from its forwarded field block (forward_response_head)."""
        head = h1.serialize_plain_response_head(status, reason, fields, length, close=not self.keep_alive)
        self._head = head if self.minor_version else self._http10_head(head)
        self._out_kind = h1.LENGTH

    def start_response(self, ctx: RequestContext, response: ResponseHead, framing: h1.Framing,
                       raw_length: bytes | None) -> None:
        """Prepare the head of `response`, whose body is framed upstream as `framing`; it goes out
        with the first body bytes. `raw_length`: the upstream's Content-Length as received."""
        status = response.status
        out_kind = framing.kind
        if out_kind == h1.CHUNKED or out_kind == h1.CLOSE:
            # an unknown length is chunked to a 1.1 client; a 1.0 client reads until close
            out_kind = h1.CHUNKED if self.minor_version >= 1 else h1.CLOSE
        out_framing = framing if out_kind == framing.kind else (
            h1.FRAMING_CHUNKED if out_kind == h1.CHUNKED else h1.FRAMING_CLOSE)
        if out_kind == h1.CLOSE:
            self.keep_alive = False
        head_request = ctx.request.method == b"HEAD"
        passthrough_length = raw_length if framing.kind == h1.NONE and (head_request or status == 304) else None
        self._head = h1.serialize_response_head(status, response.reason or reason_phrase(status), response.headers,
                                                out_framing, close=not self.keep_alive,
                                                content_length_header=passthrough_length, head_request=head_request)
        if not self.minor_version:
            self._head = self._http10_head(self._head)
        self._out_kind = out_kind

    def _http10_head(self, data: bytes) -> bytes:
        """RFC 9112 §9.3 (and RFC 2068 §19.7.1): an HTTP/1.0 client keeps a connection only when the
        response says `connection: keep-alive`; without it, it waits for the close that would never
        come. So a kept HTTP/1.0 connection says so (as Envoy does); `data` starts with a head."""
        if not self.keep_alive:
            return data
        end = data.index(b"\r\n\r\n") + 2
        return data[:end] + b"connection: keep-alive\r\n" + data[end:]

    def send_whole_nowait(self, body: memoryview | None):
        """Send the prepared head and, when given, the whole body (content-length framed) without
        awaiting; returns what the kernel did not take (for `send_rest`), or None."""
        head = self._head
        self._head = None
        try:
            if body is None:
                return self.conn.send_nowait(head)
            if len(body) <= SMALL_BODY_BYTES:
                return self.conn.send_nowait(head + body)
            return self.conn.send_many_nowait([head, body])
        except OSError as e:
            raise DownstreamDisconnect(f"downstream gone while sending the response: {e}") from None

    async def send_rest(self, rest) -> None:
        """The rest `send_whole_nowait` returned (a buffer or a list of them)."""
        await self._send_many(rest if isinstance(rest, list) else [rest])

    async def send(self, pieces: list, end_stream: bool) -> None:
        """Body pieces (and the head, if it has not gone yet); `end_stream`: these are the last."""
        parts = []
        head = self._head
        if head is not None:
            parts.append(head)
            self._head = None
        kind = self._out_kind
        encode_pieces(kind, pieces, parts)
        if end_stream and kind == h1.CHUNKED:
            parts.append(h1.LAST_CHUNK)
        if parts:
            await self._send_many(parts)

    async def send_trailers(self, ctx: RequestContext, trailers: Headers) -> None:
        """End the body with trailer fields: in the last chunk to a client that asked for them with
        `TE: trailers` (RFC 9110 §6.5), else dropped, as HTTP/1.1 proxies usually do."""
        parts = []
        head = self._head
        if head is not None:
            parts.append(head)
            self._head = None
        if self._out_kind == h1.CHUNKED:
            if _accepts_trailers(ctx):
                block = [b"0\r\n"]
                for name, value in trailers:
                    if name[:1] != b":":
                        block += (name, b": ", value, b"\r\n")
                block.append(b"\r\n")
                parts.append(b"".join(block))
            else:
                parts.append(h1.LAST_CHUNK)
        if parts:
            await self._send_many(parts)

    async def _send_many(self, parts: list) -> None:
        try:
            await self.conn.send_many(parts)
        except OSError as e:
            raise DownstreamDisconnect(f"downstream gone while sending the response: {e}") from None

    async def send_local(self, ctx: RequestContext, status: int, body: bytes, headers: Headers, *,
                         generated: bool) -> bool:
        """A response made by the proxy; returns whether the connection may continue.

        `generated`: an error or a stage's answer (text body, x-request-id and server fields, as
        Envoy's local replies); otherwise a route's directResponse or redirect with exactly
        `headers`. A body not read to its end closes the connection (its bytes would be read as the
        next request)."""
        keep = self.keep_alive and self.body.done
        self.keep_alive = keep
        head_only = ctx.request.method == b"HEAD"
        if generated:
            data = local_reply_bytes(status, body, close=not keep, request_id=ctx.request_id, head_only=head_only,
                                     headers=headers)
        else:
            if not h1.status_has_body(status):
                body = b""  # a 204/304 body would be read as the start of the next response
            framing = h1.Framing(h1.LENGTH, len(body)) if body else h1.FRAMING_NONE
            data = h1.serialize_response_head(status, reason_phrase(status), headers, framing, close=not keep)
            if body and not head_only:
                data += body
        if not generated:
            ctx.response = ResponseHead(status, headers)
        if not self.minor_version:
            data = self._http10_head(data)
        try:
            await self.conn.send_all(data)
        except OSError:
            ctx.response_flags.append("DC")
            return False
        ctx.status = status
        ctx.bytes_sent = 0 if head_only else len(body)  # local replies' bodies count, as in Envoy's BYTES_SENT
        return keep

    def reset(self) -> None:
        """End this exchange abruptly: on HTTP/1.1 that is the connection (RST, never a clean end a
        client could take for a complete response)."""
        self.keep_alive = False
        self.conn.reset()


def _accepts_trailers(ctx: RequestContext) -> bool:
    for name, value in ctx.request.headers:
        if name == b"te" and b"trailers" in value.lower():
            return True
    return False
