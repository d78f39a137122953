"""Reading and writing trace headers (sans-IO): B3 multi and single, W3C traceparent, malformed input."""

from __future__ import annotations

import pytest

from proxy.tracing.propagation import read_trace_headers, upstream_trace_headers
from proxy.tracing.spans import decide_sampling

TRACE = b"463ac35c9f6413ad48485a3953bb6124"
SPAN = b"a2fb4a1d1a96d312"


def read(*pairs: tuple[bytes, bytes]):
    return read_trace_headers([(b"host", b"x"), *pairs])


def test_b3_multi_header_context_and_decision():
    incoming, kept = read((b"x-b3-traceid", TRACE.upper()), (b"x-b3-spanid", SPAN), (b"x-b3-sampled", b"1"),
                          (b"x-b3-parentspanid", b"0020000000000001"))
    assert (incoming.trace_id, incoming.span_id, incoming.sampled) == (TRACE, SPAN, True)
    assert kept == [(b"host", b"x")]  # trace headers are rewritten, not forwarded as they came


def test_b3_flags_debug_means_sampled():
    incoming, _ = read((b"x-b3-flags", b"1"), (b"x-b3-sampled", b"0"))
    assert incoming.sampled is True and incoming.trace_id is None


@pytest.mark.parametrize("value, sampled, has_context", [
    (b"%s-%s" % (TRACE, SPAN), None, True),
    (b"%s-%s-0" % (TRACE, SPAN), False, True),
    (b"%s-%s-d-%s" % (TRACE[16:], SPAN, SPAN), True, True),
    (b"0", False, False),
    (b"1", True, False),
])
def test_b3_single_header_forms(value, sampled, has_context):
    incoming, _ = read((b"b3", value))
    assert incoming.sampled is sampled and incoming.b3_single
    assert (incoming.trace_id is not None) is has_context


@pytest.mark.parametrize("value", [
    b"", b"nonsense", b"%s-%s-x" % (TRACE, SPAN), b"%s-%s-1-zz" % (TRACE, SPAN), b"%s-%s" % (TRACE[:30], SPAN),
    b"%s-0000000000000000-1" % TRACE, b"a-b-c-d-e",
])
def test_malformed_b3_single_is_ignored(value):
    incoming, _ = read((b"b3", value))
    assert (incoming.trace_id, incoming.sampled, incoming.b3_single) == (None, None, False)


@pytest.mark.parametrize("value, sampled", [
    (b"00-%s-%s-01" % (TRACE, SPAN), True),
    (b"00-%s-%s-00" % (TRACE, SPAN), False),
    (b"01-%s-%s-03-future" % (TRACE, SPAN), True),  # a later version may add fields
])
def test_traceparent(value, sampled):
    incoming, _ = read((b"traceparent", value), (b"tracestate", b"a=b"))
    assert (incoming.trace_id, incoming.span_id, incoming.sampled) == (TRACE, SPAN, sampled)
    assert incoming.w3c and incoming.tracestate == b"a=b"


@pytest.mark.parametrize("value", [
    b"00-%s-%s-01-extra" % (TRACE, SPAN), b"ff-%s-%s-01" % (TRACE, SPAN), b"00-%s-%s-01" % (b"0" * 32, SPAN),
    b"00-%s-%s-01" % (TRACE[:16], SPAN), b"00-%s-%s-1" % (TRACE, SPAN), b"garbage",
])
def test_malformed_traceparent_is_ignored(value):
    incoming, _ = read((b"traceparent", value), (b"tracestate", b"a=b"))
    assert (incoming.trace_id, incoming.sampled, incoming.w3c, incoming.tracestate) == (None, None, False, None)


def test_b3_wins_over_traceparent_and_both_formats_go_on():
    incoming, _ = read((b"x-b3-traceid", TRACE), (b"x-b3-spanid", SPAN),
                       (b"traceparent", b"00-%s-%s-00" % (b"1" * 32, b"2" * 16)))
    # traceparent's flag belongs to the context that lost: no decision came with the B3 one
    assert (incoming.trace_id, incoming.sampled) == (TRACE, None)
    out = dict(upstream_trace_headers(incoming, TRACE[16:], b"3" * 16, SPAN, True))
    assert out[b"traceparent"] == b"00-%s%s-%s-01" % (b"0" * 16, TRACE[16:], b"3" * 16)
    assert out[b"x-b3-parentspanid"] == SPAN and out[b"x-b3-sampled"] == b"1" and b"b3" not in out


def test_sampling_order():
    forced, _ = read((b"x-client-trace-id", b"1"), (b"x-b3-sampled", b"0"))
    assert decide_sampling(forced, 0.0) is True
    forced_internally, kept = read((b"x-envoy-force-trace", b"1"), (b"x-b3-sampled", b"0"))
    assert decide_sampling(forced_internally, 0.0) is True and (b"x-envoy-force-trace", b"1") in kept
    unsampled, _ = read((b"x-b3-sampled", b"0"))
    assert decide_sampling(unsampled, 100.0) is False
    undecided, _ = read()
    assert decide_sampling(undecided, 1.0, draw=lambda: 0.0099) is True
    assert decide_sampling(undecided, 1.0, draw=lambda: 0.01) is False
    assert decide_sampling(undecided, 0.0, draw=lambda: 0.0) is False
