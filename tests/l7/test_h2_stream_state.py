"""Every stream class sets all of H2StreamState's fields, whether through its __init__ or written out
in its own for speed: a slot added to H2StreamState and missed by a subclass fails here."""

from __future__ import annotations

from proxy.l7 import h1
from proxy.l7.h2_connection import H2Connection, StreamState
from proxy.l7.h2_server import H2Stream
from proxy.l7.h2_transport import H2StreamState
from proxy.l7.h2_upstream import UpstreamH2Stream


def test_upstream_stream_sets_every_h2_stream_state_and_stream_state_field():
    stream = UpstreamH2Stream(None, 7)  # the connection is only stored at construction
    missing = [name for name in (*H2StreamState.__slots__, *StreamState.__slots__) if not hasattr(stream, name)]
    assert missing == []
    assert (stream.stream_id, stream.ended, stream.window) == (7, False, None)
    fresh = StreamState(0, 0)  # the connection layer's own: the same starting values
    assert [getattr(stream, name) for name in StreamState.__slots__] == \
        [getattr(fresh, name) for name in StreamState.__slots__]


def test_a_stream_the_client_opens_is_kept_in_the_object_it_hands_over():
    client = H2Connection(client=True, settings={}, max_header_list_size=65536)
    client.initiate_connection()
    state = UpstreamH2Stream(None, 1)
    client.send_headers(1, [(b":method", b"HEAD"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
                        False, None, state)
    assert client.streams[1] is state and state.no_body_expected
    assert (state.send_window, state.recv_window) == (client.peer_initial_window, client.local_initial_window)
    client.send_headers(3, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")])
    assert type(client.streams[3]) is StreamState  # without one, the connection layer makes its own


def test_downstream_stream_sets_every_h2_stream_state_field():
    stream = H2Stream(None, 9, h1.FRAMING_NONE, None, False, None, None)  # stored at construction only
    missing = [name for name in H2StreamState.__slots__ if not hasattr(stream, name)]
    assert missing == []
    assert (stream.stream_id, stream.ended, stream.window) == (9, False, None)


def test_downstream_stream_carries_no_connection_layer_state():
    """The connection layer keeps its own StreamState of a stream the client opened: the downstream
    stream has none of its slots (nine dead fields per stream in flight)."""
    stream = H2Stream(None, 9, h1.FRAMING_NONE, None, False, None, None)
    assert not isinstance(stream, StreamState)
    assert [name for name in StreamState.__slots__ if hasattr(stream, name)] == []
    assert isinstance(stream, H2StreamState) and not hasattr(stream, "__dict__")


def test_upstream_stream_has_the_transport_fields_as_its_own_slots():
    assert set(H2StreamState.__slots__) <= set(UpstreamH2Stream.__slots__)
    assert isinstance(UpstreamH2Stream(None, 1), StreamState)
