"""The HTTP/2 connection state machine, sans-IO (RFC 9113): bytes in → events, calls → bytes out.

Theory of operation
-------------------
One object per connection, for either side (`client=`). `receive(data)` parses whole frames from
what arrived (keeping a partial frame for the next call) and returns events; the send calls
(`send_headers`, `send_data`, `send_response` for a whole response, `end_stream`, `reset_stream`,
`acknowledge_received_data`, ...) queue frames that `data_to_send()` hands out. The end of a peer's
stream is said by the event that carries it (`stream_ended` on RequestReceived, ResponseReceived and
DataReceived; TrailersReceived always ends it), not by an event of its own as in the `h2` package:
most streams end with their HEADERS or last DATA, and one event less per message is work the
drivers do not do on every request. A header block that
repeats byte for byte while the HPACK table is unchanged (a client repeating a request, an upstream
answering alike into the table of size 0 we ask upstreams for) is decoded and checked once
(`_decode_block`). The drivers (h2_server.py, h2_upstream.py) own the
socket, the tasks and the waiting; this module never blocks and never touches IO. It replaces the
`h2` package on the data path, which costs about a million instructions per request per side
(bench/h2_codec.py); `h2` stays as the oracle the tests compare this module with.

Errors follow RFC 9113 §5.4. A connection error queues GOAWAY with its code and raises
`ConnectionError_` (the driver flushes and closes). A stream error queues RST_STREAM, forgets the
stream and, where the driver has to know (a request it will never see, a response that will never
come), returns a `StreamMalformed` or `StreamReset` event. Frames that arrive for a stream we reset
ourselves are dropped quietly (they were in flight); their DATA still counts against, and is given
back to, the connection window.

What the layer checks so the drivers need not: frame sizes and stream ids (§4, §5.1), the
pseudo-header rules of requests and responses (§8.3), connection-specific fields and `te` (§8.2.2),
field names and values (HPACK decoder, h2_hpack.py: §8.2.1), content-length against the DATA
received (§8.1.1), flow-control windows both ways (§5.2, §6.9), SETTINGS values (§6.5.2), the
concurrent stream limit we advertise (excess streams are refused with REFUSED_STREAM), and the size
of a header block in CONTINUATION frames (the CONTINUATION flood, CVE-2024-27316).
"""

from __future__ import annotations

from collections import deque

from proxy.l7 import h2_frames as f
from proxy.l7.h2_hpack import Decoder, Encoder, HeaderListTooLarge, HpackError

MAX_CONTINUATION_FRAMES = 64  # a legitimate header block fits in a handful
RESET_MEMORY = 1024  # stream ids we reset, whose in-flight frames are dropped quietly
# decoded header blocks kept per connection (_decode_block): a few requests a client repeats, the
# responses an upstream repeats
MAX_CACHED_BLOCKS = 32
MAX_CACHED_BLOCK_BYTES = 1024  # repeated blocks are mostly one byte per field; a longer one is not kept

_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_DECODE_ONLY = 0x100  # a flag of ours on a header block whose stream is already reset
_unpack_header = f.FRAME_HEADER.unpack_from
_HEADERS_FLAGS_SEEN = f.PADDED | f.PRIORITY_FLAG | f.END_HEADERS  # receive_data's test for a plain HEADERS


class ConnectionError_(Exception):
    """A connection error (GOAWAY already queued). `kind` names an attack pattern when it was one."""

    def __init__(self, code: int, message: str, kind: str = "protocol_error") -> None:
        super().__init__(f"{f.ERROR_NAMES.get(code, code)}: {message}")
        self.error_code = code
        self.kind = kind


class StreamClosedError(Exception):
    """Sending on a stream that is closed or reset (by either side), or a connection that is gone."""


# --- events ---------------------------------------------------------------------------------------

class Event:
    __slots__ = ()


class RequestReceived(Event):
    # sensitive: the fields the peer sent never indexed (HPACK), None if none; block: the decoded-block
    # cache entry the fields came from (None when not kept), where the server keeps its own check of them
    __slots__ = ("stream_id", "headers", "stream_ended", "sensitive", "block")

    def __init__(self, stream_id: int, headers: list, stream_ended: bool, sensitive: frozenset | None = None,
                 block: _DecodedBlock | None = None) -> None:
        self.stream_id, self.headers, self.stream_ended, self.sensitive = stream_id, headers, stream_ended, sensitive
        self.block = block


class ResponseReceived(Event):
    # status and length: :status and content-length (-1 when absent) as the connection layer read them;
    # block: the decoded-block cache entry the fields came from (None when not kept), where the client
    # keeps its own view of them
    __slots__ = ("stream_id", "headers", "stream_ended", "sensitive", "status", "length", "block")

    def __init__(self, stream_id: int, headers: list, stream_ended: bool, sensitive: frozenset | None = None,
                 status: int = 0, length: int = -1, block: _DecodedBlock | None = None) -> None:
        self.stream_id, self.headers, self.stream_ended, self.sensitive = stream_id, headers, stream_ended, sensitive
        self.status, self.length, self.block = status, length, block


class InformationalResponseReceived(Event):
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: list) -> None:
        self.stream_id, self.headers = stream_id, headers


class TrailersReceived(Event):
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: list) -> None:
        self.stream_id, self.headers = stream_id, headers


class DataReceived(Event):
    __slots__ = ("stream_id", "data", "flow_controlled_length", "stream_ended")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int, stream_ended: bool) -> None:
        self.stream_id, self.data = stream_id, data
        self.flow_controlled_length, self.stream_ended = flow_controlled_length, stream_ended


class StreamReset(Event):
    """The peer reset the stream (RST_STREAM received)."""

    __slots__ = ("stream_id", "error_code")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id, self.error_code = stream_id, error_code


class StreamMalformed(Event):
    """We reset the stream for a malformed message (or refused it): `kind` for the counters."""

    __slots__ = ("stream_id", "reason", "kind", "error_code")

    def __init__(self, stream_id: int, reason: str, kind: str, error_code: int) -> None:
        self.stream_id, self.reason, self.kind, self.error_code = stream_id, reason, kind, error_code


class WindowUpdated(Event):
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class RemoteSettingsChanged(Event):
    __slots__ = ("changed",)

    def __init__(self, changed: dict) -> None:
        self.changed = changed


class PingReceived(Event):
    __slots__ = ()


class ConnectionTerminated(Event):
    """GOAWAY received."""

    __slots__ = ("error_code", "last_stream_id", "additional_data")

    def __init__(self, error_code: int, last_stream_id: int, additional_data: bytes) -> None:
        self.error_code, self.last_stream_id, self.additional_data = error_code, last_stream_id, additional_data


_PING = PingReceived()


# --- streams --------------------------------------------------------------------------------------

class StreamState:
    """The connection layer's state of one stream. A driver may keep its own per-stream state in the
    same object, one object per stream: its class subclasses this one, sets these fields in its own
    __init__ (tests/l7/test_h2_stream_state.py pins that) and is handed to send_headers as the
    `state` of a stream the client opens."""

    __slots__ = ("send_window", "recv_window", "local_closed", "remote_closed", "expected_length", "received",
                 "headers_received", "window_unacked", "no_body_expected")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.local_closed = False
        self.remote_closed = False
        self.expected_length = -1  # the peer's content-length, -1 when it gave none
        self.received = 0
        self.headers_received = False
        self.window_unacked = 0  # consumed and not yet given back in a WINDOW_UPDATE
        self.no_body_expected = False  # a response to HEAD (its content-length describes no DATA)


class _DecodedBlock:
    """A header block's decoded fields, kept while the HPACK table is unchanged (_decode_block)."""

    __slots__ = ("fields", "never_indexed", "request_length", "response_check", "server_check", "client_view")

    def __init__(self, fields: list, never_indexed: frozenset | None) -> None:
        self.fields = fields
        self.never_indexed = never_indexed
        self.request_length: int | None = None  # _check_request's result, once a request used the block
        self.response_check: tuple[int, int] | None = None  # _check_response's, once a response did
        self.server_check = None  # the stream server's own check of the request fields (h2_server), opaque here
        self.client_view = None  # the upstream client's own view of the response fields (h2_upstream), opaque here


class _Malformed(Exception):
    def __init__(self, reason: str, kind: str = "malformed_request") -> None:
        super().__init__(reason)
        self.kind = kind


# --- the connection -------------------------------------------------------------------------------

class H2Connection:
    def __init__(self, *, client: bool, settings: dict[int, int], max_header_list_size: int) -> None:
        self.client = client
        self.local_settings = dict(settings)
        self.streams: dict[int, StreamState] = {}
        self._out: list[bytes] = []
        self._inbuf = b""
        self._preface_pending = not client  # a server first reads the client's preface
        self._settings_seen = False  # the first frame must be SETTINGS (§3.4)
        # a header block continued in CONTINUATION frames: [stream id, flags, fragments, frame count, bytes]
        self._block: list | None = None
        self.decoder = Decoder(max_table_size=settings.get(f.HEADER_TABLE_SIZE, 4096),
                               max_header_list_size=max_header_list_size)
        self._decoded_blocks: dict[bytes, _DecodedBlock] = {}  # see _decode_block
        self._decoded_generation = 0
        self.encoder = Encoder()
        self._encoded_responses: dict[tuple, bytes] = {}  # see _encode_response
        self._encoded_generation = 0
        self.max_header_list_size = max_header_list_size
        self.max_block_bytes = 2 * max_header_list_size + 16384  # HPACK may expand; bounded anyway
        self.local_max_frame_size = settings.get(f.MAX_FRAME_SIZE, f.DEFAULT_MAX_FRAME_SIZE)
        self.local_initial_window = settings.get(f.INITIAL_WINDOW_SIZE, f.DEFAULT_WINDOW)
        self.local_max_streams = settings.get(f.MAX_CONCURRENT_STREAMS, 2**31 - 1)
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame_size = f.DEFAULT_MAX_FRAME_SIZE
        self.peer_max_concurrent_streams = 2**31 - 1
        self.send_window = f.DEFAULT_WINDOW  # the connection's, toward the peer
        self.recv_window = f.DEFAULT_WINDOW  # the connection's, from the peer
        self.recv_window_target = f.DEFAULT_WINDOW
        self.conn_unacked = 0
        self.last_peer_stream_id = 0
        self.next_stream_id = 1 if client else 2
        self.goaway_sent = False
        self.goaway_received = False
        self.closed = False
        self._reset_ids: deque[int] = deque()
        self._reset_set: set[int] = set()

    # ---- sending: connection

    def initiate_connection(self) -> None:
        if self.client:
            self._out.append(f.PREFACE)
        self._out.append(f.settings_frame(self.local_settings))

    def increment_flow_control_window(self, increment: int) -> None:
        """Open the connection's receive window beyond the default (the initial SETTINGS cannot)."""
        self.recv_window += increment
        self.recv_window_target += increment
        self._out.append(f.window_update_frame(0, increment))

    def shutdown_notice(self) -> None:
        """The first step of a graceful shutdown (§6.8): GOAWAY naming the largest stream id, so the
        peer opens no new stream while those already on their way are still served. A round trip
        later, close_connection names the last stream accepted."""
        if not self.goaway_sent:
            self._out.append(f.goaway_frame(f.MAX_STREAM_ID, f.NO_ERROR))

    def close_connection(self, error_code: int = f.NO_ERROR, additional_data: bytes = b"") -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out.append(f.goaway_frame(self.last_peer_stream_id, error_code, additional_data[:256]))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def get_next_available_stream_id(self) -> int:
        return self.next_stream_id

    # ---- sending: streams

    def _sendable(self, stream_id: int) -> StreamState:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self.closed:
            raise StreamClosedError(f"stream {stream_id} is closed")
        return stream

    def send_headers(self, stream_id: int, fields: list, end_stream: bool = False,
                     sensitive: frozenset | None = None, state: StreamState | None = None) -> None:
        """`sensitive`: fields to send never indexed (those a peer sent so, RFC 7541 §7.1.3);
        `state`: the object to keep a stream the client opens in (a driver's StreamState subclass)."""
        stream = self.streams.get(stream_id)
        if stream is None and self.client and stream_id == self.next_stream_id and not self.closed:
            if state is None:
                stream = StreamState(self.peer_initial_window, self.local_initial_window)
            else:
                stream = state
                stream.send_window, stream.recv_window = self.peer_initial_window, self.local_initial_window
            self.streams[stream_id] = stream
            self.next_stream_id += 2
            for name, value in fields:
                if name == b":method":
                    stream.no_body_expected = value == b"HEAD"
                    break
        elif stream is None or stream.local_closed or self.closed:
            raise StreamClosedError(f"stream {stream_id} is closed")
        block = self.encoder.encode(fields, sensitive)
        size = len(block)
        if size > self.peer_max_frame_size:
            self._send_block(stream_id, stream, block, end_stream)
            return
        # the common case, one HEADERS frame: _send_block's first branch, without its call
        self._out += (f.FRAME_HEADER.pack(size >> 8, size & 0xFF, f.HEADERS,
                                          f.END_STREAM | f.END_HEADERS if end_stream else f.END_HEADERS, stream_id),
                      block)
        if end_stream:
            stream.local_closed = True  # _close_local, inlined
            if stream.remote_closed:
                del self.streams[stream_id]

    def _send_block(self, stream_id: int, stream: StreamState, block: bytes, end_stream: bool) -> None:
        """An encoded header block in HEADERS and, beyond the peer's frame size, CONTINUATION frames."""
        flags = f.END_STREAM if end_stream else 0
        limit = self.peer_max_frame_size
        out = self._out
        size = len(block)
        if size <= limit:  # the common case: one HEADERS frame (frame_header's packing, without its call)
            out += (f.FRAME_HEADER.pack(size >> 8, size & 0xFF, f.HEADERS, flags | f.END_HEADERS, stream_id), block)
        else:
            out.append(f.frame_header(limit, f.HEADERS, flags, stream_id))
            out.append(block[:limit])
            pos = limit
            while pos < len(block):
                piece = block[pos:pos + limit]
                pos += len(piece)
                out.append(f.frame_header(len(piece), f.CONTINUATION, f.END_HEADERS if pos >= len(block) else 0,
                                          stream_id))
                out.append(piece)
        if end_stream:
            stream.local_closed = True  # _close_local, inlined
            if stream.remote_closed:
                del self.streams[stream_id]

    def send_response(self, stream_id: int, fields: list, body, sensitive: frozenset | None = None) -> int:
        """A whole response: HEADERS, then as much of `body` as the windows allow, the stream ended
        with its last byte (with the HEADERS when there is no body). Returns how many bytes of the
        body were queued; the caller sends the rest with send_data as the windows open. One call
        for the common small response, whose HEADERS and DATA leave together."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self.closed:
            raise StreamClosedError(f"stream {stream_id} is closed")
        n = len(body) if body is not None else 0
        if not n:
            self.send_headers(stream_id, fields, True, sensitive)
            return 0
        limit = self.peer_max_frame_size
        if n <= stream.send_window and n <= self.send_window and n <= limit:
            # a repeated response's block (_encode_response's hit, without its call)
            block = None if sensitive or self.encoder.generation != self._encoded_generation else \
                self._encoded_responses.get(tuple(fields))
            if block is None:
                block = self._encode_response(fields, sensitive)
            if len(block) <= limit:  # the common case: one HEADERS frame, one DATA frame
                stream.send_window -= n
                self.send_window -= n
                size = len(block)
                pack = f.FRAME_HEADER.pack
                self._out += (pack(size >> 8, size & 0xFF, f.HEADERS, f.END_HEADERS, stream_id), block,
                              pack(n >> 8, n & 0xFF, f.DATA, f.END_STREAM, stream_id), bytes(body))
                stream.local_closed = True  # _close_local, inlined
                if stream.remote_closed:
                    del self.streams[stream_id]
                return n
            self._send_block(stream_id, stream, block, False)
        else:
            self.send_headers(stream_id, fields, False, sensitive)
        window = min(stream.send_window, self.send_window)
        sent = 0
        while sent < n and window > 0:
            size = min(n - sent, window, limit)
            self.send_data(stream_id, body[sent:sent + size], sent + size == n)
            sent += size
            window -= size
        return sent

    def _encode_response(self, fields: list, sensitive: frozenset | None) -> bytes:
        """The header block of a whole response. Responses repeat their fields (a backend's, but for
        `date` once a second), and fields the encoder can say without changing its table encode to
        the same bytes for as long as the table is unchanged (Encoder.generation): those blocks are
        kept, keyed by the fields, the way _decode_block keeps received ones."""
        encoder = self.encoder
        if sensitive:
            return encoder.encode(fields, sensitive)
        blocks = self._encoded_responses
        key = tuple(fields)
        if encoder.generation != self._encoded_generation:
            blocks.clear()
            self._encoded_generation = encoder.generation
        elif (block := blocks.get(key)) is not None:
            return block
        block = encoder.encode(fields)
        if encoder.generation == self._encoded_generation and len(block) <= MAX_CACHED_BLOCK_BYTES:
            if len(blocks) >= MAX_CACHED_BLOCKS:
                blocks.clear()
            blocks[key] = block
        return block

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self._sendable(stream_id)
        return min(stream.send_window, self.send_window)

    def send_data(self, stream_id: int, data, end_stream: bool = False) -> None:
        """`data` must fit the windows (local_flow_control_window) and the peer's frame size."""
        stream = self._sendable(stream_id)
        n = len(data)
        if n > stream.send_window or n > self.send_window or n > self.peer_max_frame_size:
            raise ValueError(f"{n} bytes do not fit the flow-control window or frame size")
        stream.send_window -= n
        self.send_window -= n
        self._out.append(f.frame_header(n, f.DATA, f.END_STREAM if end_stream else 0, stream_id))
        if n:
            self._out.append(bytes(data))
        if end_stream:
            self._close_local(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, error_code: int = f.CANCEL) -> None:
        if self.streams.pop(stream_id, None) is None or self.closed:
            return
        self._out.append(f.rst_stream_frame(stream_id, error_code))
        self._remember_reset(stream_id)

    def acknowledge_received_data(self, n: int, stream_id: int) -> None:
        """The consumer took `n` flow-controlled bytes: give them back to the peer once half a window
        (the connection's or the stream's) has been consumed, not on every frame."""
        self.conn_unacked += n
        if self.conn_unacked * 2 >= self.recv_window_target:
            self.recv_window += self.conn_unacked
            self._out.append(f.window_update_frame(0, self.conn_unacked))
            self.conn_unacked = 0
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            stream.window_unacked += n
            if stream.window_unacked * 2 >= self.local_initial_window:
                stream.recv_window += stream.window_unacked
                self._out.append(f.window_update_frame(stream_id, stream.window_unacked))
                stream.window_unacked = 0

    def _close_local(self, stream_id: int, stream: StreamState) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def _close_remote(self, stream_id: int, stream: StreamState) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            del self.streams[stream_id]

    def _remember_reset(self, stream_id: int) -> None:
        self._reset_set.add(stream_id)
        self._reset_ids.append(stream_id)
        if len(self._reset_ids) > RESET_MEMORY:
            self._reset_set.discard(self._reset_ids.popleft())

    # ---- errors

    def _connection_error(self, code: int, message: str, kind: str = "protocol_error") -> ConnectionError_:
        self.close_connection(code, message.encode(errors="replace"))
        self.closed = True
        return ConnectionError_(code, message, kind)

    def _stream_error(self, stream_id: int, code: int) -> None:
        self.streams.pop(stream_id, None)
        self._out.append(f.rst_stream_frame(stream_id, code))
        self._remember_reset(stream_id)

    def _is_idle(self, stream_id: int) -> bool:
        """A stream id that has never been used (§5.1): frames on it are connection errors."""
        if (stream_id % 2 == 1) != self.client:  # opened by the peer
            return stream_id > self.last_peer_stream_id
        return stream_id >= self.next_stream_id

    # ---- receiving

    def receive_data(self, data: bytes) -> list:
        if self.closed:
            return []
        buf = self._inbuf + data if self._inbuf else data
        pos = 0
        if self._preface_pending:
            if len(buf) < 24:
                if not f.PREFACE.startswith(buf):
                    raise self._connection_error(f.PROTOCOL_ERROR, "invalid connection preface")
                self._inbuf = buf
                return []
            if buf[:24] != f.PREFACE:
                raise self._connection_error(f.PROTOCOL_ERROR, "invalid connection preface")
            self._preface_pending = False
            pos = 24
        events: list = []
        n = len(buf)
        max_frame = self.local_max_frame_size
        unpack_header = _unpack_header
        while n - pos >= 9:
            # one C call for the nine bytes: the 24-bit length as 16 + 8 bits, type, flags, stream id
            length_high, length_low, ftype, flags, stream_id = unpack_header(buf, pos)
            length = length_high << 8 | length_low
            if length > max_frame:
                raise self._connection_error(f.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > n:
                break
            stream_id &= 0x7FFFFFFF  # the reserved bit is ignored on receipt (§4.1)
            payload = buf[pos + 9:end]
            pos = end
            if not self._settings_seen:
                if ftype != f.SETTINGS or flags & f.ACK:
                    raise self._connection_error(f.PROTOCOL_ERROR, "the first frame is not SETTINGS")
                self._settings_seen = True
            if self._block is not None and ftype != f.CONTINUATION:
                raise self._connection_error(f.PROTOCOL_ERROR, "a header block interrupted by another frame")
            if ftype == f.DATA:
                self._on_data(stream_id, flags, payload, events)
            elif ftype == f.HEADERS:
                if flags & _HEADERS_FLAGS_SEEN == f.END_HEADERS and stream_id:  # the usual: the whole block,
                    self._end_block(stream_id, flags, payload, events)  # unpadded, no priority (_on_headers')
                else:
                    self._on_headers(stream_id, flags, payload, events)
            elif ftype == f.WINDOW_UPDATE:
                self._on_window_update(stream_id, payload, events)
            elif ftype == f.RST_STREAM:
                self._on_rst_stream(stream_id, payload, events)
            elif ftype == f.SETTINGS:
                self._on_settings(stream_id, flags, payload, events)
            elif ftype == f.PING:
                if stream_id:
                    raise self._connection_error(f.PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise self._connection_error(f.FRAME_SIZE_ERROR, "PING of other than 8 bytes")
                if not flags & f.ACK:
                    self._out.append(f.ping_frame(payload, True))
                    events.append(_PING)
            elif ftype == f.CONTINUATION:
                self._on_continuation(stream_id, flags, payload, events)
            elif ftype == f.GOAWAY:
                if stream_id:
                    raise self._connection_error(f.PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise self._connection_error(f.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                self.goaway_received = True
                events.append(ConnectionTerminated(f.u32(payload, 4), f.u32(payload, 0) & 0x7FFFFFFF,
                                                   bytes(payload[8:])))
            elif ftype == f.PRIORITY:
                if not stream_id:
                    raise self._connection_error(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self._stream_error(stream_id, f.FRAME_SIZE_ERROR)
            elif ftype == f.PUSH_PROMISE:
                raise self._connection_error(f.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
            # unknown frame types are ignored (§5.5)
            if self.closed:
                break
        self._inbuf = buf[pos:] if pos < n else b""
        return events

    def _strip_padding(self, flags: int, payload):
        if flags & f.PADDED:
            if not payload:
                raise self._connection_error(f.FRAME_SIZE_ERROR, "padded frame without a pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise self._connection_error(f.PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1:len(payload) - pad]
        return payload

    def _on_data(self, stream_id: int, flags: int, payload, events: list) -> None:
        if not stream_id:
            raise self._connection_error(f.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        self.recv_window -= flow
        if self.recv_window < 0:
            raise self._connection_error(f.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        data = self._strip_padding(flags, payload) if flags & f.PADDED else payload
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream is None and self._is_idle(stream_id):
                raise self._connection_error(f.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            if flow:
                self.acknowledge_received_data(flow, 0)  # nobody will consume it
            if stream_id not in self._reset_set:
                self._stream_error(stream_id, f.STREAM_CLOSED)
            return
        if not stream.headers_received:
            raise self._connection_error(f.PROTOCOL_ERROR, "DATA before HEADERS")
        stream.recv_window -= flow
        if stream.recv_window < 0:
            self.acknowledge_received_data(flow, 0)
            self._stream_error(stream_id, f.FLOW_CONTROL_ERROR)
            events.append(StreamMalformed(stream_id, "DATA beyond the stream window", "flow_control",
                                          f.FLOW_CONTROL_ERROR))
            return
        stream.received += len(data)
        end = flags & f.END_STREAM != 0
        expected = stream.expected_length
        if expected >= 0 and not stream.no_body_expected and (
                stream.received > expected or (end and stream.received != expected)):
            self.acknowledge_received_data(flow, 0)
            self._malformed(stream_id, "content-length disagrees with the DATA received", events)
            return
        events.append(DataReceived(stream_id, data if type(data) is bytes else bytes(data), flow, end))
        if end:
            stream.remote_closed = True  # _close_remote, inlined
            if stream.local_closed:
                del self.streams[stream_id]

    def _malformed(self, stream_id: int, reason: str, events: list, kind: str = "malformed_request") -> None:
        """§8.1.1: a malformed message is a stream error of type PROTOCOL_ERROR."""
        self._stream_error(stream_id, f.PROTOCOL_ERROR)
        events.append(StreamMalformed(stream_id, reason, kind, f.PROTOCOL_ERROR))

    def _on_headers(self, stream_id: int, flags: int, payload, events: list) -> None:
        if not stream_id:
            raise self._connection_error(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = self._strip_padding(flags, payload) if flags & f.PADDED else payload
        if flags & f.PRIORITY_FLAG:
            if len(fragment) < 5:
                raise self._connection_error(f.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if f.u32(fragment, 0) & 0x7FFFFFFF == stream_id:
                self._stream_error(stream_id, f.PROTOCOL_ERROR)  # §5.3.1: a stream that depends on itself
                flags |= _DECODE_ONLY
            fragment = fragment[5:]
        if flags & f.END_HEADERS:  # the whole block in this frame (nearly always): nothing to keep pending
            self._end_block(stream_id, flags, fragment, events)
            return
        self._block = [stream_id, flags, [fragment], 1, len(fragment)]

    def _on_continuation(self, stream_id: int, flags: int, payload, events: list) -> None:
        block = self._block
        if block is None or block[0] != stream_id:
            raise self._connection_error(f.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block[2].append(payload)
        block[3] += 1
        block[4] += len(payload)
        if block[3] > MAX_CONTINUATION_FRAMES or block[4] > self.max_block_bytes:
            raise self._connection_error(f.ENHANCE_YOUR_CALM, "header block in too many CONTINUATION frames",
                                         "continuation_flood")
        if flags & f.END_HEADERS:
            self._block = None
            fragments = block[2]
            self._end_block(stream_id, block[1], b"".join(fragments), events)

    def _decode_block(self, block: bytes) -> tuple[list | None, str | None, _DecodedBlock | None]:
        """(fields, problem, cache entry) of a complete header block. A block that leaves the HPACK
        table unchanged (only indexed fields and literals without indexing: a client repeating a
        request; or any block into a table of size 0, where an insertion is dropped at once: the
        responses of an upstream, which we ask for no table) decodes to the same fields for as long
        as the table stays unchanged, so its result
        is kept, keyed by the block's bytes, and the next such block costs one dict lookup instead of
        the decoding and the request checks. Any change to the table (an insertion, a size update)
        starts the cache afresh; malformed and oversized blocks are never kept. The fields list is
        shared by the hits: consumers copy it, never change it."""
        decoder = self.decoder
        blocks = self._decoded_blocks
        if decoder.generation != self._decoded_generation:
            blocks.clear()
            self._decoded_generation = decoder.generation
        elif (entry := blocks.get(block)) is not None:
            decoder.never_indexed = entry.never_indexed
            return entry.fields, None, entry
        try:
            fields, problem = decoder.decode(block)
        except HpackError as e:
            raise self._connection_error(f.COMPRESSION_ERROR, f"header block: {e}") from None
        except HeaderListTooLarge:
            # the decoder kept its table in step: only this stream is refused
            return None, "header list larger than SETTINGS_MAX_HEADER_LIST_SIZE", None
        if problem is not None or decoder.generation != self._decoded_generation or len(block) > MAX_CACHED_BLOCK_BYTES:
            return fields, problem, None
        if len(blocks) >= MAX_CACHED_BLOCKS:
            blocks.clear()
        entry = blocks[block] = _DecodedBlock(fields, decoder.never_indexed)
        return fields, None, entry

    def _end_block(self, stream_id: int, flags: int, block, events: list) -> None:
        """A complete header block of `stream_id` (`flags`: its HEADERS frame's)."""
        if type(block) is not bytes:
            block = bytes(block)
        decoder = self.decoder
        if decoder.generation == self._decoded_generation and (cached := self._decoded_blocks.get(block)) is not None:
            decoder.never_indexed = cached.never_indexed  # a repeated block: _decode_block's hit, inlined
            fields, problem = cached.fields, None
        else:
            fields, problem, cached = self._decode_block(block)
        if flags & _DECODE_ONLY:
            return  # a stream already reset: decoded only to keep HPACK in step
        end_stream = bool(flags & f.END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.client or (stream_id & 1 and stream_id <= self.last_peer_stream_id):  # _is_idle, inlined
                if stream_id in self._reset_set or (self.client and not self._is_idle(stream_id)):
                    return  # in flight when we reset it
                raise self._connection_error(f.STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
            if stream_id % 2 == 0:
                raise self._connection_error(f.PROTOCOL_ERROR, "a client stream with an even id")
            self.last_peer_stream_id = stream_id
            if self.goaway_sent:
                return  # §6.8: streams above the GOAWAY's last id are not processed
            if fields is None:
                self._malformed(stream_id, problem, events, "header_list_too_large")
                return
            if len(self.streams) >= self.local_max_streams:
                self._stream_error(stream_id, f.REFUSED_STREAM)
                events.append(StreamMalformed(stream_id, "concurrent stream limit", "too_many_streams",
                                              f.REFUSED_STREAM))
                return
            try:
                if problem is not None:
                    raise _Malformed(problem)
                if cached is None:
                    length = _check_request(fields)
                elif (length := cached.request_length) is None:
                    length = cached.request_length = _check_request(fields)
            except _Malformed as e:
                self._malformed(stream_id, str(e), events, e.kind)
                return
            stream = self.streams[stream_id] = StreamState(self.peer_initial_window, self.local_initial_window)
            stream.headers_received = True
            stream.expected_length = length
            if end_stream:
                if length > 0:
                    self._malformed(stream_id, "content-length without the DATA", events)
                    return
                stream.remote_closed = True
            events.append(RequestReceived(stream_id, fields, end_stream, self.decoder.never_indexed, cached))
            return
        if stream.remote_closed:
            self._stream_error(stream_id, f.STREAM_CLOSED)
            events.append(StreamMalformed(stream_id, "HEADERS after the end of the stream", "stream_closed",
                                          f.STREAM_CLOSED))
            return
        if fields is None:
            self._malformed(stream_id, problem, events, "header_list_too_large")
            return
        try:
            if problem is not None:
                raise _Malformed(problem)
            if stream.headers_received or not self.client:
                # trailers (§8.1): they end the stream and carry no pseudo-header fields
                if not end_stream:
                    raise _Malformed("a second header block that does not end the stream")
                for name, _ in fields:
                    if name[:1] == b":":
                        raise _Malformed("a pseudo-header field in trailers")
                if stream.expected_length >= 0 and not stream.no_body_expected and \
                        stream.received != stream.expected_length:
                    raise _Malformed("content-length disagrees with the DATA received")
                events.append(TrailersReceived(stream_id, fields))
                self._close_remote(stream_id, stream)
                return
            if cached is None:
                status, length = _check_response(fields)
            elif cached.response_check is not None:
                status, length = cached.response_check
            else:
                status, length = cached.response_check = _check_response(fields)
            if status < 200:
                if end_stream:
                    raise _Malformed("an informational response that ends the stream")
                events.append(InformationalResponseReceived(stream_id, fields))
                return
            stream.headers_received = True
            if status == 204 or status == 304:
                stream.no_body_expected = True
            stream.expected_length = length
            if end_stream and length > 0 and not stream.no_body_expected:
                raise _Malformed("content-length without the DATA")
        except _Malformed as e:
            self._malformed(stream_id, str(e), events, "malformed_response" if self.client else e.kind)
            return
        events.append(ResponseReceived(stream_id, fields, end_stream, self.decoder.never_indexed, status, length,
                                       cached))
        if end_stream:
            self._close_remote(stream_id, stream)

    def _on_window_update(self, stream_id: int, payload, events: list) -> None:
        if len(payload) != 4:
            raise self._connection_error(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        increment = f.u32(payload, 0) & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise self._connection_error(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise self._connection_error(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            events.append(WindowUpdated(0))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise self._connection_error(f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # closed: ignored (§6.9)
        if not increment:
            self._malformed(stream_id, "WINDOW_UPDATE of 0", events, "protocol_error")
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            self._stream_error(stream_id, f.FLOW_CONTROL_ERROR)
            events.append(StreamMalformed(stream_id, "stream window above 2^31-1", "flow_control",
                                          f.FLOW_CONTROL_ERROR))
            return
        events.append(WindowUpdated(stream_id))

    def _on_rst_stream(self, stream_id: int, payload, events: list) -> None:
        if len(payload) != 4:
            raise self._connection_error(f.FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
        if not stream_id:
            raise self._connection_error(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if self.streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, f.u32(payload, 0)))
        elif self._is_idle(stream_id):
            raise self._connection_error(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")

    def _on_settings(self, stream_id: int, flags: int, payload, events: list) -> None:
        if stream_id:
            raise self._connection_error(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise self._connection_error(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise self._connection_error(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        changed = {}
        for key, value in f.parse_settings(payload):
            if key == f.ENABLE_PUSH:
                if value > 1:
                    raise self._connection_error(f.PROTOCOL_ERROR, "ENABLE_PUSH other than 0 or 1")
                if self.client and value:
                    raise self._connection_error(f.PROTOCOL_ERROR, "a server may not enable push")
            elif key == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise self._connection_error(f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                if delta:
                    for stream in self.streams.values():
                        stream.send_window += delta
                        if stream.send_window > f.MAX_WINDOW:
                            raise self._connection_error(f.FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            elif key == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE_LIMIT:
                    raise self._connection_error(f.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame_size = value
            elif key == f.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif key == f.HEADER_TABLE_SIZE:
                self.encoder.set_max_table_size(min(value, 4096))  # we never need a bigger table
            changed[key] = value
        self._out.append(f.SETTINGS_ACK_FRAME)
        events.append(RemoteSettingsChanged(changed))


def _check_request(fields: list) -> int:
    """§8.3.1 pseudo-header rules (names and values were checked by the HPACK decoder); returns the
    content-length (-1 when absent). Raises _Malformed."""
    seen: set = set()
    regular = False
    length = -1
    method = path = scheme = None
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise _Malformed("a pseudo-header field after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise _Malformed(f"pseudo-header field {name[:20]!r} in a request")
            if name in seen:
                raise _Malformed(f"repeated {name.decode()}")
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":scheme":
                scheme = value
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            raise _Malformed(f"connection-specific field {name.decode()}")
        if name == b"te" and value != b"trailers":
            raise _Malformed("te other than trailers")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
                raise _Malformed("invalid content-length")
            length = int(value)
    if method is None:
        raise _Malformed("no :method")
    if method != b"CONNECT" and (not path or scheme is None):
        raise _Malformed("no :path or :scheme")
    return length


def _check_response(fields: list) -> tuple[int, int]:
    status = 0
    regular = False
    length = -1
    for name, value in fields:
        if name[:1] == b":":
            if regular or name != b":status" or status:
                raise _Malformed("invalid pseudo-header fields in a response")
            if len(value) != 3 or not value.isdigit():
                raise _Malformed("invalid :status")
            status = int(value)
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            raise _Malformed(f"connection-specific field {name.decode()}")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
                raise _Malformed("invalid content-length")
            length = int(value)
    if not status:
        raise _Malformed("no :status")
    if status == 101:
        raise _Malformed("101 is not allowed in HTTP/2")
    return status, length
