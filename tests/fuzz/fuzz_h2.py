"""Fuzz target: our HTTP/2 connection layer (proxy/l7/h2_connection.py), as server and as client.

The first input byte picks the role (bit 0) and where the rest is cut into two reads; the rest is
what the peer sends (after the client preface, for a server). A minimal driver answers requests,
sends what the windows allow and gives back consumed DATA, so the send and flow-control paths run too.

Properties: `receive_data` returns events or raises ConnectionError_ (after which the connection is
closed and takes nothing more); nothing else escapes. Flow-control windows stay within RFC 9113 §6.9
bounds: no send window above 2^31-1, no receive window below 0 or above what we advertised; DATA
events never carry more bytes than arrived."""

from __future__ import annotations

from proxy.l7 import h2_frames as f
from proxy.l7.h2_codec import MAX_HEADER_LIST_BYTES, client_settings, server_settings
from proxy.l7.h2_connection import (
    ConnectionError_,
    DataReceived,
    H2Connection,
    RequestReceived,
    StreamClosedError,
)

MAX_LEN = 8192
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"fuzz"), (b":path", b"/")]


def _check_windows(conn: H2Connection) -> None:
    assert conn.send_window <= f.MAX_WINDOW, conn.send_window
    assert 0 <= conn.recv_window <= conn.recv_window_target, (conn.recv_window, conn.recv_window_target)
    for stream_id, stream in conn.streams.items():
        assert stream.send_window <= f.MAX_WINDOW, (stream_id, stream.send_window)
        assert 0 <= stream.recv_window <= conn.local_initial_window, (stream_id, stream.recv_window)


def _drive(conn: H2Connection, events: list) -> None:
    for event in events:
        try:
            if isinstance(event, DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, RequestReceived):
                conn.send_headers(event.stream_id, [(b":status", b"200")])
                n = min(conn.local_flow_control_window(event.stream_id), conn.peer_max_frame_size, 100)
                conn.send_data(event.stream_id, b"x" * max(n, 0), end_stream=n >= 0)
        except StreamClosedError:
            pass  # reset later in the same read: the real drivers see the same


def check(data: bytes) -> None:
    if not data:
        return
    client = bool(data[0] & 1)
    settings = client_settings() if client else server_settings()
    conn = H2Connection(client=client, settings=settings, max_header_list_size=MAX_HEADER_LIST_BYTES)
    conn.initiate_connection()
    if client:
        conn.send_headers(1, REQUEST)
    stream = data[1:] if client else f.PREFACE + data[1:]
    cut = data[0] * len(stream) // 256
    received = 0
    for read in (stream[:cut], stream[cut:]):
        try:
            events = conn.receive_data(read)
        except ConnectionError_:
            assert conn.closed, "a connection error leaves the connection open"
            assert conn.receive_data(b"\x00" * 9) == [], "a closed connection still takes frames"
            return
        received += sum(len(e.data) for e in events if isinstance(e, DataReceived))
        assert received <= len(stream), "more DATA out than bytes in"
        _check_windows(conn)
        _drive(conn, events)
        _check_windows(conn)
        assert isinstance(conn.data_to_send(), bytes)
