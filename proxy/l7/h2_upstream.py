"""HTTP/2 upstream connections: streams multiplexed on few connections per cluster endpoint.

Theory of operation
-------------------
A cluster whose `http2` is set (its port protocol, or h2UpgradePolicy UPGRADE) keeps, per endpoint,
a list of `H2UpstreamConnection`s in `DataPlane.h2_pools`. `open_stream` takes the first live
connection with a free stream slot: its limit is the smaller of the peer's MAX_CONCURRENT_STREAMS
and the cluster's connectionPool.http.maxConcurrentStreams, and a connection that served
maxRequestsPerConnection streams takes no more. Otherwise it connects a new one (through the one
connect path, upstream_conn.open_connection, under tcp.maxConnections: at the limit with every
connection full the request fails with 503 UO).

Each connection has one reader task (started on the data plane's background nursery) that feeds
the `h2` state machine and hands events to the streams; writing goes through H2Transport. When
the upstream says GOAWAY, the connection takes no new streams, the streams it will not process
(ids above the last one it named) fail with RefusedStream (the router retries those once on
another connection: they never reached the application), and the connection closes when its last
stream ends. A connection error, reset or EOF fails every stream with UpstreamReset. A connection
without streams for the pool's idle timeout is closed by the data plane's sweep.

A response body is acknowledged (the upstream's window reopened) only as the router takes it, so a
slow downstream client slows the upstream instead of growing our buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog
import trio

from proxy.l7.connio import ReadTimeout
from proxy.l7.errors import ConnectFailure, Overflow, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from proxy.l7.h2_codec import INITIAL_CONNECTION_WINDOW, client_settings, h2_config
from proxy.l7.h2_transport import H2StreamState, H2Transport
from proxy.l7.upstream_conn import open_connection

if TYPE_CHECKING:
    from proxy.l7.dataplane import ClusterRuntime, DataPlane
    from proxy.l7.events import Headers
    from proxy.l7.upstream_conn import UpstreamConn

log = structlog.get_logger("triomesh.l7.h2_upstream")

_CANCEL = h2.errors.ErrorCodes.CANCEL
_REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM


class RefusedStream(UpstreamReset):
    """The upstream will not process the stream (GOAWAY past it, REFUSED_STREAM): safe to send again."""


class UpstreamH2Stream(H2StreamState):
    """One request on an upstream HTTP/2 connection: the response head, body and trailers as they come."""

    __slots__ = ("connection", "status", "headers", "length", "pieces", "remote_ended", "trailers", "failure",
                 "wakeup", "unacked", "bytes_read")

    def __init__(self, connection: H2UpstreamConnection, stream_id: int) -> None:
        super().__init__(stream_id)
        self.connection = connection
        self.status = 0
        self.headers: Headers | None = None
        self.length: int | None = None  # the response's content-length, if it said one
        self.pieces: list[bytes] = []
        self.remote_ended = False
        self.trailers: Headers | None = None
        self.failure: Exception | None = None
        self.wakeup: trio.Event | None = None
        self.unacked = 0
        self.bytes_read = 0

    # ---- events from the reader task

    def _wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()
            self.wakeup = None

    def fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
        self.ended = True
        self._wake()
        H2Transport.wake_window(self)

    # ---- the router's side

    async def _wait(self, deadline: float) -> None:
        self.wakeup = event = trio.Event()
        with trio.move_on_at(deadline) as scope:
            await event.wait()
        if scope.cancelled_caught:
            raise UpstreamTimeout("no response before the route timeout")

    async def read_head(self, deadline: float) -> tuple[int, Headers]:
        while self.headers is None:
            if self.failure is not None:
                raise self.failure
            if self.remote_ended:
                raise UpstreamProtocolError("stream ended without a response head")
            await self._wait(deadline)
        return self.status, self.headers

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
                 "idle_since", "created", "max_requests")

    def __init__(self, plane: DataPlane, crt: ClusterRuntime, sock_conn: UpstreamConn,
                 pool_key: tuple[str, str, int]) -> None:
        h2conn = h2.connection.H2Connection(config=h2_config(True))
        h2conn.local_settings = h2.settings.Settings(client=True, initial_values=client_settings())
        super().__init__(sock_conn, h2conn, UpstreamReset)
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
        self.created = self.idle_since = trio.current_time()

    def usable(self) -> bool:
        return (self.error is None and not self.draining and len(self.streams) < self.max_streams)

    def open_stream(self) -> UpstreamH2Stream:
        stream_id = self.h2.get_next_available_stream_id()
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
            self.idle_since = trio.current_time()
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
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
        self.on_lost("closed")
        self.conn.close()

    def on_lost(self, why: str) -> None:
        for stream in list(self.streams.values()):
            stream.fail(UpstreamReset(f"upstream connection lost: {why}"))

    async def run(self) -> None:
        """The connection's life: its writer, and the reader handing events to streams."""
        try:
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
        while self.error is None:
            try:
                n = await conn.fill()
            except (OSError, ReadTimeout) as e:
                self.lost(f"read failed: {e}")
                return
            if n == 0:
                self.lost("the upstream closed the connection")
                return
            try:
                events = h2conn.receive_data(bytes(conn.take_buffered()))
            except h2.exceptions.ProtocolError as e:
                log.info("upstream HTTP/2 protocol error", cluster=self.crt.name, error=str(e))
                try:
                    h2conn.close_connection(error_code=getattr(e, "error_code", None)
                                            or h2.errors.ErrorCodes.PROTOCOL_ERROR)
                except h2.exceptions.ProtocolError:
                    pass
                self.flush()
                self.lost(f"protocol error: {e}")
                return
            self._handle(events)
            self.flush()

    def _handle(self, events: list) -> None:
        streams = self.streams
        for event in events:
            t = type(event)
            stream = streams.get(getattr(event, "stream_id", 0) or 0)
            if t is h2.events.ResponseReceived:
                if stream is not None:
                    status = 0
                    fields = []
                    length = None
                    for name, value in event.headers:
                        if name == b":status":
                            status = int(value)
                        elif name[:1] == b":":
                            continue
                        elif name == b"content-length":
                            length = int(value) if value.isdigit() else None
                        else:
                            fields.append((name, value))
                    stream.status, stream.headers, stream.length = status, fields, length
                    stream._wake()
            elif t is h2.events.DataReceived:
                if stream is not None:
                    if event.data:
                        stream.pieces.append(event.data)
                    stream.unacked += event.flow_controlled_length
                    stream._wake()
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif t is h2.events.TrailersReceived:
                if stream is not None:
                    stream.trailers = list(event.headers)
            elif t is h2.events.StreamEnded:
                if stream is not None:
                    stream.remote_ended = True
                    stream._wake()
            elif t is h2.events.StreamReset:
                if stream is not None:
                    if event.error_code == _REFUSED:
                        stream.fail(RefusedStream("the upstream refused the stream"))
                    else:
                        stream.fail(UpstreamReset(f"the upstream reset the stream ({event.error_code!r})"))
            elif t is h2.events.WindowUpdated:
                if event.stream_id == 0:
                    for s in streams.values():
                        self.wake_window(s)
                elif stream is not None:
                    self.wake_window(stream)
            elif t is h2.events.RemoteSettingsChanged:
                limit = self.h2.remote_settings.max_concurrent_streams
                configured = self.crt.pool_limits.max_concurrent_streams
                self.max_streams = min(limit, configured) if configured else limit
                for s in streams.values():
                    self.wake_window(s)
            elif t is h2.events.ConnectionTerminated:
                self.draining = True
                last = event.last_stream_id or 0
                for sid, s in list(streams.items()):
                    if sid > last:
                        s.fail(RefusedStream("the upstream sent GOAWAY before processing the stream"))
                if event.error_code:
                    self.lost(f"GOAWAY {event.error_code!r}")


async def open_stream(plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int], *,
                      fresh: bool = False) -> UpstreamH2Stream:
    """A new stream to endpoint `key`, on a pooled connection with room or a new one; `fresh`: a
    new connection (the retry of a refused stream)."""
    pool_key = (crt.name, key[0], key[1])
    pool = plane.h2_pools.get(pool_key)
    if pool and not fresh:
        for connection in pool:
            if connection.usable():
                return connection.open_stream()
    limit = crt.pool_limits.max_connections
    if limit is not None and crt.cx_active.value >= limit:
        crt.rq_pending_overflow.value += 1
        raise Overflow(f"cluster {crt.name}: {limit} connections open, every stream slot taken")
    crt.cx_active.value += 1
    try:
        timeout = crt.cluster.connect_timeout_s or plane.settings.connect_timeout_s
        sock_conn = await open_connection(key, timeout, crt.pool_limits.keepalive, plane)
    except BaseException as e:
        crt.cx_active.value -= 1
        if isinstance(e, ConnectFailure):
            crt.cx_connect_fail.value += 1
        raise
    crt.cx_total.value += 1
    sock_conn.idle_s = float("inf")  # the connection idles between streams; the pool's timeout governs
    connection = H2UpstreamConnection(plane, crt, sock_conn, pool_key)
    connection.h2.initiate_connection()
    connection.h2.increment_flow_control_window(INITIAL_CONNECTION_WINDOW - 65535)
    connection.flush()
    plane.h2_pools.setdefault(pool_key, []).append(connection)
    plane.spawn(connection.run)
    return connection.open_stream()


def sweep_idle(plane: DataPlane, now: float) -> None:
    """Close connections without streams for longer than their cluster's idle timeout, and those of
    clusters or endpoints that left the snapshot."""
    clusters = plane.holder.current.clusters
    for pool_key, pool in list(plane.h2_pools.items()):
        cluster = clusters.get(pool_key[0])
        gone = cluster is None or not any(e.address == pool_key[1] and e.port == pool_key[2]
                                          for e in cluster.endpoints)
        for connection in list(pool):
            if connection.streams:
                if gone:
                    connection.draining = True
                continue
            timeout = plane.idle_timeout_s(connection.crt.pool_limits.idle_timeout_s)
            if gone or now - connection.idle_since >= timeout:
                connection.close()
