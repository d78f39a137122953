"""Trace context in HTTP headers, sans-IO: read B3 (multi-header and single `b3`) and W3C
`traceparent`/`tracestate` from a downstream request, write them for the upstream request.

Formats (hex is lowercase on the wire we write; we accept either case on read, as Envoy does):
- B3 multi: x-b3-traceid (16 or 32 hex), x-b3-spanid (16 hex), x-b3-parentspanid, x-b3-sampled
  ("1"/"0", also "true"/"false"), x-b3-flags ("1" = debug, which implies sampled).
- B3 single: `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]` or just `b3: {sampling}`,
  sampling one of 0, 1, d (openzipkin/b3-propagation).
- W3C: `traceparent: 00-{32 hex trace id}-{16 hex parent id}-{2 hex flags}`, bit 0 of flags =
  sampled (W3C Trace Context section 3.2); `tracestate` is passed on unchanged.
A header that does not parse is ignored, as if absent: the request starts a new trace, never an error.
"""

from __future__ import annotations

from random import getrandbits

B3_NAMES = (b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags")
# x-client-trace-id (an external client) and x-envoy-force-trace (an internal service) force sampling
FORCING_NAMES = (b"x-client-trace-id", b"x-envoy-force-trace")
TRACE_HEADER_NAMES = frozenset(B3_NAMES + FORCING_NAMES + (b"b3", b"traceparent", b"tracestate"))

_HEX = frozenset(b"0123456789abcdefABCDEF")
_ZERO_IDS = (b"0" * 16, b"0" * 32)


def new_trace_id() -> bytes:
    """128 bits, as Istio configures Envoy (`trace_id_128bit: true`)."""
    return b"%032x" % getrandbits(128)


def new_span_id() -> bytes:
    return b"%016x" % getrandbits(64)


def _hex_id(value: bytes, lengths: tuple[int, ...]) -> bytes | None:
    value = value.strip()
    if len(value) in lengths and _HEX.issuperset(value) and value.lower() not in _ZERO_IDS:
        return value.lower()
    return None


def _b3_sampling(value: bytes) -> bool | None:
    value = value.strip().lower()
    if value in (b"1", b"true", b"d"):
        return True
    if value in (b"0", b"false"):
        return False
    return None


class IncomingTrace:
    """What the downstream request said about its trace. `trace_id`/`span_id` are None when no
    valid context came (a new trace starts); `sampled` is None when no decision came."""

    __slots__ = ("trace_id", "span_id", "sampled", "forced", "b3_single", "w3c", "tracestate")

    def __init__(self) -> None:
        self.trace_id: bytes | None = None
        self.span_id: bytes | None = None
        self.sampled: bool | None = None
        self.forced = False  # x-client-trace-id or x-envoy-force-trace: Envoy's forced sampling
        self.b3_single = False  # the request used `b3`: the upstream request gets it too
        self.w3c = False  # the request used `traceparent`: the upstream request gets it too
        self.tracestate: bytes | None = None


def read_trace_headers(headers: list) -> tuple[IncomingTrace, list]:
    """The request's trace context, and `headers` without the trace headers (they are rewritten)."""
    found: dict[bytes, bytes] = {}
    kept = []
    for pair in headers:
        if pair[0] in TRACE_HEADER_NAMES:
            found.setdefault(pair[0], pair[1])
        else:
            kept.append(pair)
    incoming = IncomingTrace()
    for name in FORCING_NAMES:  # passed on unchanged, as Envoy does
        if name in found:
            incoming.forced = True
            kept.append((name, found[name]))
    tracestate = found.get(b"tracestate")
    # B3 multi-header first, then single, then W3C: Envoy's Zipkin tracer reads B3 and, when
    # absent, W3C (its `trace_context_option: USE_B3_WITH_W3C_PROPAGATION`)
    trace_id = _hex_id(found.get(b"x-b3-traceid", b""), (16, 32))
    span_id = _hex_id(found.get(b"x-b3-spanid", b""), (16,))
    if trace_id is not None and span_id is not None:
        incoming.trace_id, incoming.span_id = trace_id, span_id
    if b"x-b3-flags" in found and found[b"x-b3-flags"].strip() == b"1":
        incoming.sampled = True
    elif b"x-b3-sampled" in found:
        incoming.sampled = _b3_sampling(found[b"x-b3-sampled"])
    single = found.get(b"b3")
    if single is not None:
        _read_b3_single(single, incoming)
    parent = found.get(b"traceparent")
    if parent is not None:
        _read_traceparent(parent, incoming)
        if incoming.w3c and tracestate is not None:
            incoming.tracestate = tracestate
    return incoming, kept


def _read_b3_single(value: bytes, incoming: IncomingTrace) -> None:
    parts = value.strip().split(b"-")
    if len(parts) == 1:  # a bare sampling decision
        decision = _b3_sampling(parts[0])
        if decision is not None:
            incoming.b3_single = True
            if incoming.sampled is None:
                incoming.sampled = decision
        return
    if len(parts) > 4:
        return
    trace_id = _hex_id(parts[0], (16, 32))
    span_id = _hex_id(parts[1], (16,))
    if trace_id is None or span_id is None:
        return
    decision = None
    if len(parts) >= 3:
        decision = _b3_sampling(parts[2])
        if decision is None:
            return
    if len(parts) == 4 and _hex_id(parts[3], (16,)) is None:
        return
    incoming.b3_single = True
    if incoming.trace_id is None:
        incoming.trace_id, incoming.span_id = trace_id, span_id
    if incoming.sampled is None:
        incoming.sampled = decision


def _read_traceparent(value: bytes, incoming: IncomingTrace) -> None:
    parts = value.strip().split(b"-")
    # version 00 has exactly four fields; a later version may append more (W3C section 3.2.4)
    if len(parts) < 4 or len(parts[0]) != 2 or not _HEX.issuperset(parts[0]) or parts[0].lower() == b"ff":
        return
    if parts[0] == b"00" and len(parts) != 4:
        return
    trace_id = _hex_id(parts[1], (32,))
    span_id = _hex_id(parts[2], (16,))
    if trace_id is None or span_id is None or len(parts[3]) != 2 or not _HEX.issuperset(parts[3]):
        return
    incoming.w3c = True
    if incoming.trace_id is None:
        incoming.trace_id, incoming.span_id = trace_id, span_id
        if incoming.sampled is None:
            incoming.sampled = bool(int(parts[3], 16) & 1)


def upstream_trace_headers(incoming: IncomingTrace, trace_id: bytes, span_id: bytes, parent_id: bytes | None,
                           sampled: bool) -> list:
    """The trace headers of the upstream request: B3 multi-header always (as Envoy's Zipkin tracer),
    and `b3` and `traceparent`/`tracestate` when the downstream request used them."""
    flag = b"1" if sampled else b"0"
    out = [(b"x-b3-traceid", trace_id), (b"x-b3-spanid", span_id), (b"x-b3-sampled", flag)]
    if parent_id is not None:
        out.append((b"x-b3-parentspanid", parent_id))
    if incoming.b3_single:
        single = b"%s-%s-%s" % (trace_id, span_id, flag)
        out.append((b"b3", single + b"-" + parent_id if parent_id is not None else single))
    if incoming.w3c:
        w3c_trace_id = trace_id if len(trace_id) == 32 else b"0" * 16 + trace_id
        out.append((b"traceparent", b"00-%s-%s-%s" % (w3c_trace_id, span_id, b"01" if sampled else b"00")))
        if incoming.tracestate is not None:
            out.append((b"tracestate", incoming.tracestate))
    return out
