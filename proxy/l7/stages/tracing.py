"""The tracing stage: reads the downstream request's trace context, decides sampling, writes the trace
headers of the upstream request; a sampled request's spans go to the worker's span queue when it ends.

It runs first (a request another stage answers still gets its server span), and
`UpstreamSpanStartStage` last, where the upstream call and so the client span begin. Both are built
only when the proxy has a Zipkin collector; an unsampled request without trace headers costs a scan
of its header names, a random draw and one `x-b3-sampled: 0` header."""

from __future__ import annotations

import time
from operator import itemgetter
from random import random as _random
from typing import TYPE_CHECKING

import structlog

from proxy.tracing.exporter import SpanQueue
from proxy.tracing.propagation import TRACE_HEADER_NAMES, IncomingTrace, new_span_id, new_trace_id, \
    read_trace_headers, upstream_trace_headers
from proxy.tracing.spans import RequestTrace, TracingSettings, decide_sampling

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext
    from proxy.stats import Stats

log = structlog.get_logger("triomesh.tracing")

_NO_TRACE = IncomingTrace()  # shared, never written: a request that brought no trace header
_NOT_SAMPLED = (b"x-b3-sampled", b"0")
_has_no_trace_header = TRACE_HEADER_NAMES.isdisjoint
_name_of = itemgetter(0)


class Tracing:
    """One worker's tracing: its settings and its span queue (exported by `exporter.export_spans`)."""

    __slots__ = ("settings", "queue")

    def __init__(self, settings: TracingSettings, stats: Stats) -> None:
        self.settings = settings
        self.queue = SpanQueue(settings.max_queued_spans, stats)

    def record(self, ctx: RequestContext, trace: RequestTrace) -> None:
        """Queue the spans of a sampled request that ended (never blocks; a full queue drops)."""
        try:
            spans = trace.zipkin_spans(ctx, self.settings, int(time.time() * 1_000_000))
        except Exception:  # noqa: BLE001 - a tracing bug must not cost the request its access log
            log.exception("span building failed", client=ctx.downstream_addr)
            return
        self.queue.push_nowait(spans)


class TracingStage:
    has_response_step = False
    __slots__ = ("tracing", "sampling_percent", "report")

    def __init__(self, tracing: Tracing, sampling_percent: float, report: bool = True) -> None:
        self.tracing = tracing
        self.sampling_percent = sampling_percent
        self.report = report  # False: Telemetry `disableSpanReporting`, decisions still propagate

    def on_request(self, ctx: RequestContext) -> None:
        headers = ctx.request.headers
        if _has_no_trace_header(map(_name_of, headers)):  # the common case, checked in C
            if _random() * 100.0 >= self.sampling_percent:
                # not sampled: only the decision goes on (B3 allows it alone), so the next hop does
                # not sample either; no id is made for a trace no one reports
                headers.append(_NOT_SAMPLED)
                return None
            incoming = _NO_TRACE
        else:
            incoming, kept = read_trace_headers(headers)
            headers[:] = kept
            if not decide_sampling(incoming, self.sampling_percent):
                headers += upstream_trace_headers(incoming, incoming.trace_id or new_trace_id(), new_span_id(),
                                                  incoming.span_id, False)
                return None
        start_wall_us = int(ctx.start_wall * 1_000_000)
        trace = RequestTrace(incoming, start_wall_us, start_wall_us)
        if self.report:
            ctx.scratch()["trace"] = trace
        headers += upstream_trace_headers(incoming, trace.trace_id, trace.client_span_id, trace.server_span_id, True)
        return None


class UpstreamSpanStartStage:
    """The last request stage: a sampled request's client span starts here, as its upstream call does."""

    has_response_step = False
    __slots__ = ()

    def on_request(self, ctx: RequestContext) -> None:
        extra = ctx.extra
        if extra is not None:
            trace = extra.get("trace")
            if trace is not None:
                trace.client_start_wall_us = int(time.time() * 1_000_000)
        return None


UPSTREAM_SPAN_START = UpstreamSpanStartStage()
