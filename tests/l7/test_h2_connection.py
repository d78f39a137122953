"""Our HTTP/2 connection state machine (proxy/l7/h2_connection.py) against the `h2` package as the
oracle, in memory: our server with h2's client, our client with h2's server, and the error answers
RFC 9113 asks for, checked frame by frame with hyperframe."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import hyperframe.frame as hf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.l7 import h2_frames as fr
from proxy.l7.h2_codec import client_settings, server_settings
from proxy.l7.h2_connection import (
    ConnectionError_,
    DataReceived,
    H2Connection,
    RequestReceived,
    ResponseReceived,
    StreamMalformed,
    StreamReset,
    TrailersReceived,
)

MAX_HEADERS = 60 * 1024


def ours(client: bool) -> H2Connection:
    conn = H2Connection(client=client, settings=client_settings() if client else server_settings(),
                        max_header_list_size=MAX_HEADERS)
    conn.initiate_connection()
    return conn


def oracle(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client, header_encoding=None, normalize_outbound_headers=False, validate_outbound_headers=False))
    conn.initiate_connection()
    return conn


def pump(a, b) -> tuple[list, list]:
    """Exchange bytes until both are quiet; returns (events of a, events of b)."""
    events_a, events_b = [], []
    for _ in range(50):
        data_a = a.data_to_send()
        data_b = b.data_to_send()
        if not data_a and not data_b:
            break
        if data_a:
            events_b += b.receive_data(data_a)
        if data_b:
            events_a += a.receive_data(data_b)
    return events_a, events_b


def frames_of(data: bytes) -> list:
    out, pos = [], 0
    while pos + 9 <= len(data):
        frame, length = hf.Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        frame.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    return out


REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/a?b=1"),
           (b"user-agent", b"test"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]

field_names = st.sampled_from([b"x-a", b"accept", b"x-request-id", b"cookie", b"x-long-name-of-a-field"])
field_values = st.binary(min_size=0, max_size=300).filter(
    lambda v: b"\x00" not in v and b"\r" not in v and b"\n" not in v and v[:1] not in (b" ", b"\t")
    and v[-1:] not in (b" ", b"\t"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(field_names, field_values), max_size=8),
                          st.binary(max_size=70000), st.booleans()), min_size=1, max_size=6))
def test_our_server_with_the_oracle_client(requests) -> None:
    """Requests with random fields, bodies (several windows long) and trailers arrive intact."""
    server, client = ours(False), oracle(True)
    pump(client, server)
    record: dict[int, dict] = {}
    sent = {}
    for extra, body, trailers in requests:
        sid = client.get_next_available_stream_id()
        fields = REQUEST + extra
        sent[sid] = (fields, body, trailers)
        client.send_headers(sid, fields, end_stream=not body and not trailers)
        _record(pump(client, server)[1], record, server)
        pos = 0
        while pos < len(body):  # what the windows allow; the server acknowledges as it consumes
            window = min(client.local_flow_control_window(sid), 16384)
            if window == 0:
                _record(pump(client, server)[1], record, server)
                continue
            piece = body[pos:pos + window]
            pos += len(piece)
            client.send_data(sid, piece, end_stream=pos == len(body) and not trailers)
            _record(pump(client, server)[1], record, server)
        if trailers:
            client.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
            _record(pump(client, server)[1], record, server)
    for sid, (fields, body, trailers) in sent.items():
        r = record[sid]
        assert r["headers"] == fields
        assert r["body"] == body
        assert r["trailers"] == ([(b"grpc-status", b"0")] if trailers else None)
        assert r["ended"]


def _acknowledge(server: H2Connection, events: list) -> None:
    for e in events:
        if isinstance(e, DataReceived):
            server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)


def _record(events: list, record: dict, server: H2Connection) -> None:
    for e in events:
        if isinstance(e, (StreamMalformed, StreamReset)):
            raise AssertionError(f"unexpected {type(e).__name__}: {getattr(e, 'reason', '')}")
        r = record.get(e.stream_id)
        assert r is None or not r["ended"], f"{type(e).__name__} after the end of stream {e.stream_id}"
        if isinstance(e, RequestReceived):
            r = record[e.stream_id] = {"headers": e.headers, "body": b"", "trailers": None, "ended": False}
        elif isinstance(e, DataReceived):
            r["body"] += e.data
            server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        elif isinstance(e, TrailersReceived):
            r["trailers"] = e.headers
        # the end of the stream rides on the event that carries it (the h2 package adds a StreamEnded)
        r["ended"] = isinstance(e, TrailersReceived) or e.stream_ended


def _view(events: list) -> list:
    """Events as (kind, stream id, headers or data, whether the stream ended with it), from either
    module: the h2 package's StreamEnded folded into the event before it on its stream, where ours
    says it."""
    view: list = []
    for e in events:
        kind = type(e).__name__
        if kind == "StreamEnded":
            last = max(i for i, v in enumerate(view) if v[1] == e.stream_id)
            view[last] = view[last][:3] + (True,)
            continue
        if kind == "WindowUpdated" or kind == "RemoteSettingsChanged" or kind == "SettingsAcknowledged":
            continue
        payload = getattr(e, "headers", None)
        payload = [tuple(field) for field in payload] if payload is not None else bytes(getattr(e, "data", b""))
        if isinstance(e, (RequestReceived, ResponseReceived, DataReceived)):
            ended = e.stream_ended
        else:
            ended = isinstance(e, TrailersReceived)
        view.append((kind, e.stream_id, payload, ended))
    return view


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(field_names.filter(lambda n: n != b"cookie"), field_values), max_size=4),
                          st.binary(max_size=20000), st.booleans()), min_size=1, max_size=5))
def test_the_same_bytes_give_the_oracles_events(requests) -> None:
    """One client's bytes to our server and to h2's: the same messages on the same streams, each
    ending where h2 says the stream ended (our end rides on the event, h2 adds a StreamEnded)."""
    client, server, twin = oracle(True), ours(False), oracle(False)
    ours_events, theirs = [], []

    def deliver() -> None:
        data = client.data_to_send()
        ours_events.extend(server.receive_data(data))
        theirs.extend(twin.receive_data(data))
        reply = server.data_to_send()
        twin.data_to_send()
        if reply:
            client.receive_data(reply)

    deliver()
    for extra, body, trailers in requests:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST + extra, end_stream=not body and not trailers)
        if body:
            client.send_data(sid, body[:16384], end_stream=not trailers)  # within the default windows
        if trailers:
            client.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        deliver()
    ours_view = _view(ours_events)
    assert ours_view == _view(theirs)
    assert sum(v[3] for v in ours_view) == len(requests)


def test_our_client_with_the_oracle_server_response_body_and_trailers() -> None:
    client, server = ours(True), oracle(False)
    pump(client, server)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST, end_stream=False)
    client.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    _, s_events = pump(client, server)
    received = [e for e in s_events if isinstance(e, h2.events.RequestReceived)]
    assert received and dict(received[0].headers)[b":path"] == b"/a?b=1"
    assert b"".join(e.data for e in s_events if isinstance(e, h2.events.DataReceived)) == b"\x00\x00\x00\x00\x02hi"
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    body = b"x" * 100000  # beyond the default window: our client must acknowledge for the rest to come
    sent = 0
    got = b""
    trailers = None
    for _ in range(100):
        window = server.local_flow_control_window(sid)
        if sent < len(body) and window:
            piece = body[sent:sent + min(window, 16384)]
            server.send_data(sid, piece)
            sent += len(piece)
        elif sent == len(body) and trailers is None:
            server.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")], end_stream=True)
            trailers = False
        c_events, _ = pump(client, server)
        for e in c_events:
            if isinstance(e, ResponseReceived):
                assert e.headers[0] == (b":status", b"200")
            elif isinstance(e, DataReceived):
                got += e.data
                client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, TrailersReceived):
                trailers = e.headers
        if trailers:
            break
    assert got == body
    assert trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def _raw_client() -> tuple[H2Connection, hpack.Encoder]:
    server = ours(False)
    server.receive_data(fr.PREFACE + fr.settings_frame({}))
    server.data_to_send()
    return server, hpack.Encoder()


def _headers_frame(enc: hpack.Encoder, sid: int, fields, flags=fr.END_HEADERS | fr.END_STREAM) -> bytes:
    block = enc.encode(fields)
    return fr.frame_header(len(block), fr.HEADERS, flags, sid) + block


@pytest.mark.parametrize("fields, why", [
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"X-Upper", b"1")], "upper-case name"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"connection", b"close")], "connection"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"te", b"gzip")], "te"),
    ([(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/")], "pseudo after regular"),
    ([(b":method", b"GET"), (b":scheme", b"http")], "no :path"),
    ([(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")], "repeated"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":status", b"200")], "response pseudo"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x-a", b"a\nb")], "LF in a value"),
])
def test_malformed_requests_are_stream_errors(fields, why) -> None:
    server, enc = _raw_client()
    events = server.receive_data(_headers_frame(enc, 1, fields))
    assert [type(e) for e in events] == [StreamMalformed], why
    out = frames_of(server.data_to_send())
    assert isinstance(out[0], hf.RstStreamFrame) and out[0].error_code == fr.PROTOCOL_ERROR
    # the connection goes on: the next stream is served
    events = server.receive_data(_headers_frame(enc, 3, [(b":method", b"GET"), (b":scheme", b"http"),
                                                         (b":path", b"/")]))
    assert isinstance(events[0], RequestReceived)


def test_content_length_must_match_the_data() -> None:
    server, enc = _raw_client()
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b"content-length", b"5")]
    server.receive_data(_headers_frame(enc, 1, fields, flags=fr.END_HEADERS))
    events = server.receive_data(fr.frame_header(3, fr.DATA, fr.END_STREAM, 1) + b"abc")
    assert isinstance(events[-1], StreamMalformed)
    assert frames_of(server.data_to_send())[-1].error_code == fr.PROTOCOL_ERROR


@pytest.mark.parametrize("data, code", [
    (fr.frame_header(1, fr.DATA, 0, 0) + b"x", fr.PROTOCOL_ERROR),  # DATA on stream 0
    (fr.frame_header(1, fr.DATA, 0, 9) + b"x", fr.PROTOCOL_ERROR),  # DATA on an idle stream
    (fr.frame_header(4, fr.WINDOW_UPDATE, 0, 0) + b"\x00\x00\x00\x00", fr.PROTOCOL_ERROR),
    (fr.frame_header(6, fr.SETTINGS, 0, 0) + b"\x00\x02\x00\x00\x00\x02", fr.PROTOCOL_ERROR),  # ENABLE_PUSH=2
    (fr.frame_header(6, fr.SETTINGS, 0, 0) + b"\x00\x04\x80\x00\x00\x00", fr.FLOW_CONTROL_ERROR),
    (fr.frame_header(5, fr.SETTINGS, 0, 0) + b"\x00" * 5, fr.FRAME_SIZE_ERROR),
    (fr.frame_header(20000, fr.DATA, 0, 1), fr.FRAME_SIZE_ERROR),  # above our MAX_FRAME_SIZE
    (fr.frame_header(7, fr.PING, 0, 0) + b"\x00" * 7, fr.FRAME_SIZE_ERROR),
])
def test_connection_errors(data, code) -> None:
    server, _ = _raw_client()
    with pytest.raises(ConnectionError_) as info:
        server.receive_data(data)
    assert info.value.error_code == code
    goaway = frames_of(server.data_to_send())[-1]
    assert isinstance(goaway, hf.GoAwayFrame) and goaway.error_code == code


def test_headers_on_an_even_stream_and_a_continuation_flood() -> None:
    server, enc = _raw_client()
    with pytest.raises(ConnectionError_):
        server.receive_data(_headers_frame(enc, 2, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]))
    server, enc = _raw_client()
    data = fr.frame_header(0, fr.HEADERS, 0, 1) + fr.frame_header(0, fr.CONTINUATION, 0, 1) * 100
    with pytest.raises(ConnectionError_) as info:
        server.receive_data(data)
    assert info.value.kind == "continuation_flood" and info.value.error_code == fr.ENHANCE_YOUR_CALM


def test_streams_beyond_the_limit_are_refused() -> None:
    server = H2Connection(client=False, settings={**server_settings(), fr.MAX_CONCURRENT_STREAMS: 2},
                          max_header_list_size=MAX_HEADERS)
    server.receive_data(fr.PREFACE + fr.settings_frame({}))
    enc = hpack.Encoder()
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    events = server.receive_data(b"".join(_headers_frame(enc, sid, fields) for sid in (1, 3, 5)))
    assert [type(e) for e in events] == [RequestReceived, RequestReceived, StreamMalformed]
    assert events[0].stream_ended and events[1].stream_ended
    assert events[-1].kind == "too_many_streams"
    rst = [x for x in frames_of(server.data_to_send()) if isinstance(x, hf.RstStreamFrame)]
    assert rst[0].stream_id == 5 and rst[0].error_code == fr.REFUSED_STREAM


def test_a_reset_stream_drops_late_frames_and_returns_their_window() -> None:
    server, enc = _raw_client()
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")]
    server.receive_data(_headers_frame(enc, 1, fields, flags=fr.END_HEADERS))
    server.reset_stream(1, fr.CANCEL)
    server.data_to_send()
    events = server.receive_data((fr.frame_header(16384, fr.DATA, 0, 1) + b"x" * 16384) * 4)
    assert events == []
    out = frames_of(server.data_to_send())
    assert any(isinstance(x, hf.WindowUpdateFrame) and x.stream_id == 0 for x in out), \
        "DATA nobody will read still gives its share of the connection window back"
    assert not any(isinstance(x, hf.RstStreamFrame) for x in out), "no second reset for frames in flight"


def test_a_shutdown_notice_still_accepts_streams_the_final_goaway_does_not() -> None:
    """RFC 9113 §6.8's graceful shutdown: GOAWAY 2^31-1 first, streams on their way are served; the
    final GOAWAY names the last one accepted, and later streams are ignored."""
    server = ours(client=False)
    server.receive_data(fr.PREFACE + fr.settings_frame({}))
    server.data_to_send()
    enc = hpack.Encoder()
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    server.shutdown_notice()
    notice = [x for x in frames_of(server.data_to_send()) if isinstance(x, hf.GoAwayFrame)]
    assert [(x.last_stream_id, x.error_code) for x in notice] == [(2**31 - 1, fr.NO_ERROR)]
    events = server.receive_data(_headers_frame(enc, 1, fields))  # sent before the notice arrived
    assert [type(e) for e in events] == [RequestReceived] and events[0].stream_ended
    server.close_connection()
    final = [x for x in frames_of(server.data_to_send()) if isinstance(x, hf.GoAwayFrame)]
    assert [(x.last_stream_id, x.error_code) for x in final] == [(1, fr.NO_ERROR)]
    assert server.receive_data(_headers_frame(enc, 3, fields)) == []
    server.shutdown_notice()  # nothing after the final GOAWAY
    assert server.data_to_send() == b""


def _raw_headers(sid: int, block: bytes) -> bytes:
    return fr.frame_header(len(block), fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, sid) + block


def test_a_repeated_header_block_decodes_as_the_table_says_now() -> None:
    """A block of indexed fields repeats byte for byte; its decoding is kept only while the HPACK
    table is unchanged: after an insertion the same bytes name another entry, after a size update
    to 0 they name none (COMPRESSION_ERROR)."""
    server, _ = _raw_client()
    get = b"\x82\x86\x84"  # :method GET, :scheme http, :path / (static)
    literal = b"\x40\x03x-a"  # literal with incremental indexing, new name x-a
    server.receive_data(_raw_headers(1, get + literal + b"\x03one"))
    repeated = get + b"\xbe"  # ... and dynamic entry 62, the newest
    for sid in (3, 5):
        events = server.receive_data(_raw_headers(sid, repeated))
        assert events[0].headers[-1] == (b"x-a", b"one")
    server.receive_data(_raw_headers(7, get + literal + b"\x03two"))  # inserted: 62 is now x-a: two
    events = server.receive_data(_raw_headers(9, repeated))
    assert events[0].headers[-1] == (b"x-a", b"two")
    with pytest.raises(ConnectionError_) as info:  # a size update to 0 empties the table
        server.receive_data(_raw_headers(11, b"\x20" + get) + _raw_headers(13, repeated))
    assert info.value.error_code == fr.COMPRESSION_ERROR


def test_a_repeated_malformed_block_is_refused_every_time() -> None:
    """Only blocks that passed every check are kept: a malformed one is checked again each time."""
    server, enc = _raw_client()
    bad = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x-a", b"a\nb")]
    for sid in (1, 3, 5):
        assert [type(e) for e in server.receive_data(_headers_frame(enc, sid, bad))] == [StreamMalformed]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([4096, 4096, 4096, 256, 0])), min_size=1, max_size=30))
def test_repeated_requests_decode_as_the_oracle_encoded_them(choices) -> None:
    """Requests drawn from a few (so most repeat and their blocks become all-indexed), sent by h2's
    encoder while it also changes its table size now and then: every request arrives as sent."""
    pool = [REQUEST, REQUEST + [(b"x-a", b"1")], [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/b")],
            REQUEST + [(b"authorization", b"secret")]]
    server, enc = _raw_client()
    sid = 1
    for which, table_size in choices:
        if enc.header_table_size != table_size:
            enc.header_table_size = table_size  # the next block starts with a size update
        events = server.receive_data(_headers_frame(enc, sid, pool[which]))
        assert isinstance(events[0], RequestReceived) and events[0].headers == pool[which]
        sid += 2


@pytest.mark.parametrize("body_size, window", [(0, 65535), (5, 65535), (40000, 65535), (100, 10), (100, 0)])
def test_a_whole_response_in_one_call_as_the_windows_allow(body_size, window) -> None:
    """send_response: HEADERS and what the windows and frame size allow of the body, the stream
    ended with its last byte; the rest goes out with send_data as the oracle client opens windows."""
    server, client = ours(False), oracle(True)
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    pump(client, server)
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
                        end_stream=True)
    pump(client, server)
    body = bytes(range(256)) * (body_size // 256) + b"x" * (body_size % 256)
    fields = [(b":status", b"200"), (b"content-length", b"%d" % body_size)]
    sent = server.send_response(1, fields, memoryview(body))
    assert sent == min(body_size, window)  # in frames of at most 16384
    got: dict = {"data": b"", "ended": False}

    def receive() -> None:
        for e in pump(server, client)[1]:
            if isinstance(e, h2.events.ResponseReceived):
                got["headers"] = e.headers
            elif isinstance(e, h2.events.DataReceived):
                got["data"] += e.data
            elif isinstance(e, h2.events.StreamEnded):
                got["ended"] = True

    receive()
    assert got["headers"] == fields and got["ended"] == (sent == body_size)
    for _ in range(10):
        if sent == body_size:
            break
        client.increment_flow_control_window(16384, stream_id=1)
        pump(client, server)
        more = min(body_size - sent, server.local_flow_control_window(1), 16384)
        server.send_data(1, body[sent:sent + more], sent + more == body_size)
        sent += more
        receive()
    assert got["data"] == body and got["ended"]


def test_a_repeated_response_is_encoded_as_the_table_says_now() -> None:
    """A response repeated on several streams goes out as the block kept from the last time while
    the encoder's table is unchanged; after the client shrinks the table to nothing (SETTINGS), the
    kept block would name entries that are gone: the oracle client decodes every response."""
    server, client = ours(False), oracle(True)
    pump(client, server)
    fields = [(b":status", b"200"), (b"server", b"nginx"), (b"content-type", b"text/plain"),
              (b"date", b"Fri, 04 Dec 2026 17:40:00 GMT"), (b"content-length", b"5")]
    seen = []
    for sid in range(1, 15, 2):
        if sid == 9:
            client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
            pump(client, server)
        client.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                                  (b":path", b"/")], end_stream=True)
        pump(client, server)
        assert server.send_response(sid, fields, memoryview(b"hello")) == 5
        seen += [e.headers for e in pump(server, client)[1] if isinstance(e, h2.events.ResponseReceived)]
    assert seen == [fields] * 7


@pytest.mark.parametrize("end_stream", [False, True])
def test_a_header_block_beyond_the_peer_frame_size_goes_on_in_continuation_frames(end_stream: bool) -> None:
    """send_headers puts a block in one HEADERS frame when it fits the peer's frame size, else in
    HEADERS and CONTINUATION frames (END_HEADERS on the last, END_STREAM on the HEADERS): h2 reads both."""
    client, server = ours(True), oracle(False)
    pump(client, server)
    request = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    for sid, extra in ((1, []), (3, [(b"x-big", b"v" * 40000)])):
        client.send_headers(sid, request + extra, end_stream=end_stream)
        data = client.data_to_send()
        sent = frames_of(data)
        assert isinstance(sent[0], hf.HeadersFrame)
        assert ("END_STREAM" in sent[0].flags) == end_stream
        if not extra:
            assert len(sent) == 1 and "END_HEADERS" in sent[0].flags
        else:
            assert "END_HEADERS" not in sent[0].flags and len(sent) >= 3  # ~35 kB in frames of 16 kB
            assert all(isinstance(f, hf.ContinuationFrame) and "END_STREAM" not in f.flags for f in sent[1:])
            assert ["END_HEADERS" in f.flags for f in sent[1:]] == [False] * (len(sent) - 2) + [True]
            assert all(len(f.data) == 16384 for f in sent[:-1])
        (received, *rest) = server.receive_data(data)
        assert isinstance(received, h2.events.RequestReceived) and received.headers == request + extra
        assert client.streams[sid].local_closed == end_stream  # (the response has not come: still known)
