"""Response header blocks on an upstream connection: we ask for an HPACK dynamic table of size 0, so a
block that inserts is dropped at once and leaves the table as it was, and the connection layer's
repeated-block cache (H2Connection._decode_block) serves repeated responses, checked against the
`hpack` package as the oracle, as tests/l7/test_h2_hpack.py does for the decoder itself."""

from __future__ import annotations

import hpack
import pytest

from proxy.l7 import h2_frames as frames
from proxy.l7.h2_connection import (
    MAX_CACHED_BLOCKS,
    ConnectionError_,
    ResponseReceived,
    TrailersReceived,
)
from proxy.l7.h2_hpack import Decoder
from proxy.l7.h2_upstream import UpstreamH2Stream, _response_view, upstream_connection_state

# what nginx answers a small GET with: literal fields with incremental indexing, every time
NGINX_HEAD = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Fri, 04 Dec 2026 17:37:36 GMT"),
              (b"content-type", b"text/plain"), (b"content-length", b"0")]
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")]


def _server_encoder() -> hpack.Encoder:
    """A server's encoder after our SETTINGS_HEADER_TABLE_SIZE of 0 (its next block starts with the
    size update, RFC 7541 §4.2)."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 0
    return encoder


class _Upstream:
    """Our side of an upstream connection, fed the frames a server would send."""

    def __init__(self) -> None:
        self.conn = upstream_connection_state()
        self.conn.initiate_connection()
        self.conn.receive_data(frames.settings_frame({}))
        self.conn.data_to_send()

    def respond(self, block: bytes, flags: int = frames.END_HEADERS | frames.END_STREAM) -> list:
        """Open a stream and answer it with `block`; returns the connection layer's events."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, REQUEST, end_stream=True)
        self.conn.data_to_send()
        return self.conn.receive_data(frames.frame_header(len(block), frames.HEADERS, flags, sid) + block)


def _as_bytes(fields) -> list:
    return [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v) for n, v in fields]


def test_the_upstream_advertises_a_table_of_size_0():
    h2conn = upstream_connection_state()
    assert h2conn.local_settings[frames.HEADER_TABLE_SIZE] == 0
    assert h2conn.decoder.max_table_size == 0


def test_an_insertion_dropped_by_an_empty_table_is_no_table_change():
    """The generation the connection layer keys its cache by moves only when the table changes."""
    inserting = hpack.Encoder().encode([(b":status", b"200"), (b"x-a", b"1")])
    empty = Decoder(max_table_size=0)
    empty.decode(inserting)
    assert empty.generation == 0 and empty.dynamic_table == []
    table = Decoder(max_table_size=4096)
    table.decode(inserting)
    assert table.generation == 1 and table.dynamic_table == [(b"x-a", b"1")]
    small = Decoder(max_table_size=40)  # room for x-a: 1 (36 bytes), not for a longer entry
    small.decode(inserting)
    generation = small.generation
    small.decode(hpack.Encoder().encode([(b"x-b", b"a long value")]))  # empties the table: a change
    assert small.generation > generation and small.dynamic_table == []


def test_repeated_blocks_decode_as_the_oracle_does_and_keep_the_table_empty():
    encoder, oracle, upstream = _server_encoder(), hpack.Decoder(), _Upstream()
    blocks = [encoder.encode(NGINX_HEAD) for _ in range(3)]
    assert blocks[0][0] == 0x20 and blocks[1] == blocks[2]  # the size update, then the same bytes
    heads = []
    for block in blocks + blocks:
        events = upstream.respond(block)
        assert isinstance(events[0], ResponseReceived)
        assert events[0].headers == _as_bytes(oracle.decode(block, raw=True))
        assert (events[0].status, events[0].length) == (200, 0)  # as checked, looked up or not
        assert upstream.conn.decoder.table_size == 0 and upstream.conn.decoder.dynamic_table == []
        heads.append(events[0].headers)
    # looked up, not decoded again (a size update, as in blocks[0], is a table change: decoded afresh)
    assert heads[1] is heads[2] and heads[4] is heads[5] and heads[2] is not heads[4]
    assert len(upstream.conn._decoded_blocks) == 1


def test_a_repeated_response_view_is_worked_out_once_and_shared():
    """The fields the router takes (no :status, no content-length) are worked out once per repeated
    block and kept on its cache entry, as a tuple no one can edit (a response stage edits a copy)."""
    encoder, upstream = _server_encoder(), _Upstream()
    head = [*NGINX_HEAD[:4], (b"content-length", b"5"), (b"x-a", b"1")]
    encoder.encode(head)  # the block with the table size update
    block = encoder.encode(head)
    views = []
    for _ in range(3):
        event = upstream.respond(block, frames.END_HEADERS)[0]
        assert isinstance(event, ResponseReceived) and event.block is not None
        views.append(_response_view(event))
    assert views[0] is views[1] is views[2]
    assert views[0].fields == tuple(pair for pair in head if pair[0] not in (b":status", b"content-length"))


def test_a_taken_field_is_left_out_once_per_repeated_block_and_its_last_value_returned():
    """What an outbound listener's peer metadata stage reads (Chain.sole_taker): every copy of the
    field out of the fields, the last value returned, the other fields in their order."""
    encoder, upstream = _server_encoder(), _Upstream()
    head = [(b":status", b"200"), (b"x-triomesh-peer", b"app=a"), (b"server", b"s"),
            (b"x-triomesh-peer", b"app=b"), (b"x-a", b"1")]
    encoder.encode(head)
    block = encoder.encode(head)
    stream = UpstreamH2Stream(None, 1)
    results = []
    for _ in range(2):
        stream.view = _response_view(upstream.respond(block)[0])
        results.append(stream.fields_without(b"x-triomesh-peer"))
    assert results[0] == ((((b"server", b"s"), (b"x-a", b"1"))), b"app=b")
    assert results[1][0] is results[0][0]  # taken out once
    assert stream.fields_without(b"x-absent") == (tuple(head[1:]), None)
    assert stream.view.fields == tuple(head[1:])  # the full view is kept
    uncached = _Upstream()  # a block the cache does not keep (the size update): the same answer
    event = uncached.respond(_server_encoder().encode(head))[0]
    assert event.block is None
    stream.view = _response_view(event)
    assert stream.fields_without(b"x-triomesh-peer") == (((b"server", b"s"), (b"x-a", b"1")), b"app=b")


def test_a_view_has_the_first_grpc_status_field_alone():
    """What the router's retry conditions read of a response (retry_on_status): its first grpc-status
    field, found once per repeated block (a trailers-only gRPC answer says it in its head)."""
    encoder, upstream = _server_encoder(), _Upstream()
    head = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
            (b"grpc-message", b"down"), (b"grpc-status", b"0")]
    encoder.encode(head)
    block = encoder.encode(head)
    views = [_response_view(upstream.respond(block)[0]) for _ in range(2)]
    assert views[0] is views[1] and views[0].grpc_fields == ((b"grpc-status", b"14"),)
    plain = _response_view(_Upstream().respond(_server_encoder().encode(NGINX_HEAD))[0])
    assert plain.grpc_fields == ()


def test_a_repeated_trailers_block_is_looked_up_too():
    encoder, upstream = _server_encoder(), _Upstream()
    head_fields = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    encoder.encode(head_fields)  # the block with the size update, not sent again
    head = encoder.encode(head_fields)
    trailers = encoder.encode([(b"grpc-status", b"0"), (b"grpc-message", b"")])
    seen = []
    for _ in range(3):
        assert isinstance(upstream.respond(head, frames.END_HEADERS)[0], ResponseReceived)
        sid = upstream.conn.get_next_available_stream_id() - 2
        events = upstream.conn.receive_data(
            frames.frame_header(len(trailers), frames.HEADERS, frames.END_HEADERS | frames.END_STREAM, sid) + trailers)
        assert isinstance(events[0], TrailersReceived)
        assert events[0].headers == [(b"grpc-status", b"0"), (b"grpc-message", b"")]
        seen.append(events[0].headers)
    assert seen[0] is seen[1] is seen[2]


def test_a_hit_restores_the_never_indexed_fields_of_its_block():
    encoder, upstream = _server_encoder(), _Upstream()
    secret = encoder.encode([(b":status", b"200"), hpack.NeverIndexedHeaderTuple(b"set-cookie", b"a=1")])
    plain = encoder.encode(NGINX_HEAD)
    for _ in range(2):
        assert upstream.respond(secret)[0].sensitive == frozenset({(b"set-cookie", b"a=1")})
        assert upstream.respond(plain)[0].sensitive is None


def test_a_reference_to_a_dynamic_entry_is_a_compression_error():
    """A server that ignores the size 0 and refers to an entry it inserted: a COMPRESSION_ERROR, never
    a field from a remembered block, also after the inserting block was looked up."""
    inserting = hpack.Encoder().encode([(b":status", b"200"), (b"x-a", b"1")])
    for repeats in (1, 2):
        upstream = _Upstream()
        for _ in range(repeats):
            assert upstream.respond(inserting)[0].headers == [(b":status", b"200"), (b"x-a", b"1")]
        with pytest.raises(ConnectionError_) as info:
            upstream.respond(bytes([0x88, 0x80 | 62]))  # :status 200, dynamic entry 62
        assert info.value.error_code == frames.COMPRESSION_ERROR


def test_a_repeated_malformed_response_is_refused_every_time():
    encoder, upstream = _server_encoder(), _Upstream()
    bad = encoder.encode([(b":status", b"200"), (b"connection", b"close")])
    for _ in range(3):
        assert upstream.respond(bad)[0].reason.startswith("connection-specific")


def test_the_cache_is_bounded():
    encoder, upstream = _server_encoder(), _Upstream()
    for i in range(3 * MAX_CACHED_BLOCKS):
        events = upstream.respond(encoder.encode([(b":status", b"200"), (b"x-n", b"%d" % i)]))
        assert events[0].headers[1] == (b"x-n", b"%d" % i)
        assert len(upstream.conn._decoded_blocks) <= MAX_CACHED_BLOCKS
