"""The HTTP/2 downstream side: one connection, many streams, each served like an HTTP/1.1 request.

Theory of operation
-------------------
A connection whose first bytes are the prior-knowledge preface (RFC 9113 §3.3) is handed here by
the HTTP/1.1 server (server.py), with what it has read so far. One task reads: it feeds bytes to
the connection state machine (h2_connection.py) and turns its events into streams. Each request runs
the same pipeline as an HTTP/1.1 request (pipeline.serve_request) against an `H2Stream`, the HTTP/2
implementation of the stream interface (stream.py), which is also its own request body source (one
object per stream); a reset ends that stream alone.

Streams are served by stream workers: tasks of the connection that each serve one stream at a time
and then park (no Event: the reader reschedules a parked worker directly) until the reader hands
them the next one. Spawning a task per stream cost more than the rest of a small request's Trio
machinery together; a worker is spawned only when every worker is busy, so a connection has as
many as it ever had streams in flight, and at most MAX_IDLE_WORKERS of them wait idle. A worker
runs in its own cancel scope, which is a stream's while it serves it: a stream the client resets
(or that must end for a connection error) cancels its worker's scope, and that worker ends with the
stream instead of serving another, so no stream pays for a cancel scope of its own.

Writing goes through H2Transport (h2_transport.py): in order, waiting for the client's windows and
for a client that does not read. The request body side acknowledges DATA (opens our window) only
as the router consumes it, so a slow upstream makes the client wait instead of making us buffer:
per stream at most INITIAL_STREAM_WINDOW, per connection INITIAL_CONNECTION_WINDOW (h2_codec.py).

Attack mitigations (each counted in `triomesh_h2_mitigations_total{kind}` and answered with GOAWAY
ENHANCE_YOUR_CALM or the protocol error h2 names): rapid reset (more than half of at least
RAPID_RESET_MIN_STREAMS streams reset by the client before their response started), CONTINUATION
flood and HPACK bombs (h2: a header block of more than 64 frames or over MAX_HEADER_LIST_BYTES),
PING/SETTINGS floods (control frames whose answers the client does not read), empty DATA frames in
a row, and stream-count exhaustion (MAX_CONCURRENT_STREAMS).
"""

from __future__ import annotations

import time
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

import structlog
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

from proxy.l7 import h1
from proxy.l7.connio import RECV_BYTES, ReadTimeout
from proxy.l7.context import PLAINTEXT_PEER, DownstreamPeer, RequestContext
from proxy.l7.errors import BadRequest, DownstreamDisconnect, ProxyError, UpstreamTimeout
from proxy.l7.events import RequestHead, ResponseHead
from proxy.l7 import h2_connection as ev
from proxy.l7 import h2_frames as frames
from proxy.l7.h2_codec import (
    GRPC_DEADLINE_EXCEEDED,
    INITIAL_CONNECTION_WINDOW,
    MAX_HEADER_LIST_BYTES,
    MalformedRequest,
    check_request_fields,
    check_trailers,
    grpc_local_reply_fields,
    plain_response_fields,
    request_from_checked,
    response_fields,
    server_settings,
    trailer_fields,
)
from proxy.l7.h2_connection import ConnectionError_, H2Connection, StreamClosedError
from proxy.l7.h2_transport import H2StreamState, H2Transport
from proxy.l7.pipeline import finish, reply_for_error, serve_request
from proxy.l7.resumed import RESUMED

if TYPE_CHECKING:
    from proxy.l7.chain import Chain
    from proxy.l7.connio import Conn
    from proxy.l7.dataplane import DataPlane
    from proxy.l7.events import Headers

log = structlog.get_logger("triomesh.l7.h2")

PRIOR_KNOWLEDGE = object()  # what the HTTP/1.1 head reader returns for the HTTP/2 preface
_PREFACE_START = b"PRI * HTTP/2"

RAPID_RESET_MIN_STREAMS = 100
MAX_UNANSWERED_CONTROL_FRAMES = 1000  # Envoy's max_outbound_control_frames
MAX_EMPTY_DATA_FRAMES = 1  # Envoy's max_consecutive_inbound_frames_with_empty_payload
MAX_IDLE_WORKERS = 64  # stream workers a connection keeps parked; busier moments spawn more
# a drain's shutdown notice and its final GOAWAY are this far apart: the streams a client sent before
# the notice reached it still arrive and are served (RFC 9113 §6.8 asks for at least a round trip)
GOAWAY_NOTICE_GRACE_S = 1.0
MAX_RESPONSE_HEADS = 16  # response field lists a connection keeps (see plain_fields, relayed_fields)

_ENHANCE_YOUR_CALM = frames.ENHANCE_YOUR_CALM
_INTERNAL_ERROR = frames.INTERNAL_ERROR


def is_prior_knowledge(buf: bytes, pos: int) -> bool:
    return buf.startswith(_PREFACE_START, pos)


class H2Stream(H2StreamState):
    """One request/response exchange on an HTTP/2 connection (the stream interface, stream.py)."""

    protocol = "HTTP/2"
    relays_plain = True  # a plain upstream response comes as its forwarded field block (start_plain_response)
    expect_continue = False
    is_upgrade = False

    # the request body side (the stream is its own body source, `body`): pieces arrived in DATA
    # frames, whether the request ended, and why it failed (the client reset it, a refused body)
    __slots__ = ("connection", "upstream_framing", "keep_alive", "chain", "grpc", "ctx", "_fields",
                 "cancel_scope", "reset_by_peer", "_sensitive", "clusters", "cancelled", "kind", "pieces",
                 "request_ended", "bytes_read", "trailers", "wakeup", "unacked", "request_error", "body", "done")

    def __init__(self, connection: H2ServerConnection, stream_id: int, framing: h1.Framing, chain: Chain | None,
                 grpc: bool, ctx: RequestContext, clusters) -> None:
        # H2StreamState's fields, set here: one call less per request (tests/l7/test_h2_stream_state.py
        # fails if H2StreamState gains a slot this list misses)
        self.stream_id = stream_id
        self.ended = False
        self.window = None
        self.connection = connection
        self.upstream_framing = framing
        self.kind = framing.kind
        self.request_ended = framing.kind == h1.NONE
        self.pieces: list[bytes] = []
        self.done = self.request_ended  # request_ended and not pieces, kept so: read for every request
        self.body: H2Stream | None = self  # plain attributes, not properties; _stream_done breaks the cycle
        self.bytes_read = 0
        self.trailers: Headers | None = None
        self.wakeup: trio.Event | None = None
        self.unacked = 0  # flow-controlled bytes received and not yet given to the router
        self.request_error: str | None = None  # set when the client reset the stream
        self.keep_alive = True
        self.chain = chain
        self.grpc = grpc
        self.ctx = ctx
        self._fields: Headers | None = None
        self._sensitive: frozenset | None = None  # response fields the upstream sent never indexed
        self.clusters = clusters  # the snapshot's clusters, read once when the stream began
        self.cancel_scope: trio.CancelScope | None = None  # the scope of the worker serving it
        self.cancelled = False  # ended before a worker took it, or while one serves it
        self.reset_by_peer = False

    # ---- the request body source (stream.py's `body`): DATA frames as they arrive

    def feed(self, data: bytes, flow_length: int) -> None:
        if data:
            self.pieces.append(data)
            self.done = False
        self.unacked += flow_length
        self._wake()

    def end_request(self) -> None:
        self.request_ended = True
        self.done = not self.pieces
        self._wake()

    def fail_request(self, why: str) -> None:
        self.request_error = why
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()
            self.wakeup = None

    def buffered_pieces(self) -> list:
        pieces = self.pieces
        if not pieces:
            if self.unacked:
                self._ack()
            return []
        self.pieces = []
        self.done = self.request_ended
        for p in pieces:
            self.bytes_read += len(p)
        self._ack()
        return pieces

    def _ack(self) -> None:
        """Open the window for what the router took: only now may the client send more."""
        n, self.unacked = self.unacked, 0
        if n:
            self.connection.acknowledge(self.stream_id, n)

    async def next_pieces(self) -> list:
        while not self.pieces and not self.request_ended:
            if self.request_error is not None:
                raise DownstreamDisconnect(self.request_error)
            self.wakeup = event = trio.Event()
            await event.wait()
        return self.buffered_pieces()

    # ---- the response side

    def cancel(self) -> None:
        """End the stream's work now: its worker's scope is cancelled (the worker ends with it)."""
        self.cancelled = True
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    async def send_continue(self) -> None:
        return None  # no Expect handling on HTTP/2: the client does not wait for one

    def start_plain_response(self, status: int, reason: bytes, fields: bytes, length: int) -> None:
        """The head of a plain HTTP/1.1 upstream response, from its forwarded field block: the C head
        parser sorted it, so no Python pass over its fields; a block seen before on this connection
        (the same backend's response, `date` changing once a second) is not even split."""
        self._fields = self.connection.plain_fields(status, fields, length)
        self._sensitive = None

    def start_response(self, ctx: RequestContext, response: ResponseHead, framing: h1.Framing,
                       raw_length: bytes | None) -> None:
        if framing.kind == h1.LENGTH:
            length = framing.length
        elif raw_length is not None and raw_length.isdigit() and (
                ctx.request.method == b"HEAD" or response.status == 304):
            length = int(raw_length)
        else:
            length = None
        headers = response.headers
        if type(headers) is tuple:  # an HTTP/2 upstream's, shared by the responses of a repeated block
            connection = self.connection
            fields = connection.response_heads.get((response.status, headers, length))  # relayed_fields' hit
            self._fields = fields if fields is not None else connection.relayed_fields(response.status, headers,
                                                                                       length)
        else:
            self._fields = response_fields(response.status, headers, length)
        self._sensitive = response.sensitive

    def _send_head(self, end_stream: bool) -> None:
        fields, self._fields = self._fields, None
        self.connection.send_headers(self, fields, end_stream, self._sensitive)

    def send_whole_nowait(self, body: memoryview | None):
        connection = self.connection
        if body and connection.error is not None:
            raise DownstreamDisconnect(connection.error)
        fields, self._fields = self._fields, None
        try:  # the head and what the windows allow of the body, in one call of the connection layer
            sent = connection.h2.send_response(self.stream_id, fields, body, self._sensitive)
        except StreamClosedError as e:  # the client reset the stream, or the connection ended
            raise DownstreamDisconnect(f"stream closed: {e}") from e
        connection.flush()
        if not body or sent == len(body):
            self.ended = True
            return None
        return body[sent:]

    async def send_rest(self, rest) -> None:
        await self.send([rest], True)

    async def send(self, pieces: list, end_stream: bool) -> None:
        connection = self.connection
        if self._fields is not None:
            self._send_head(end_stream and not any(len(p) for p in pieces))
            if self.ended:
                connection.flush()
                return
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            await connection.send_data(self, piece, end_stream and i == last)
        if end_stream and not self.ended:
            connection.end_stream(self)
        connection.flush()
        await connection.wait_outbox()

    async def send_trailers(self, ctx: RequestContext, trailers: Headers) -> None:
        if self._fields is not None:
            self._send_head(False)
        self.connection.send_headers(self, trailer_fields(trailers), True)
        self.connection.flush()

    async def send_local(self, ctx: RequestContext, status: int, body: bytes, headers: Headers, *,
                         generated: bool) -> bool:
        if generated and self.grpc:
            if any(name == b"grpc-status" for name, _ in headers):  # a stage's own gRPC answer (fault abort)
                fields = response_fields(status, headers, None)
            else:
                # a route or per-try timeout is DEADLINE_EXCEEDED, not the UNAVAILABLE that 504 maps to:
                # clients retry UNAVAILABLE (Envoy answers so since its runtime guard
                # grpc_timeout_returns_deadline_exceeded)
                timed_out = isinstance(ctx.error, UpstreamTimeout)
                fields = grpc_local_reply_fields(status, body, GRPC_DEADLINE_EXCEEDED if timed_out else None)
                fields.extend(headers)  # e.g. x-envoy-overloaded
            if ctx.request_id:
                fields.append((b"x-request-id", ctx.request_id))
            for name, value in fields:
                if name == b"grpc-status":
                    ctx.scratch()["grpc_status"] = value
            self._fields = fields
            self._send_head(True)
            self.connection.flush()
            ctx.status = 200  # a gRPC error travels in grpc-status, as Envoy logs it
            return True
        if not h1.status_has_body(status) or ctx.request.method == b"HEAD":
            body = b""
        out = list(headers)
        if generated:
            if body and not any(name == b"content-type" for name, _ in out):
                out.append((b"content-type", b"text/plain"))
            if ctx.request_id:
                out.append((b"x-request-id", ctx.request_id))
            out.append((b"server", b"triomesh"))
        else:
            ctx.response = ResponseHead(status, out)
        self._fields = response_fields(status, out, len(body) if h1.status_has_body(status) else None)
        try:
            if body:
                self._send_head(False)
                await self.connection.send_data(self, body, True)
            else:
                self._send_head(True)
            self.connection.flush()
        except DownstreamDisconnect:
            ctx.response_flags.append("DC")
            return False
        ctx.status = status
        ctx.bytes_sent = len(body)  # local replies' bodies count, as in Envoy's BYTES_SENT (HEAD: emptied above)
        return True

    def reset(self) -> None:
        """RST_STREAM this stream only; the connection and its other streams go on."""
        self.connection.reset_stream(self, _INTERNAL_ERROR)


class H2ServerConnection(H2Transport):
    __slots__ = ("plane", "listener_name", "client", "client_ip", "original_destination", "peer", "streams", "nursery",
                 "streams_total", "premature_resets", "control_frames", "empty_data_frames", "closing", "quiet",
                 "goaway_sent", "read_scope", "ready", "idle_workers", "shutdown_noticed", "response_heads")

    def __init__(self, plane: DataPlane, listener_name: str, conn: Conn, client: str, client_ip: bytes,
                 original_destination, peer: DownstreamPeer = PLAINTEXT_PEER) -> None:
        h2conn = H2Connection(client=False, settings=server_settings(), max_header_list_size=MAX_HEADER_LIST_BYTES)
        super().__init__(conn, h2conn, DownstreamDisconnect)
        self.plane = plane
        self.listener_name = listener_name
        self.client = client
        self.client_ip = client_ip
        self.original_destination = original_destination
        self.peer = peer
        self.streams: dict[int, H2Stream] = {}
        self.response_heads: dict[tuple, tuple] = {}  # see plain_fields, relayed_fields
        self.nursery: trio.Nursery | None = None
        self.streams_total = 0
        self.premature_resets = 0
        self.control_frames = 0  # PING/SETTINGS received while our answers wait in the outbox
        self.empty_data_frames = 0
        self.closing = False  # GOAWAY sent or received: no new streams
        self.quiet: trio.Event | None = None  # set when the last stream ends, for a closing connection
        self.goaway_sent = False  # a connection error: nothing more is read
        self.read_scope = trio.CancelScope()  # cancelled when a closing connection's last stream ends
        self.ready: deque[H2Stream] = deque()  # streams no worker has taken yet
        self.idle_workers: list = []  # parked stream worker tasks
        self.shutdown_noticed = False  # a drain sent the first GOAWAY (last stream id 2^31-1)

    def drain(self) -> None:
        """The proxy drains, in two steps as RFC 9113 §6.8 and Envoy do: a GOAWAY naming the largest
        stream id (the client opens no new stream; those it sent meanwhile are still served), then,
        GOAWAY_NOTICE_GRACE_S later, the final GOAWAY naming the last stream accepted. The streams
        in flight finish and the connection ends with its last stream. Closing at once would drop
        the streams already on their way: the client sees them fail."""
        if self.closing or self.shutdown_noticed:
            return  # a GOAWAY went out or came in already
        if self.nursery is None:  # not serving yet: nothing can be on its way
            self._final_goaway()
            return
        self.shutdown_noticed = True
        self.h2.shutdown_notice()
        self.flush_now()
        self.nursery.start_soon(self._final_goaway_later)

    async def _final_goaway_later(self) -> None:
        await trio.sleep(GOAWAY_NOTICE_GRACE_S)
        self._final_goaway()

    def _final_goaway(self) -> None:
        if self.closing:
            return
        self.h2.close_connection()
        self.flush_now()
        self.closing = True
        if not self.streams:
            self.read_scope.cancel()

    def on_lost(self, why: str) -> None:
        if self.quiet is not None:
            self.quiet.set()
        for stream in self.streams.values():
            stream.fail_request(why)
            self.wake_window(stream)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def plain_fields(self, status: int, block: bytes, length: int) -> tuple:
        """The response fields of a plain upstream response (H2Stream.start_plain_response), kept
        per field block: the connection layer's encoded-block cache then finds them by content."""
        key = (status, block, length)
        fields = self.response_heads.get(key)
        if fields is None:
            fields = plain_response_fields(status, block, length)
            self._keep_response_head(key, fields)
        return fields

    def relayed_fields(self, status: int, headers: tuple, length: int | None) -> tuple:
        """response_fields of a response whose fields are a tuple no stage edited (an HTTP/2
        upstream's, shared by the responses of a repeated header block), kept as plain_fields are."""
        key = (status, headers, length)
        fields = self.response_heads.get(key)
        if fields is None:
            fields = tuple(response_fields(status, headers, length))
            self._keep_response_head(key, fields)
        return fields

    def _keep_response_head(self, key: tuple, fields: tuple) -> None:
        if len(self.response_heads) >= MAX_RESPONSE_HEADS:
            self.response_heads.clear()
        self.response_heads[key] = fields

    # ---- reading

    async def run(self) -> None:
        plane, conn = self.plane, self.conn
        plane.h2_connections.value += 1
        conn.idle_s = float("inf")  # streams may be quiet for long; the connection idle timeout is ours
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(INITIAL_CONNECTION_WINDOW - 65535)
        self.flush()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.writer)
                try:
                    with self.read_scope:
                        await self._read_loop()
                except (OSError, ReadTimeout):
                    self.lost("connection closed by the client")
                    return
                # the client closed its side or said GOAWAY: finish the streams in flight
                if self.streams and self.error is None:
                    self.quiet = trio.Event()
                    await self.quiet.wait()
                with trio.move_on_after(1.0):  # the last frames (GOAWAY) get a moment to leave
                    await self.wait_flushed()
                nursery.cancel_scope.cancel()
        finally:
            plane.h2_connections.value -= 1

    async def _read_loop(self) -> None:
        conn, h2conn, settings = self.conn, self.h2, self.plane.settings
        empties = conn.short_fill_empties_socket
        n = 0
        while True:
            if conn.buffered:
                data = bytes(conn.take_buffered())
                try:
                    events = h2conn.receive_data(data)
                except ConnectionError_ as e:
                    self._protocol_error(e)
                    return
                self._handle(events)
                if self.plane.draining and not self.closing:  # began as h2c after the drain started
                    self.drain()
                self.flush_now()  # answers to control frames: the flood accounting counts on it
                if self.error is not None or self.goaway_sent or (self.closing and not self.streams):
                    return
            conn.io_deadline = monotonic() + settings.idle_timeout_s if not self.streams else float("inf")
            # a short read emptied the socket: wait before the next recv, which would only say EAGAIN
            # (an exception CPython builds with its strerror text: ~4k instructions each)
            n = await conn.fill(wait_first=empties and 0 < n < RECV_BYTES)
            if n == 0:
                return

    def _protocol_error(self, e: ConnectionError_) -> None:
        """A connection error: the connection layer queued its GOAWAY; the streams end here."""
        self.plane.count_h2_mitigation(e.kind)
        log.info("HTTP/2 connection error", client=self.client, error=str(e), kind=e.kind)
        self._goaway(e.error_code, str(e))

    def _goaway(self, code, why: str) -> None:
        self.h2.close_connection(code, why[:200].encode(errors="replace"))
        self.flush_now()
        self.closing = self.goaway_sent = True
        for stream in self.streams.values():
            stream.fail_request(why)
            stream.cancel()

    def _handle(self, events: list) -> None:
        streams = self.streams
        now = wall = None  # when the requests of this read started: one clock read for all of them
        for event in events:
            t = type(event)
            if t is ev.RequestReceived:
                if now is None:
                    now, wall = self.plane.now(), time.time()  # the plane's clock, as server.py reads it
                self._new_stream(event, now, wall)
            elif t is ev.DataReceived:
                stream = streams.get(event.stream_id)
                if event.flow_controlled_length == 0 and not event.stream_ended:
                    self.empty_data_frames += 1
                    if self.empty_data_frames > MAX_EMPTY_DATA_FRAMES:
                        self.plane.count_h2_mitigation("empty_data_flood")
                        self._goaway(_ENHANCE_YOUR_CALM, "empty DATA frames in a row")
                        return
                else:
                    self.empty_data_frames = 0
                if stream is not None and not stream.request_ended:
                    stream.feed(event.data, event.flow_controlled_length)
                    if event.stream_ended and stream.request_error is None:
                        stream.end_request()  # (a refused body never ends well)
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif t is ev.TrailersReceived:  # they end the request
                stream = streams.get(event.stream_id)
                if stream is not None:
                    try:  # RFC 9113 §8.2.2 in trailers too (the layer checks names, values, pseudo-headers)
                        stream.trailers = check_trailers(event.headers)
                    except MalformedRequest as e:
                        self.h2.reset_stream(event.stream_id, frames.PROTOCOL_ERROR)
                        self._refused(event.stream_id, str(e), "malformed_request")
                    if not stream.request_ended and stream.request_error is None:
                        stream.end_request()
            elif t is ev.StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended = True
                    stream.reset_by_peer = True
                    if stream.ctx.response is None and not stream.ctx.status:
                        self.premature_resets += 1
                    stream.ctx.response_flags.append("DR")  # downstream remote reset
                    stream.fail_request("the client reset the stream")
                    stream.cancel()
                    if (self.streams_total >= RAPID_RESET_MIN_STREAMS
                            and self.premature_resets * 2 > self.streams_total):
                        self.plane.count_h2_mitigation("rapid_reset")
                        self._goaway(_ENHANCE_YOUR_CALM, "too many streams reset by the client")
                        return
            elif t is ev.StreamMalformed:
                self._refused(event.stream_id, event.reason, event.kind)
            elif t is ev.WindowUpdated:
                if event.stream_id == 0:
                    for stream in streams.values():
                        self.wake_window(stream)
                else:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        self.wake_window(stream)
            elif t is ev.RemoteSettingsChanged:
                self._count_control()
                for stream in streams.values():
                    self.wake_window(stream)
            elif t is ev.PingReceived:
                self._count_control()
            elif t is ev.ConnectionTerminated:
                self.closing = True
            if self.error is not None or self.goaway_sent:
                return

    def _count_control(self) -> None:
        """A PING or SETTINGS whose answer is queued: too many unanswered means the client sends
        them without reading (a flood), as Envoy's outbound control frame limit judges it."""
        if self.flushed_clean:
            self.control_frames = 0
        else:
            self.control_frames += 1
            if self.control_frames > MAX_UNANSWERED_CONTROL_FRAMES:
                self.plane.count_h2_mitigation("control_frame_flood")
                self._goaway(_ENHANCE_YOUR_CALM, "too many control frames")

    def _new_stream(self, event, now: float, wall: float) -> None:
        plane = self.plane
        sid = event.stream_id
        self.streams_total += 1
        if self.closing:
            self.h2.reset_stream(sid, frames.REFUSED_STREAM)
            return
        snapshot = plane.holder.current
        try:
            block = event.block  # a repeated header block: checked once, the result kept with it
            if block is None or (checked := block.server_check) is None:
                checked = check_request_fields(event.headers)
                if block is not None:
                    block.server_check = checked
            head, framing = request_from_checked(checked, event.stream_ended)
            head.sensitive = event.sensitive
        except MalformedRequest as e:
            self.h2.reset_stream(sid, frames.PROTOCOL_ERROR)
            self._refused(sid, str(e), "malformed_request")
            return
        ctx = RequestContext(snapshot, None, self.client, head, now, wall, self.client_ip,
                             self.original_destination, self.peer)
        rt = plane.runtime(snapshot)
        listener_chain = rt.by_listener.get(self.listener_name)
        chain = None
        if listener_chain is not None:
            ctx.listener, chain = listener_chain
        stream = H2Stream(self, sid, framing, chain, checked.grpc, ctx, rt.clusters)
        self.streams[sid] = stream
        self.ready.append(stream)
        if self.idle_workers:
            reschedule(self.idle_workers.pop(), RESUMED)
        else:
            self.nursery.start_soon(self._stream_worker, name="h2 stream worker")  # a name: no formatting per spawn

    def _refused(self, stream_id: int, reason: str, kind: str) -> None:
        """A stream reset for what it sent (malformed, over a limit): counted, logged, and a line in
        the access log (DPE) like any request that got no response."""
        plane = self.plane
        plane.count_h2_mitigation(kind)
        log.info("HTTP/2 stream refused", client=self.client, stream=stream_id, reason=reason, kind=kind)
        stream = self.streams.get(stream_id)
        if stream is not None:  # a stream being served: it ends here
            stream.ended = True
            stream.ctx.response_flags.append("DPE")
            stream.fail_request(reason)
            stream.cancel()
            return
        ctx = RequestContext(plane.holder.current, None, self.client, RequestHead(b"-", b"-", b"", [], http_version=b"2"),
                             plane.now(), time.time(), self.client_ip, self.original_destination)
        ctx.error = MalformedRequest(reason)
        ctx.response_flags.append("DPE")
        finish(plane, ctx)

    # ---- stream workers (see the module docstring)

    async def _stream_worker(self) -> None:
        ready, idle = self.ready, self.idle_workers
        task = current_task()

        def abort(_) -> Abort:  # runs in the cancelling task: the worker is named here, not looked up
            idle.remove(task)
            return Abort.SUCCEEDED

        with trio.CancelScope() as scope:
            while True:
                while ready:
                    stream = ready.popleft()
                    if stream.cancelled:  # reset or refused before any worker took it: served cancelled,
                        with trio.CancelScope() as cancelled:  # as far as that goes (its access log line)
                            cancelled.cancel()
                            try:
                                await self._serve_stream(stream)
                            finally:
                                self._stream_done(stream)
                        continue
                    stream.cancel_scope = scope  # from here, stream.cancelled says the scope was cancelled
                    try:
                        if stream.chain is not None:  # _serve_stream's common case, without a coroutine of its own
                            await serve_request(self.plane, stream.ctx, stream, stream.clusters)
                        else:
                            await self._serve_stream(stream)
                    except ProxyError:  # pragma: no cover - serve_request turns them into replies
                        pass
                    finally:
                        self._stream_done(stream)
                        if stream.cancelled and ready:  # this worker ends with its cancelled stream, and
                            # may have taken streams another worker was woken for: one takes its place
                            self.nursery.start_soon(self._stream_worker, name="h2 stream worker")
                    if stream.cancelled:
                        return
                if len(idle) >= MAX_IDLE_WORKERS:
                    return
                idle.append(task)
                await wait_task_rescheduled(abort)

    async def _serve_stream(self, stream: H2Stream) -> None:
        """Serve `stream` (its worker calls _stream_done after)."""
        ctx = stream.ctx
        try:
            if stream.chain is None:
                e = BadRequest(f"no listener {self.listener_name} in the active config")
                ctx.error = e
                try:
                    await reply_for_error(ctx, e, stream)
                finally:
                    finish(self.plane, ctx)
            else:
                await serve_request(self.plane, ctx, stream, stream.clusters)
        except ProxyError:  # pragma: no cover - serve_request turns them into replies
            pass

    def _stream_done(self, stream: H2Stream) -> None:
        del self.streams[stream.stream_id]
        stream.body = None  # the stream referred to itself: freed now, not by the cycle collector
        if not self.streams:
            if self.quiet is not None:
                self.quiet.set()
            elif self.closing:  # GOAWAY said or heard, the last stream is done: stop reading
                self.read_scope.cancel()
        if not stream.ended and self.error is None:
            self.reset_stream(stream, _INTERNAL_ERROR)  # never leave a stream half done
        if stream.unacked:  # what the router never read still counts against the connection window
            stream.unacked, n = 0, stream.unacked
            self.acknowledge(stream.stream_id, n)  # (reset_stream and acknowledge flush what they queue)


async def serve_h2_connection(plane: DataPlane, listener_name: str, conn: Conn, client: str, client_ip: bytes,
                              original_destination, peer: DownstreamPeer = PLAINTEXT_PEER) -> None:
    """Serve an HTTP/2 connection whose preface is in `conn`'s buffer, until it ends."""
    await H2ServerConnection(plane, listener_name, conn, client, client_ip, original_destination, peer).run()


__all__ = ["PRIOR_KNOWLEDGE", "H2ServerConnection", "H2Stream", "is_prior_knowledge", "serve_h2_connection"]
