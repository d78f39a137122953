"""The router (Envoy's router filter): pick an endpoint, get a pooled or new HTTP/1.1
connection, send the request, relay the response downstream (streaming its body); retries,
circuit breaking, outlier bookkeeping, mirroring, directResponse and redirect happen here.

Theory of operation
-------------------
A request whose body is empty, or small enough to buffer (content-length up to
`HttpSettings.retry_buffer_bytes`, or a chunked body that has already arrived whole), is
*replayable*: it is sent as one write and may be tried again under the route's retry policy
(retry.py decides which outcomes count; each retry waits a jittered exponential back-off, prefers an
endpoint not tried yet, takes a slot of the cluster's maxRetries budget, and must fit before the
overall deadline). Any other body is pumped by a second task while this one reads the response, so
an upstream that answers early (413, redirect) is relayed at once and a large upload never
deadlocks against a large response; such a request gets one try.

The route timeout (Envoy: from the router until the whole upstream response arrived; Istio
default: none) is one deadline over all tries; perTryTimeout bounds each try. Every try's result
feeds the cluster's outlier detector. Connections come from per-endpoint idle pools under the
cluster's connectionPool limits (acquire): at maxConnections a request waits, bounded in number
(http1MaxPendingRequests) and time, else it is refused with 503 UO.

Failure before any response byte went downstream becomes a local reply (503 UF/UC/UO, 504 UT,
502 UPE); after that it can only be a reset of the downstream connection, which the server does,
so a client never mistakes a broken response for a complete one. An idle pooled connection that
turns out to be closed when reused (the usual keep-alive race) is retried once on a fresh
connection for a replayable request, before anything else counts as an upstream failure.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, Coroutine

import trio

from proxy.l7 import h1
from proxy.l7.body import BodyReader, encode_pieces
from proxy.l7.connio import Conn
from proxy.l7.errors import (
    ConnectFailure,
    DownstreamDisconnect,
    LocalConnectFailure,
    NoHealthyUpstream,
    Overflow,
    ProxyError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.l7.events import ResponseHead
from proxy.l7.h1_client import StaleConnection, read_response_head
from proxy.l7.h2_codec import grpc_timeout_s
from proxy.l7.mirror import start_mirrors
from proxy.l7.retry import backoff_s, retry_on_error, retry_on_status
from proxy.l7.stages.headers import response_header_ops
from proxy.l7.stages.routing import LOCAL_CLUSTER, redirect_location
from proxy.l7.upstream_conn import UpstreamConn, acquire, checkout_idle, discard, release
from proxy.tracing.spans import upstream_response_ended

if TYPE_CHECKING:
    from proxy.config.snapshot import RetryPolicy, Route
    from proxy.l7.context import RequestContext
    from proxy.l7.dataplane import ClusterRuntime, DataPlane
    from proxy.l7.stream import DownstreamStream

_random = random.random

# ctx.response of a plain response (its fields went out as one block, see _relay_response): nothing
# reads its fields, only that a head went downstream and its status, so one head per status is shared
# (no fields, as a tuple nothing can append to; no reason: the upstream's went out with the block)
_PLAIN_HEADS: dict[int, ResponseHead] = {}


def _plain_head(status: int) -> ResponseHead:
    head = _PLAIN_HEADS[status] = ResponseHead(status, ())  # at most 500 (the parser takes 100-599)
    return head


class _RetryState:
    __slots__ = ("left", "index", "holds_slot", "tried")

    def __init__(self, attempts: int) -> None:
        self.left = attempts
        self.index = 0
        self.holds_slot = False  # counted in the cluster's retries_active (maxRetries budget)
        self.tried: set = set()


class Exchange:
    """One request's trip upstream and its response's trip back: the router step after the stages.

    A request whose body is empty or buffered (replayable) may be tried several times under the
    route's retry policy; a streamed body gets one try. directResponse and redirect routes are
    answered here without an upstream, as Envoy's router does."""

    __slots__ = ("ctx", "plane", "crt", "stream", "deadline", "request_body_done", "up", "overall_deadline",
                 "prefix", "plain_relay")

    def __init__(self, ctx: RequestContext, plane: DataPlane, crt: ClusterRuntime, stream: DownstreamStream) -> None:
        self.ctx = ctx
        self.plane = plane
        self.crt = crt
        self.stream = stream
        timeout = ctx.route.timeout_s
        if timeout is None:
            timeout = plane.settings.route_timeout_s
            if stream.grpc:  # Istio: a gRPC client's grpc-timeout is the route timeout when the route sets none
                timeout = grpc_timeout_s(ctx.request.get(b"grpc-timeout")) or timeout
        # `deadline` bounds the current try (per-try timeout), `overall_deadline` all of them. As in
        # Envoy the route timeout starts at the router, after the stages (an injected delay is not
        # part of it); 0s means none.
        self.deadline = self.overall_deadline = plane.now() + timeout if timeout else math.inf
        self.request_body_done = stream.body.done
        self.up: UpstreamConn | None = None
        self.prefix: list | None = None  # body bytes read while trying to buffer, sent before the rest
        # a plain response may be relayed from its field block (forward_response_head): only to a
        # stream that takes one, not for HEAD (its length rules differ) nor when response stages
        # need the headers parsed (those that edit the field block itself do not)
        # (None: not; else the name of a field the chain takes out of the block: chain.plain_take)
        chain = stream.chain
        self.plain_relay = (chain.plain_take if stream.relays_plain and ctx.request.method != b"HEAD"
                            and not chain.parses_response else None)

    def run(self) -> Coroutine[Any, Any, bool]:
        """The coroutine that relays the exchange (it returns whether the downstream connection may
        serve another request). Picked without an await of its own: one coroutine frame fewer on
        a path every request takes."""
        route = self.ctx.route
        crt = self.crt
        if crt.cluster is LOCAL_CLUSTER:
            return self._local_reply(route)
        limits = crt.pool_limits
        max_requests = limits.max_requests
        if max_requests is None and limits.retry_budget_percent is None:
            if self.stream.body.done and not route.mirrors:  # the common bodyless request
                return self._run_replayable(b"", route.retry)
            return self._run(route)
        if max_requests is not None and crt.rq_active >= max_requests:
            crt.rq_overflow.value += 1
            raise Overflow(f"cluster {crt.name}: {max_requests} requests active (http2MaxRequests)")
        return self._run_counted(route)

    async def _run_counted(self, route: Route) -> bool:
        """Counted in the cluster's active requests (http2MaxRequests, retryBudget) while it runs."""
        crt = self.crt
        crt.rq_active += 1
        try:
            return await self._run(route)
        finally:
            crt.rq_active -= 1

    async def _run(self, route: Route) -> bool:
        ctx, stream = self.ctx, self.stream
        body: bytes | None = b"" if stream.body.done else None
        if body is None and (route.retry is not None or route.mirrors) and not stream.is_upgrade:
            body = await self._buffer_body(self.plane.settings.retry_buffer_bytes)
        if route.mirrors:
            start_mirrors(self.plane, ctx, route.mirrors, body, stream.chain)
        if body is None:
            return await self._run_streaming()
        return await self._run_replayable(body, route.retry)

    async def _run_streaming(self) -> bool:
        """One try, the request body streamed as it arrives (too large to replay, or no retries)."""
        ctx, crt, plane = self.ctx, self.crt, self.plane
        in_flight = plane.in_flight
        endpoint = crt.pick(ctx, plane.in_flight_of)
        if endpoint is None:
            raise NoHealthyUpstream(f"cluster {crt.name} has no healthy endpoints")
        ctx.endpoint = endpoint
        key = endpoint.key
        ctx.upstream_host = endpoint.host_port
        in_flight[key] = in_flight.get(key, 0) + 1
        reusable = False
        try:
            reusable = await self._stream_try(key)
            if crt.outlier is not None:
                crt.record(endpoint, ctx.status)
            return self.request_body_done and self.stream.keep_alive
        except ProxyError as e:
            self._count_failure(endpoint, e, False)
            raise
        finally:
            in_flight[key] -= 1
            if self.up is not None:
                self._release(reusable and self.request_body_done)

    async def _stream_try(self, key: tuple[str, int]) -> bool:
        """The one try of a streamed request; returns whether the upstream connection is reusable."""
        head_bytes = self._request_head_bytes(self.crt)
        self.up, _ = await acquire(self.plane, self.crt, key, deadline=self.deadline)
        return await self._duplex(head_bytes)

    def _count_failure(self, endpoint, e: ProxyError, per_try: bool) -> None:
        crt = self.crt
        if self.ctx.extra is not None:
            upstream_response_ended(self.ctx.extra)  # a failed try ends the client span (a retry moves it on)
        if isinstance(e, LocalConnectFailure):
            return  # we had no socket to give: the endpoint did nothing wrong
        if isinstance(e, UpstreamTimeout):
            (crt.rq_per_try_timeout if per_try else crt.rq_timeout).value += 1
            crt.record(endpoint, 504, True)
        elif isinstance(e, (ConnectFailure, UpstreamReset)) and self.ctx.response is None:
            crt.record(endpoint, 503, True)
        elif isinstance(e, UpstreamProtocolError) and self.ctx.response is None:
            crt.record(endpoint, 502)

    async def _run_replayable(self, body: bytes, retry: RetryPolicy | None) -> bool:
        """Tries until a response is kept: retry conditions, attempts, the retry budget
        (connectionPool.http.maxRetries) and the overall timeout decide; each retry prefers a host
        not tried yet and waits a jittered exponential back-off first."""
        ctx, crt, plane = self.ctx, self.crt, self.plane
        in_flight = plane.in_flight
        overall = self.overall_deadline
        per_try_s = retry.per_try_timeout_s if retry is not None else None
        data = self._encode_request(crt, body)
        state = None  # _RetryState once a retry is considered (rare): no per-request allocation otherwise
        reusable = False
        try:
            while True:
                endpoint = crt.pick(ctx, plane.in_flight_of,
                                    state.tried if state is not None else None)
                if endpoint is None:
                    raise NoHealthyUpstream(f"cluster {crt.name} has no healthy endpoints")
                ctx.endpoint = endpoint
                key = endpoint.key
                ctx.upstream_host = endpoint.host_port
                self.deadline = min(overall, plane.now() + per_try_s) if per_try_s else overall
                in_flight[key] = in_flight.get(key, 0) + 1
                try:
                    parsed = await self._send_and_read_head(key, data)
                except ProxyError as e:
                    per_try = isinstance(e, UpstreamTimeout) and self.deadline < overall
                    self._count_failure(endpoint, e, per_try)
                    if self.up is not None:
                        self._abandon_try()
                    if retry is not None and retry_on_error(retry, e, per_try):
                        if state is None:
                            state = _RetryState(retry.num_retries)
                        if await self._may_retry(retry, state, endpoint):
                            continue
                        if not state.left:
                            ctx.response_flags.append("URX")  # Envoy: upstream retry limit exceeded
                    raise
                finally:
                    in_flight[key] -= 1
                status = parsed[1]
                if crt.outlier is not None:
                    crt.record(endpoint, status)
                if retry is not None and retry_on_status(retry, status, parsed[3]):
                    if state is None:
                        state = _RetryState(retry.num_retries)
                    if await self._may_retry(retry, state, endpoint):
                        crt.count_response(status)
                        self._abandon_try()  # the unread response goes with its connection
                        continue
                    if not state.left:
                        ctx.response_flags.append("URX")
                if state is not None and state.index:
                    crt.rq_retry_success.value += 1
                reusable = await self._relay_response(parsed)
                return self.request_body_done and self.stream.keep_alive
        finally:
            if state is not None and state.holds_slot:
                crt.retries_active -= 1
            if self.up is not None:
                self._release(reusable and self.request_body_done)

    # ---- what differs per upstream protocol (h2_client.H2Exchange overrides these)

    def _encode_request(self, crt: ClusterRuntime, body: bytes):
        """What `_send_and_read_head` sends for a replayable request: here the whole HTTP/1.1 request."""
        data = self._request_head_bytes(crt, len(body))
        return data + body if body else data

    def _abandon_try(self) -> None:
        """A try's upstream is given up (failed, or its response is retried): never reused."""
        discard(self.crt, self.up)
        self.up = None

    def _release(self, reusable: bool) -> None:
        release(self.plane, self.crt, self.up, reusable)

    async def _may_retry(self, retry: RetryPolicy, state: _RetryState, endpoint) -> bool:
        """Whether to try again (and wait the back-off): attempts left, the cluster's retry budget,
        and time before the overall deadline."""
        crt = self.crt
        if not state.left:
            return False
        if not state.holds_slot:
            limits = crt.pool_limits
            if limits.retry_budget_percent is not None:  # retryBudget replaces maxRetries
                allowed = max(limits.min_retry_concurrency, int(crt.rq_active * limits.retry_budget_percent / 100))
            else:
                allowed = limits.max_retries
            if allowed is not None and crt.retries_active >= allowed:
                crt.rq_retry_overflow.value += 1
                return False
            crt.retries_active += 1
            state.holds_slot = True
        delay = backoff_s(retry, state.index, _random)
        if self.plane.now() + delay >= self.overall_deadline:
            return False
        state.left -= 1
        state.index += 1
        crt.rq_retry.value += 1
        if retry.ignore_previous_hosts:
            state.tried.add(endpoint)
        if delay > 0:
            await trio.sleep(delay)
        return True

    async def _buffer_body(self, limit: int) -> bytes | None:
        """Read the whole request body if it fits in `limit` bytes (so it can be replayed); else keep
        what was read in `self.prefix` and return None (the rest streams, one try only).

        Only a content-length body is waited for. A chunked body is replayable only when all of it
        has already arrived: its sender may be streaming and waiting for the response (a protocol
        over a long-lived request), which holding the body back would deadlock."""
        stream, body = self.stream, self.stream.body
        framing = stream.upstream_framing
        if framing.kind == h1.LENGTH and framing.length > limit:
            return None
        if framing.kind != h1.LENGTH:
            pieces = body.buffered_pieces()
            if body.done and sum(len(p) for p in pieces) <= limit:
                self.ctx.bytes_received = body.bytes_read
                self.request_body_done = True
                return b"".join(pieces)
            self.prefix = pieces
            return None
        await stream.send_continue()  # answered now; the pump will not answer again
        chunks: list = []
        size = 0
        pieces = body.buffered_pieces()
        while True:
            for p in pieces:
                chunks.append(p)
                size += len(p)
            if body.done:
                break
            if size > limit:
                self.prefix = chunks
                return None
            pieces = await body.next_pieces()
        self.ctx.bytes_received = body.bytes_read
        self.request_body_done = True
        return b"".join(chunks)

    async def _local_reply(self, route: Route) -> bool:
        """directResponse and redirect: answered here, as Envoy's router does, with the route's
        response header operations."""
        ctx = self.ctx
        head = ctx.request
        if route.redirect is not None:
            status, body = route.redirect.code, b""
            headers = [(b"location", redirect_location(head, route.redirect))]
        else:
            status, body = route.direct_response.status, route.direct_response.body
            headers = [(b"content-type", b"text/plain")] if body else []
        headers = response_header_ops(ctx, headers)
        return await self.stream.send_local(ctx, status, body, headers, generated=False)

    def _request_head_bytes(self, crt: ClusterRuntime, buffered_length: int | None = None) -> bytes:
        """`buffered_length`: the body is sent whole from a buffer, framed by content-length."""
        head = self.ctx.request
        # an HTTP/1.0 request may come without Host; the upstream speaks 1.1 and needs one
        authority = head.authority or crt.cluster.service_host.encode()
        framing = self.stream.upstream_framing
        if buffered_length is not None and framing.kind != h1.NONE:
            framing = h1.Framing(h1.LENGTH, buffered_length) if buffered_length else h1.FRAMING_NONE
        peer_field = self.stream.chain.peer_field  # b"" unless this listener sends peer metadata
        return h1.serialize_request_head(head.method, head.target, head.headers, framing, authority,
                                         peer_field if peer_field and crt.cluster.mesh_internal else b"")

    async def _send_and_read_head(self, key: tuple[str, int], head_bytes: bytes):
        """Bodyless request: one write, then the head; a stale pooled connection is retried once."""
        plane, crt = self.plane, self.crt
        for attempt in (0, 1):
            # a pooled connection is taken without an await; acquire() waits or connects
            up = checkout_idle(plane, crt, key, plane.now()) if attempt == 0 else None
            if up is not None:
                reused = True
            else:
                up, reused = await acquire(plane, crt, key, fresh=attempt == 1, deadline=self.deadline)
            self.up = up
            try:
                try:
                    rest = up.send_nowait(head_bytes)
                    if rest is not None:
                        await up.send_all(rest)
                except OSError as e:
                    if reused:
                        raise StaleConnection(str(e)) from None
                    raise UpstreamReset(f"upstream reset while sending the request: {e}") from None
                parsed = await read_response_head(up, self.deadline, plane.settings.max_head_bytes,
                                                  plane.settings.max_headers, self.plain_relay)
                up.requests += 1
                return parsed
            except StaleConnection:
                discard(crt, up)
                self.up = None
                if attempt == 1 or not reused:
                    raise
        raise AssertionError("unreachable")

    async def _duplex(self, head_bytes: bytes) -> bool:
        """Pump the request body on a second task while this one relays the response. Errors are
        carried out of the nursery by hand, so callers see the ProxyError itself, not a group."""
        up = self.up
        failure: list[BaseException] = []
        reusable = False

        async def pump() -> None:
            try:
                await self._pump_request_body(head_bytes)
            except ProxyError as e:
                failure.append(e)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                parsed = await read_response_head(up, self.deadline, self.plane.settings.max_head_bytes,
                                                  self.plane.settings.max_headers, self.plain_relay)
                up.requests += 1
                reusable = await self._relay_response(parsed)
            except StaleConnection as e:  # the body may be partly sent: not a reuse race to retry
                failure.append(UpstreamReset(str(e)))
            except ProxyError as e:
                failure.append(e)
            nursery.cancel_scope.cancel()  # an early response ends the upload
        if failure:
            # a request-body error (bad chunking, client gone) explains an upstream failure too
            raise failure[0]
        return reusable

    async def _pump_request_body(self, head_bytes: bytes) -> None:
        stream, up = self.stream, self.up
        kind = stream.upstream_framing.kind
        await stream.send_continue()
        body = stream.body
        parts = [head_bytes]
        if self.prefix:
            encode_pieces(kind, self.prefix, parts)
            self.prefix = None
        encode_pieces(kind, body.buffered_pieces(), parts)
        try:
            while True:
                if body.done and kind == h1.CHUNKED:
                    parts.append(h1.LAST_CHUNK)
                if parts:
                    try:
                        await up.send_many(parts)
                    except OSError:
                        return  # the upstream stopped reading; its response (or EOF) tells the rest
                if body.done:
                    break
                parts = []
                encode_pieces(kind, await body.next_pieces(), parts)
        finally:
            self.ctx.bytes_received = body.bytes_read
        self.request_body_done = True

    async def _relay_response(self, parsed) -> bool:
        """Send head and body downstream; returns whether the upstream connection is reusable."""
        ctx, stream, up = self.ctx, self.stream, self.up
        if not self.request_body_done:
            stream.keep_alive = False  # the rest of the request body is still on the connection
        if len(parsed) == 5:  # a plain response, already sorted by forward_response_head
            minor, status, reason, _, (fields, length, upstream_keep, taken) = parsed
            if taken is not None:  # the field the chain's taker reads (chain.plain_take), left out of `fields`
                stream.chain.plain_field_taker.on_taken_field(ctx, taken)
            plain_stages = stream.chain.plain_response_stages
            if plain_stages:
                for stage in plain_stages:
                    fields = stage.on_plain_response(ctx, fields)
            framing = h1.length_framing(length)
            stream.start_plain_response(status, reason, fields, length)
            response = _PLAIN_HEADS.get(status) or _plain_head(status)
        else:
            minor, status, reason, headers = parsed
            if status == 101:
                if not stream.is_upgrade:
                    raise UpstreamProtocolError("101 Switching Protocols without an upgrade request")
                await self._tunnel(status, reason, headers, h1.connection_tokens(headers))
                return False
            out_headers, framing, upstream_keep, raw_length, _ = h1.classify_response(
                ctx.request.method, status, minor, headers)
            response = ResponseHead(status, out_headers, reason=reason)
            chain = stream.chain
            if chain.response_stages:
                chain.run_response(ctx, response)
            stream.start_response(ctx, response, framing, raw_length)
        ctx.response = response
        self.crt.count_response(status)
        kind = framing.kind
        if kind == h1.NONE or (kind == h1.LENGTH and up.buffered >= framing.length):
            # the whole response is here (the common small response): no body reader, and no
            # await unless the kernel would not take it all at once
            if ctx.extra is not None:
                upstream_response_ended(ctx.extra)
            rest = stream.send_whole_nowait(up.consume(framing.length) if kind == h1.LENGTH else None)
            if rest is not None:
                await stream.send_rest(rest)
            if kind == h1.LENGTH:
                ctx.bytes_sent = framing.length
            ctx.status = status
            return upstream_keep
        reader = BodyReader(up, framing, eof_error=UpstreamReset, timeout_error=UpstreamTimeout,
                            protocol_error=UpstreamProtocolError, deadline=self.deadline)
        pieces = reader.buffered_pieces()
        if reader.done and ctx.extra is not None:
            upstream_response_ended(ctx.extra)
        await stream.send(pieces, reader.done)
        ctx.status = status
        while not reader.done:
            pieces = await reader.next_pieces()
            if reader.done and ctx.extra is not None:
                upstream_response_ended(ctx.extra)
            if pieces or reader.done:
                await stream.send(pieces, reader.done)
        ctx.bytes_sent = reader.bytes_read
        return upstream_keep

    async def _tunnel(self, status: int, reason: bytes, headers, tokens) -> None:
        """101 Switching Protocols (HTTP/1.1 downstreams only, the one kind that asks for an
        upgrade): pass the head on, then copy bytes both ways until both sides end."""
        ctx, stream, up = self.ctx, self.stream, self.up
        down = stream.conn
        out_headers = h1.strip_hop_by_hop(headers, tokens, keep_upgrade=True)
        head = [b"HTTP/1.1 101 %s\r\n" % (reason or b"Switching Protocols")]
        for name, value in out_headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        parts = [b"".join(head)]
        if up.buffered:
            parts.append(up.take_buffered())
        ctx.response = ResponseHead(status, out_headers, reason=reason)
        self.crt.count_response(status)
        try:
            await down.send_many(parts)
        except OSError as e:
            raise DownstreamDisconnect(f"downstream gone while sending the response: {e}") from None
        ctx.status = status
        stream.keep_alive = False
        counts = [0, 0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_bytes, down, up, counts, 0)
            nursery.start_soon(_pump_bytes, up, down, counts, 1)
        ctx.bytes_received += counts[0]
        ctx.bytes_sent += counts[1]


async def _pump_bytes(src: Conn, dst: Conn, counts: list[int], index: int) -> None:
    """One direction of a tunnel; EOF is passed on as a half-close."""
    try:
        if src.buffered:
            data = src.take_buffered()
            counts[index] += len(data)
            await dst.send_all(data)
        while True:
            n = await src.fill()
            if n == 0:
                dst.shutdown_write()
                return
            data = src.take_buffered()
            counts[index] += n
            await dst.send_all(data)
    except OSError:
        src.reset()
        dst.reset()


__all__ = ["Exchange"]
