"""The HTTP/2 client side of an exchange: the router's tries on an upstream stream (h2_upstream.py).

`H2Exchange` is the router (router.Exchange: retries, timeouts, outlier bookkeeping, mirrors) with
the parts that touch the upstream done on an HTTP/2 stream instead of an HTTP/1.1 connection:
sending the request (fields per RFC 9113 §8.3.1, the body in DATA frames, request trailers passed
on), reading the response head, and relaying the body and trailers to the downstream stream, which
frames them for its own protocol (gRPC's grpc-status trailers reach an HTTP/2 client as trailers,
an HTTP/1.1 client in the last chunk when it asked with `TE: trailers`). A refused stream (GOAWAY,
REFUSED_STREAM: never processed upstream) is sent once more on a new connection, like a stale
HTTP/1.1 keep-alive connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from proxy.config.matchers import header_value
from proxy.l7 import h1
from proxy.l7.errors import ProxyError
from proxy.l7.events import ResponseHead
from proxy.l7.h2_codec import request_fields, trailer_fields
from proxy.l7.h2_upstream import RefusedStream, open_stream, open_stream_nowait
from proxy.l7.router import Exchange
from proxy.telemetry.grpc_messages import GrpcMessageCounter, is_grpc
from proxy.tracing.spans import upstream_response_ended

if TYPE_CHECKING:
    from proxy.l7.dataplane import ClusterRuntime
    from proxy.l7.h2_upstream import UpstreamH2Stream


class H2Exchange(Exchange):
    __slots__ = ()

    def _fields(self, crt: ClusterRuntime, length: int | None):
        head = self.ctx.request
        return request_fields(head, head.authority or crt.cluster.service_host.encode(), length,
                              self.stream.chain.upstream_peer_header(crt.cluster))

    def _grpc_counters(self) -> tuple[GrpcMessageCounter, GrpcMessageCounter] | None:
        """(request, response) message counters of a gRPC request (Istio's istio_request_messages_total
        and istio_response_messages_total), made on first use; None for other requests."""
        ctx = self.ctx
        # an HTTP/2 stream already knows whether its content-type is application/grpc...: no scan when not
        if not self.stream.grpc and ctx.request.http_version == b"2":
            return None
        extra = ctx.extra
        counters = extra.get("grpc_messages") if extra is not None else None
        if counters is None and is_grpc(header_value(ctx.request, b"content-type")):
            counters = ctx.scratch()["grpc_messages"] = (GrpcMessageCounter(), GrpcMessageCounter())
        return counters

    def _encode_request(self, crt: ClusterRuntime, body: bytes):
        if self.stream.grpc or self.ctx.request.http_version != b"2":  # (_grpc_counters' first test)
            counters = self._grpc_counters()
            if counters is not None and body:
                counters[0].feed(body)  # counted once, however many tries send it
        return self._fields(crt, len(body) if body or self.stream.upstream_framing.kind != h1.NONE else None), body

    def _abandon_try(self) -> None:
        self.up.close()
        self.up = None

    def _release(self, reusable: bool) -> None:
        self.up.close()

    async def _send_and_read_head(self, key: tuple[str, int], data):
        """A replayable request on a new stream, then its response head; a refused stream is sent
        again once, on a new connection."""
        fields, body = data
        for attempt in (0, 1):
            up = None if attempt else open_stream_nowait(self.plane, self.crt, key)
            if up is None:
                up = await open_stream(self.plane, self.crt, key, fresh=attempt == 1)
            self.up = up
            try:
                up.connection.send_headers(up, fields, not body, self.ctx.request.sensitive)
                if body:
                    await up.send_body(body, True)
                else:
                    up.connection.flush()
                deadline = self.deadline
                while (waiting := up.wait_head(deadline)) is not None:  # read_head's loop, one coroutine less
                    await waiting
                # the fields the router reads (retry_on_status): the grpc-status alone, found once per
                # repeated block (as the HTTP/1.1 client's forwarded head gives it); _relay_response
                # takes the response's own fields from the stream
                return 2, up.status, b"", up.view.grpc_fields
            except RefusedStream:
                up.close()
                self.up = None
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _stream_try(self, key: tuple[str, int]) -> bool:
        """A streamed request body pumped on a second task while this one relays the response."""
        framing = self.stream.upstream_framing
        up = self.up = await open_stream(self.plane, self.crt, key)
        up.connection.send_headers(up, self._fields(self.crt, framing.length if framing.kind == h1.LENGTH else None),
                                   False, self.ctx.request.sensitive)
        up.connection.flush()
        failure: list[BaseException] = []

        async def pump() -> None:
            try:
                await self._pump_body(up)
            except ProxyError as e:
                failure.append(e)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                status, _ = await up.read_head(self.deadline)
                await self._relay_response((2, status, b"", up.view.grpc_fields))
            except ProxyError as e:
                failure.append(e)
            nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]
        return True

    async def _pump_body(self, up: UpstreamH2Stream) -> None:
        stream = self.stream
        body = stream.body
        await stream.send_continue()
        pieces = self.prefix or []
        self.prefix = None
        pieces += body.buffered_pieces()
        counters = self._grpc_counters()
        try:
            while True:
                for p in pieces:
                    if counters is not None:
                        counters[0].feed(p)
                    await up.send_body(p, False)
                if body.done:
                    break
                pieces = await body.next_pieces()
            trailers = getattr(body, "trailers", None)
            up.finish_request(trailer_fields(trailers) if trailers else None)
        finally:
            self.ctx.bytes_received = body.bytes_read
        self.request_body_done = True

    async def _relay_response(self, parsed) -> bool:
        """`parsed`: (2, status, b"", the response's grpc-status field alone or ()), its fields in `up`."""
        ctx, stream, up = self.ctx, self.stream, self.up
        status, headers = parsed[1], up.headers
        if not self.request_body_done:
            stream.keep_alive = False
        chain = stream.chain
        taker = chain.sole_taker
        # the response's fields are a tuple shared by the responses of a repeated header block
        # (h2_upstream.ResponseView): passed on as they are unless response stages edit them
        if taker is not None:  # the one field it reads taken out of a repeated block's fields once
            fields, taken = up.fields_without(chain.plain_take)
            if taken is not None:
                taker.on_taken_field(ctx, taken)
            response = ResponseHead(status, fields)
        elif chain.response_stages:
            response = ResponseHead(status, list(headers))
            chain.run_response(ctx, response)
        else:
            response = ResponseHead(status, headers)
        response.sensitive = up.sensitive
        length = up.length
        if up.remote_ended and not up.pieces and up.trailers is None and not length:  # (up.done, inlined)
            framing = h1.FRAMING_NONE
        elif length is not None and ctx.request.method != b"HEAD" and status != 304:
            framing = h1.length_framing(length)
        else:
            framing = h1.FRAMING_CHUNKED if h1.status_has_body(status) and ctx.request.method != b"HEAD" \
                else h1.FRAMING_NONE
        # the upstream's content-length as received matters to start_response only for a response
        # without a body to frame (HEAD, 304): not formatted for the others
        stream.start_response(ctx, response, framing,
                              b"%d" % length if length is not None and framing.kind == h1.NONE else None)
        ctx.response = response
        self.crt.count_response(status)
        deadline = self.deadline
        if framing.kind == h1.NONE:
            if ctx.extra is not None:
                upstream_response_ended(ctx.extra)
            rest = stream.send_whole_nowait(None)
            if rest is not None:
                await stream.send_rest(rest)
            self._note_grpc_status(parsed[3])
            ctx.status = status
            return True
        pieces = up.buffered_pieces()
        ctx.status = status
        # (_grpc_counters' first test, without its call for the HTTP/2 request that is not gRPC)
        counters = None if not stream.grpc and ctx.request.http_version == b"2" else self._grpc_counters()
        if framing.kind == h1.LENGTH and up.remote_ended and up.trailers is None:
            # the whole response is here (the common small response; the connection layer checked
            # its length): one send without awaiting, as the HTTP/1.1 client does
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if counters is not None:
                counters[1].feed(body)
            if ctx.extra is not None:
                upstream_response_ended(ctx.extra)
            rest = stream.send_whole_nowait(body)
            if rest is not None:
                await stream.send_rest(rest)
            ctx.bytes_sent = up.bytes_read
            return True
        while True:
            if counters is not None:
                for piece in pieces:
                    counters[1].feed(piece)
            if up.done:
                if ctx.extra is not None:
                    upstream_response_ended(ctx.extra)
                if up.trailers is not None:
                    if pieces:
                        await stream.send(pieces, False)
                    await stream.send_trailers(ctx, up.trailers)
                    self._note_grpc_status(up.trailers)
                else:
                    await stream.send(pieces, True)
                break
            if pieces:
                await stream.send(pieces, False)
            pieces = await up.next_pieces(deadline)
        ctx.bytes_sent = up.bytes_read
        return True

    def _note_grpc_status(self, fields) -> None:
        for name, value in fields:
            if name == b"grpc-status":
                self.ctx.scratch()["grpc_status"] = value
                return
