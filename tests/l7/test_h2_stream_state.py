"""Every stream class sets all of H2StreamState's fields, whether through its __init__ or written out
in its own for speed: a slot added to H2StreamState and missed by a subclass fails here."""

from __future__ import annotations

from proxy.l7.h2_transport import H2StreamState
from proxy.l7.h2_upstream import UpstreamH2Stream


def test_upstream_stream_sets_every_h2_stream_state_field():
    stream = UpstreamH2Stream(None, 7)  # the connection is only stored at construction
    missing = [name for name in H2StreamState.__slots__ if not hasattr(stream, name)]
    assert missing == []
    assert (stream.stream_id, stream.ended, stream.window) == (7, False, None)
