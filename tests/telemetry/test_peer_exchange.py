"""The TCP peer exchange frame (proxy/telemetry/peer_exchange.py): bytes in, identity out."""

from __future__ import annotations

import pytest

from proxy.telemetry.peer import MAX_HEADER_BYTES, WorkloadIdentity
from proxy.telemetry.peer_exchange import EMPTY_FRAME, MAGIC, PeerExchangeError, decode_frame, encode_frame

FACTS = WorkloadIdentity(namespace="foo", workload="sleep-v1", app="sleep", version="v1", canonical_service="sleep",
                         canonical_revision="v1", cluster="Kubernetes")


def test_a_frame_round_trips_and_leaves_the_app_bytes_after_it():
    frame = encode_frame(FACTS.header_value())
    assert frame.startswith(MAGIC)
    identity, size = decode_frame(frame + b"app bytes")
    assert (identity, size) == (FACTS, len(frame))
    for cut in range(len(frame)):  # any prefix is incomplete, never an error
        assert decode_frame(frame[:cut]) is None


def test_empty_and_malformed_facts_are_unknown_not_errors():
    assert decode_frame(EMPTY_FRAME) == (None, len(EMPTY_FRAME))
    bad = encode_frame(b"app=<script>")  # outside [A-Za-z0-9._-], as for the header
    assert decode_frame(bad) == (None, len(bad))


def test_a_wrong_magic_or_an_oversized_frame_is_refused():
    with pytest.raises(PeerExchangeError, match="magic"):
        decode_frame(b"GET / HTTP/1.1\r\n")
    with pytest.raises(PeerExchangeError, match="magic"):
        decode_frame(b"GE")  # already not the magic
    with pytest.raises(PeerExchangeError, match="exceeds"):
        decode_frame(MAGIC + (MAX_HEADER_BYTES + 1).to_bytes(2, "big"))
    with pytest.raises(ValueError):
        encode_frame(b"a" * (MAX_HEADER_BYTES + 1))
