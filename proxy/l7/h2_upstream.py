"""HTTP/2 upstream connections: streams multiplexed on few connections per cluster endpoint.

Theory of operation
-------------------
A cluster whose `http2` is set (its port protocol, or h2UpgradePolicy UPGRADE) keeps, per endpoint,
a list of `H2UpstreamConnection`s in `DataPlane.h2_pools`. `open_stream` takes the first live
connection with a free stream slot: its limit is the smaller of the peer's MAX_CONCURRENT_STREAMS
and the cluster's connectionPool.http.maxConcurrentStreams, and a connection that served
maxRequestsPerConnection streams takes no more. A connection still connecting is in the pool too,
and its slots count: a request reserves one and waits for the connect, so a burst of N requests
opens ceil(N / streams per connection) connections, not N. Only when every slot (connected or
connecting) is taken is a new connection opened (through the one connect path,
upstream_conn.open_connection, under tcp.maxConnections). At that limit a request waits as a
pending request (http1MaxPendingRequests, as Envoy applies it to every pool) for a slot, at most
the connect timeout; past the pending limit or the wait it fails with 503 UO.

Each connection has one reader task (started on the data plane's background nursery) that feeds
the `h2` state machine and hands events to the streams; writing goes through H2Transport. When
the upstream says GOAWAY, the connection takes no new streams, the streams it will not process
(ids above the last one it named) fail with RefusedStream (the router retries those once on
another connection: they never reached the application), and the connection closes when its last
stream ends. A connection error, reset or EOF fails every stream with UpstreamReset. A connection
without streams for the pool's idle timeout is closed by the data plane's sweep.

A response body is acknowledged (the upstream's window reopened) only as the router takes it, so a
slow downstream client slows the upstream instead of growing our buffers.

We advertise an HPACK dynamic table of size 0 to the upstream (SETTINGS_HEADER_TABLE_SIZE). Servers
such as nginx add response fields to the table that they never refer to again, so a table only made
every response a run of literal fields to decode and insert (about 39k instructions for nginx's five
fields); with no table, decoding is a pure function of the block's bytes, and a response head or
trailers block that repeats (most do: a server answers alike) is decoded and checked once and then
looked up by the connection layer (H2Connection._decode_block), with the fields the router takes
(without :status and content-length, and without the peer metadata header an outbound listener
reads) kept on the same cache entry (ResponseView).

A stream is one object: `UpstreamH2Stream` is the router's view of it, the transport's (the fields of
H2StreamState) and the connection layer's state of it (a StreamState, handed over by send_headers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math

import structlog
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

from proxy.l7.connio import RECV_BYTES, ReadTimeout
from proxy.l7.errors import (ConnectFailure, LocalConnectFailure, Overflow, UpstreamProtocolError, UpstreamReset,
                              UpstreamTimeout, UpstreamTlsFailure)
from proxy.l7 import h2_connection as ev
from proxy.l7 import h2_frames as frames
from proxy.l7.h2_codec import INITIAL_CONNECTION_WINDOW, MAX_HEADER_LIST_BYTES, client_settings
from proxy.l7.h2_connection import ConnectionError_, H2Connection, StreamState
from proxy.l7.h2_transport import H2Transport
from proxy.l7.resumed import RESUMED
from proxy.l7.upstream_conn import open_connection

if TYPE_CHECKING:
    from proxy.l7.dataplane import ClusterRuntime, DataPlane
    from proxy.l7.events import Headers

log = structlog.get_logger("triomesh.l7.h2_upstream")

_CANCEL = frames.CANCEL
_REFUSED = frames.REFUSED_STREAM


def upstream_connection_state() -> H2Connection:
    """The client state machine of an upstream connection: our client SETTINGS with an HPACK table of
    size 0 (the decoder starts with that limit, which the upstream applies before its first response)."""
    settings = client_settings()
    settings[frames.HEADER_TABLE_SIZE] = 0
    return H2Connection(client=True, settings=settings, max_header_list_size=MAX_HEADER_LIST_BYTES)


class RefusedStream(UpstreamReset):
    """The upstream will not process the stream (GOAWAY past it, REFUSED_STREAM): safe to send again."""


class UpstreamH2Stream(StreamState):
    """One request on an upstream HTTP/2 connection: the response head, body and trailers as they come.
    The connection layer's StreamState of the stream, with h2_transport.H2StreamState's fields (the
    first three slots) beside it."""

    __slots__ = ("stream_id", "ended", "window", "connection", "status", "headers", "view", "length", "pieces",
                 "remote_ended", "trailers", "failure", "waiter", "unacked", "bytes_read", "sensitive")

    def __init__(self, connection: H2UpstreamConnection, stream_id: int) -> None:
        # H2StreamState's fields and its StreamState's (the connection layer's: its windows are set when
        # the HEADERS open the stream), set here: one call less per request
        # (tests/l7/test_h2_stream_state.py fails if either gains a slot this list misses)
        self.stream_id = stream_id
        self.ended = False
        self.window = None
        self.send_window = self.recv_window = 0
        self.local_closed = self.remote_closed = self.headers_received = self.no_body_expected = False
        self.expected_length = -1
        self.received = self.window_unacked = 0
        self.connection = connection
        self.status = 0
        self.headers: tuple | None = None  # the response's fields (view.fields): shared, copied to be edited
        self.view: ResponseView | None = None
        self.length: int | None = None  # the response's content-length, if it said one
        self.pieces: list[bytes] = []
        self.remote_ended = False
        self.trailers: Headers | None = None
        self.failure: Exception | None = None
        self.waiter = None  # the router's task while it waits for the reader (one waiter at a time)
        self.unacked = 0
        self.sensitive: frozenset | None = None  # response fields sent never indexed
        self.bytes_read = 0

    # ---- events from the reader task

    def _wake(self) -> None:
        task = self.waiter
        if task is not None:
            self.waiter = None
            reschedule(task, RESUMED)

    def fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
        self.ended = True
        self._wake()
        H2Transport.wake_window(self)

    # ---- the router's side

    def _abort_wait(self, _) -> Abort:
        self.waiter = None
        return Abort.SUCCEEDED

    async def _wait(self, deadline: float) -> None:
        """Park until the reader task has news for this stream. The task parks itself (no Event per
        wait), and without a route timeout no cancel scope is entered: a wait costs a reschedule."""
        self.waiter = current_task()
        if deadline == math.inf:
            await wait_task_rescheduled(self._abort_wait)
            return
        with trio.move_on_at(deadline) as scope:
            await wait_task_rescheduled(self._abort_wait)
        if scope.cancelled_caught:
            raise UpstreamTimeout("no response before the route timeout")

    def wait_head(self, deadline: float):
        """None once the response head is here, else the wait for the reader's news, for the caller to
        await in its own frame (`read_head`, and H2Exchange._send_and_read_head for every request
        without a coroutine of ours around it). Raises when the head will never come: the stream
        failed, or ended without one."""
        if self.headers is not None:
            return None
        if self.failure is not None:
            raise self.failure
        if self.remote_ended:
            raise UpstreamProtocolError("stream ended without a response head")
        if deadline == math.inf:  # _wait's first branch without its coroutine
            self.waiter = current_task()
            return wait_task_rescheduled(self._abort_wait)
        return self._wait(deadline)

    async def read_head(self, deadline: float) -> tuple[int, Headers]:
        while (waiting := self.wait_head(deadline)) is not None:
            await waiting
        return self.status, self.headers

    def fields_without(self, take: bytes) -> tuple[tuple, bytes | None]:
        """The response's fields with every `take` field left out, and the last value of that field
        (or None): a tuple shared with the responses of a repeated header block (ResponseView)."""
        view = self.view
        if view.taken_name != take:
            view.take(take)
        return view.without_taken, view.taken

    @property
    def done(self) -> bool:
        """The whole response body has been taken."""
        return self.remote_ended and not self.pieces

    def buffered_pieces(self) -> list:
        if self.failure is not None:
            raise self.failure
        pieces = self.pieces
        if pieces:
            self.pieces = []
            for p in pieces:
                self.bytes_read += len(p)
        n, self.unacked = self.unacked, 0
        if n:
            self.connection.acknowledge(self.stream_id, n)
        return pieces

    async def next_pieces(self, deadline: float) -> list:
        while not self.pieces and not self.remote_ended:
            if self.failure is not None:
                raise self.failure
            await self._wait(deadline)
        return self.buffered_pieces()

    async def send_body(self, data, end_stream: bool) -> None:
        await self.connection.send_data(self, data, end_stream)
        self.connection.flush()
        await self.connection.wait_outbox()

    def finish_request(self, trailers: Headers | None = None) -> None:
        connection = self.connection
        if trailers:
            connection.send_headers(self, trailers, True)
        else:
            connection.end_stream(self)
        connection.flush()

    def close(self) -> None:
        """The router is done with the stream: reset it if it is still open either way (a retry, a
        timeout, a client that went away), and give its slot back."""
        connection = self.connection
        if not (self.ended and self.remote_ended) and connection.error is None:
            connection.cancel(self)
        connection.stream_closed(self)


class H2UpstreamConnection(H2Transport):
    __slots__ = ("plane", "crt", "pool_key", "streams", "max_streams", "requests", "draining", "counted",
                 "idle_since", "created", "max_requests", "ready", "reserved", "connect_error")

    def __init__(self, plane: DataPlane, crt: ClusterRuntime, pool_key: tuple[str, str, int]) -> None:
        super().__init__(None, upstream_connection_state(), UpstreamReset)  # the socket comes once `run` has connected
        self.plane = plane
        self.crt = crt
        self.pool_key = pool_key
        self.streams: dict[int, UpstreamH2Stream] = {}
        limits = crt.pool_limits
        # until the upstream's SETTINGS say otherwise: its default is unlimited, ours is the cluster's
        self.max_streams = limits.max_concurrent_streams or 100
        self.max_requests = limits.max_requests_per_connection
        self.requests = 0
        self.draining = False  # GOAWAY received, or maxRequestsPerConnection reached
        self.counted = True  # included in the cluster's cx_active
        self.created = self.idle_since = plane.now()
        self.ready = trio.Event()  # set once connected, or once the connect failed
        self.reserved = 0  # requests waiting for the connect, each holding a stream slot
        self.connect_error: ConnectFailure | None = None

    def usable(self) -> bool:
        return (self.error is None and not self.draining
                and len(self.streams) + self.reserved < self.max_streams)

    def free_slots(self) -> int:
        return max(0, self.max_streams - len(self.streams) - self.reserved)

    def open_stream(self) -> UpstreamH2Stream:
        stream_id = self.h2.next_stream_id
        stream = UpstreamH2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.requests += 1
        if self.max_requests is not None and self.requests >= self.max_requests:
            self.draining = True
        return stream

    def cancel(self, stream: UpstreamH2Stream) -> None:
        self.reset_stream(stream, _CANCEL)

    def stream_closed(self, stream: UpstreamH2Stream) -> None:
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if stream.unacked:
            n, stream.unacked = stream.unacked, 0
            self.acknowledge(stream.stream_id, n)
        if not self.streams:
            self.idle_since = self.plane.now()
            if self.draining or self.error is not None:
                self.close()
        if self.crt.pending:
            self.crt.waiters.unpark()

    def close(self) -> None:
        if self.counted:
            self.counted = False
            self.crt.cx_active.value -= 1
            pool = self.plane.h2_pools.get(self.pool_key)
            if pool is not None and self in pool:
                pool.remove(self)
                if not pool:
                    del self.plane.h2_pools[self.pool_key]
        if self.error is None:
            self.error = "closed"
            if self.conn is not None:
                self.h2.close_connection()
                self.flush_now()
        self.on_lost("closed")
        self.ready.set()
        if self.conn is not None:
            self.conn.close()
        if self.crt.pending:
            self.crt.waiters.unpark()

    def on_lost(self, why: str) -> None:
        for stream in list(self.streams.values()):
            stream.fail(UpstreamReset(f"upstream connection lost: {why}"))

    async def run(self, key: tuple[str, int]) -> None:
        """The connection's life: the connect, then its writer, and the reader handing events to
        streams. Runs on the data plane's nursery, so no one request's cancellation ends it."""
        try:
            crt, plane = self.crt, self.plane
            timeout = crt.cluster.connect_timeout_s or plane.settings.connect_timeout_s
            try:
                sock_conn = await open_connection(key, timeout, crt.pool_limits.keepalive, plane, crt.tls)
            except (ConnectFailure, OSError) as e:  # OSError: a failure open_connection did not translate
                crt.cx_connect_fail.value += 1
                self.connect_error = e if isinstance(e, ConnectFailure) else ConnectFailure(f"connect: {e}")
                return
            crt.cx_total.value += 1
            sock_conn.idle_s = math.inf  # the connection idles between streams; the pool's timeout governs
            self.conn = sock_conn
            self.h2.initiate_connection()
            self.h2.increment_flow_control_window(INITIAL_CONNECTION_WINDOW - 65535)
            self.flush()
            self.ready.set()
            if crt.pending:  # requests parked at the connection limit may take the slots nobody reserved
                crt.waiters.unpark(count=self.free_slots())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.writer)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        except Exception:  # a bug costs this connection, never the worker
            log.exception("upstream HTTP/2 connection failed", cluster=self.crt.name)
        finally:
            self.close()

    async def _read_loop(self) -> None:
        conn, h2conn = self.conn, self.h2
        empties = conn.short_fill_empties_socket
        n = 0
        while self.error is None:
            try:
                # after a short read the socket is empty: wait first (h2_server's _read_loop says why)
                n = await conn.fill(wait_first=empties and 0 < n < RECV_BYTES)
            except (OSError, ReadTimeout) as e:
                self.lost(f"read failed: {e}")
                return
            if n == 0:
                self.lost("the upstream closed the connection")
                return
            try:
                events = h2conn.receive_data(bytes(conn.take_buffered()))
            except ConnectionError_ as e:  # its GOAWAY is queued
                log.info("upstream HTTP/2 protocol error", cluster=self.crt.name, error=str(e))
                self.flush_now()
                self.lost(f"protocol error: {e}")
                return
            self._handle(events)
            self.flush_now()

    def _handle(self, events: list) -> None:
        streams = self.streams
        for event in events:
            t = type(event)
            if t is ev.DataReceived:  # the most frequent first
                stream = streams.get(event.stream_id)
                if stream is not None:
                    if event.data:
                        stream.pieces.append(event.data)
                    stream.unacked += event.flow_controlled_length
                    if event.stream_ended:
                        stream.remote_ended = True
                    if stream.waiter is not None:
                        stream._wake()
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                continue
            if t is ev.ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    # the connection layer checked the head (RFC 9113 §8.3.2) and read :status (the first
                    # field) and content-length; a repeated block's view is kept with it (_response_view's
                    # first branch, without its call)
                    block = event.block
                    view = block.client_view if block is not None else None
                    if view is None:
                        view = _response_view(event)
                    stream.view = view
                    stream.status, stream.headers, stream.length = event.status, view.fields, \
                        event.length if event.length >= 0 else None
                    stream.sensitive = event.sensitive
                    if event.stream_ended:
                        stream.remote_ended = True
                    task = stream.waiter
                    if task is not None:  # the router waits for the head (stream._wake, inlined)
                        stream.waiter = None
                        reschedule(task, RESUMED)
                continue
            stream = streams.get(getattr(event, "stream_id", 0) or 0)
            if t is ev.TrailersReceived:  # they end the response
                if stream is not None:
                    stream.trailers = list(event.headers)
                    stream.remote_ended = True
                    stream._wake()
            elif t is ev.StreamReset:
                if stream is not None:
                    if event.error_code == _REFUSED:
                        stream.fail(RefusedStream("the upstream refused the stream"))
                    else:
                        stream.fail(UpstreamReset(f"the upstream reset the stream ({event.error_code!r})"))
            elif t is ev.StreamMalformed:
                if stream is not None:
                    stream.fail(UpstreamProtocolError(f"malformed response: {event.reason}"))
            elif t is ev.WindowUpdated:
                if event.stream_id == 0:
                    for s in streams.values():
                        self.wake_window(s)
                elif stream is not None:
                    self.wake_window(stream)
            elif t is ev.RemoteSettingsChanged:
                limit = self.h2.peer_max_concurrent_streams
                configured = self.crt.pool_limits.max_concurrent_streams
                self.max_streams = min(limit, configured) if configured else limit
                for s in streams.values():
                    self.wake_window(s)
            elif t is ev.ConnectionTerminated:
                self.draining = True
                last = event.last_stream_id or 0
                for sid, s in list(streams.items()):
                    if sid > last:
                        s.fail(RefusedStream("the upstream sent GOAWAY before processing the stream"))
                if event.error_code:
                    self.lost(f"GOAWAY {event.error_code!r}")


class ResponseView:
    """A response's fields as the router takes them: without :status (the first field) and without
    content-length (the router frames the body itself), and the same again with one more field taken
    out for the chain's taker (Chain.sole_taker: the peer metadata header an outbound listener reads).
    Worked out once per repeated header block (kept on the connection layer's cache entry, as
    `client_view`), so neither is built nor searched again for a response that repeats. Both are
    tuples, shared by those responses: a response stage edits a list of its own (H2Exchange), and the
    downstream connection keeps what it sends for them by the tuple (H2ServerConnection.relayed_fields).
    `grpc_fields` is the response's grpc-status field alone, for the router (H2Exchange._send_and_read_head)."""

    __slots__ = ("fields", "taken_name", "without_taken", "taken", "grpc_fields")

    def __init__(self, fields: tuple) -> None:
        self.fields = fields
        # its first grpc-status field alone, or (): all that the router's retry conditions and gRPC
        # status read of a response (retry_on_status, H2Exchange), found once per repeated block
        self.grpc_fields: tuple = ()
        for field in fields:
            if field[0] == b"grpc-status":
                self.grpc_fields = (field,)
                break
        self.taken_name: bytes | None = None  # the field `without_taken` and `taken` are for
        self.without_taken: tuple | None = None
        self.taken: bytes | None = None  # the last value of that field, None if the response had none

    def take(self, name: bytes) -> None:
        fields = self.fields
        taken = None
        for field_name, value in fields:
            if field_name == name:
                taken = value
        self.without_taken = fields if taken is None else tuple(p for p in fields if p[0] != name)
        self.taken, self.taken_name = taken, name


def _response_view(event: ev.ResponseReceived) -> ResponseView:
    block = event.block
    if block is not None:
        view = block.client_view
        if view is None:
            view = block.client_view = ResponseView(_without_length(event))
        return view
    return ResponseView(_without_length(event))


def _without_length(event: ev.ResponseReceived) -> tuple:
    if event.length >= 0:
        return tuple([p for p in event.headers[1:] if p[0] != b"content-length"])
    return tuple(event.headers[1:])


def open_stream_nowait(plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int]) -> UpstreamH2Stream | None:
    """A new stream on a pooled connection that is connected and has a free slot, or None (then
    `open_stream` waits or connects): the common case, without a coroutine."""
    pool = plane.h2_pools.get((crt.name, key[0], key[1]))
    if pool:
        for connection in pool:
            # connected, with a free slot (usable(), inlined)
            if connection.conn is not None and connection.error is None and not connection.draining and \
                    len(connection.streams) + connection.reserved < connection.max_streams:
                return connection.open_stream()
    return None


async def open_stream(plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int], *,
                      fresh: bool = False) -> UpstreamH2Stream:
    """A new stream to endpoint `key`: on a pooled connection with a free slot (waiting for it to
    connect if it is still connecting), or on a new connection; `fresh`: skip the pooled ones (the
    retry of a refused stream)."""
    pool_key = (crt.name, key[0], key[1])
    limits = crt.pool_limits
    while True:
        if crt.tls_retired:  # the cluster's TLS changed since this request began: connect with the new settings
            crt = plane.current_clusters().get(crt.name, crt)
            limits = crt.pool_limits
        pool = plane.h2_pools.get(pool_key)
        connection = None
        if pool and not fresh:
            for candidate in pool:
                if candidate.usable():
                    connection = candidate
                    break
        if connection is None:
            limit = limits.max_connections
            if limit is None or crt.cx_active.value < limit:
                crt.cx_active.value += 1  # counted from the attempt on, so concurrent opens respect the limit
                connection = H2UpstreamConnection(plane, crt, pool_key)
                plane.h2_pools.setdefault(pool_key, []).append(connection)
                plane.spawn(connection.run, key)
            else:
                await _wait_pending(plane, crt, limit)
                fresh = False
                continue
        if not connection.ready.is_set():
            connection.reserved += 1
            try:
                await connection.ready.wait()
            finally:
                connection.reserved -= 1
            error = connection.connect_error
            if error is not None:  # each waiter raises its own copy, of the same kind
                if isinstance(error, (LocalConnectFailure, UpstreamTlsFailure)):
                    raise type(error)(error.detail, error.reason)
                raise ConnectFailure(str(error))
            if not connection.usable():  # failed, or its SETTINGS allow fewer streams: look again
                fresh = False
                continue
        return connection.open_stream()


async def _wait_pending(plane: DataPlane, crt: ClusterRuntime, limit: int) -> None:
    """At tcp.maxConnections with every slot taken: wait for one as a pending request, at most the
    connect timeout and only if fewer than http1MaxPendingRequests already wait (Envoy's pending
    circuit breaker, which it applies to HTTP/2 pools too); otherwise 503 UO."""
    max_pending = crt.pool_limits.max_pending_requests
    if max_pending is not None and crt.pending >= max_pending:
        crt.rq_pending_overflow.value += 1
        raise Overflow(f"cluster {crt.name}: {limit} connections open, every stream slot taken, "
                       f"{crt.pending} requests pending")
    timeout = crt.cluster.connect_timeout_s or plane.settings.connect_timeout_s
    crt.pending += 1
    try:
        with trio.move_on_after(timeout) as scope:
            await crt.waiters.park()
    finally:
        crt.pending -= 1
    if scope.cancelled_caught:
        crt.rq_pending_overflow.value += 1
        raise Overflow(f"cluster {crt.name}: no stream slot became free within {timeout}s")


def sweep_idle(plane: DataPlane, now: float) -> None:
    """Close connections without streams for longer than their cluster's idle timeout, and those of
    clusters or endpoints that left the snapshot."""
    clusters = plane.holder.current.clusters
    for pool_key, pool in list(plane.h2_pools.items()):
        cluster = clusters.get(pool_key[0])
        gone = cluster is None or not any(e.address == pool_key[1] and e.port == pool_key[2]
                                          for e in cluster.endpoints)
        for connection in list(pool):
            if not connection.ready.is_set():  # still connecting: requests are waiting for it
                continue
            if connection.streams:
                if gone:
                    connection.draining = True
                continue
            timeout = plane.idle_timeout_s(connection.crt.pool_limits.idle_timeout_s)
            if gone or now - connection.idle_since >= timeout:
                connection.close()
