"""Where one worker's Istio request metrics are counted: the native RequestTable when built, else
the identical pure-Python one.

    table = RequestTable(capacity, max_keys, RequestContext)
    table.set_clock(offset, clock=None)   # now = clock() + offset; None: perf_counter() + offset
    table.forget(snapshot)                # drop every remembered key; known requests: this snapshot's
    table.remember(ctx, slot) -> bool     # later requests with ctx's key count in `slot`
    table.record_known(ctx) -> bool       # one call per request: counted, or False (the caller's
                                          # general path decides the slot and calls record)
    table.record(slot, start, request_bytes, response_bytes[, request_messages, response_messages])
    table.histogram(slot, which) -> (counts per bucket, sum)   # which: DURATION, REQUEST_BYTES, RESPONSE_BYTES
    table.messages(slot) -> (request_messages, response_messages)

A request's key is its listener, cluster, endpoint, peer facts (ctx.extra["peer"]) and status, by
the identity of those objects; a request with response flags or gRPC facts (ctx.extra's
"grpc_status", "grpc_messages") has none (record_known returns False). Slot indices are checked
against the capacity on every call.

IMPLEMENTATION says which is in use: "native" (proxy.telemetry._request_metrics_c, built from
native/request_metrics.c at install time) or "pure"; TRIOMESH_PURE_METRICS=1 in the environment
forces "pure".
"""

from __future__ import annotations

import os

__all__ = ["IMPLEMENTATION", "RequestTable", "DURATION", "REQUEST_BYTES", "RESPONSE_BYTES"]

DURATION, REQUEST_BYTES, RESPONSE_BYTES = 0, 1, 2

IMPLEMENTATION: str
if os.environ.get("TRIOMESH_PURE_METRICS", "") not in ("", "0"):
    from ._request_table_py import RequestTable

    IMPLEMENTATION = "pure"
else:
    try:
        from ._request_metrics_c import RequestTable  # type: ignore[no-redef]

        IMPLEMENTATION = "native"
    except ImportError:  # extension not built (e.g. no C compiler at install time)
        from ._request_table_py import RequestTable  # type: ignore[assignment]

        IMPLEMENTATION = "pure"
