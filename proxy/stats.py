"""Counters and gauges for one process, exported as Prometheus text and summed across workers.

Hot-path code asks for a metric object once (at compile/connection time) and bumps `.value`; it never
formats names per request. A metric is identified by its name plus a sorted tuple of label pairs.
"""

from __future__ import annotations

from typing import Iterable

LabelPairs = tuple[tuple[str, str], ...]


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


HELP = {
    "triomesh_downstream_rq_total": "Downstream requests completed, by response code.",
    "triomesh_downstream_cx_total": "Downstream connections accepted.",
    "triomesh_downstream_cx_active": "Downstream connections open now.",
    "triomesh_upstream_rq_total": "Upstream requests completed, by cluster and response code.",
    "triomesh_upstream_cx_total": "Upstream connections opened, by cluster.",
    "triomesh_upstream_cx_active": "Upstream connections open now, by cluster.",
    "triomesh_upstream_cx_connect_fail_total": "Upstream connection attempts that failed, by cluster.",
    "triomesh_response_flags_total": "Requests by Envoy-style response flag (UF, UH, NR, ...).",
    "triomesh_config_reloads_total": "Config reloads, by result (applied, rejected).",
    "triomesh_draining": "1 from the moment a drain starts (SIGTERM, /drain_listeners, /quitquitquit).",
    "triomesh_drain_cx_reset_total": "Connections still open at the drain deadline, reset.",
    "triomesh_upstream_rq_retry_total": "Retries sent upstream, by cluster.",
    "triomesh_upstream_rq_retry_success_total": "Requests that succeeded after at least one retry, by cluster.",
    "triomesh_upstream_rq_retry_overflow_total": "Retries not sent because connectionPool.http.maxRetries was reached, by cluster.",
    "triomesh_upstream_rq_timeout_total": "Requests that hit the route timeout, by cluster.",
    "triomesh_upstream_rq_per_try_timeout_total": "Upstream tries that hit retries.perTryTimeout, by cluster.",
    "triomesh_upstream_rq_pending_overflow_total": "Requests answered 503 UO by the connection-pool circuit breaker, by cluster.",
    "triomesh_upstream_rq_overflow_total": "Requests answered 503 UO because http2MaxRequests requests were active, by cluster.",
    "triomesh_outlier_ejections_total": "Hosts ejected by outlier detection, by cluster.",
    "triomesh_outlier_ejections_active": "Hosts ejected now, by cluster.",
    "triomesh_fault_aborts_total": "Requests aborted by fault injection, by cluster.",
    "triomesh_fault_delays_total": "Requests delayed by fault injection, by cluster.",
    "triomesh_mirror_requests_total": "Mirrored requests sent, by mirror cluster.",
    "triomesh_mirror_failed_total": "Mirrored requests that failed or timed out (their responses are discarded anyway), by mirror cluster.",
    "triomesh_mirror_dropped_total": "Mirrors not sent (body over the replay limit, or too many mirrors in flight), by mirror cluster.",
}


class Stats:
    """All metrics of one process. Not thread-safe; one per Trio worker process."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, LabelPairs], Counter] = {}
        self._gauges: dict[tuple[str, LabelPairs], Gauge] = {}

    def counter(self, name: str, **labels: str) -> Counter:
        key = (name, tuple(sorted(labels.items())))
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = Counter()
        return c

    def gauge(self, name: str, **labels: str) -> Gauge:
        key = (name, tuple(sorted(labels.items())))
        g = self._gauges.get(key)
        if g is None:
            g = self._gauges[key] = Gauge()
        return g

    def export(self) -> list[tuple[str, str, LabelPairs, int]]:
        """(kind, name, labels, value) rows; msgspec-encodable, for summing across workers."""
        rows: list[tuple[str, str, LabelPairs, int]] = []
        for (name, labels), c in self._counters.items():
            rows.append(("counter", name, labels, c.value))
        for (name, labels), g in self._gauges.items():
            rows.append(("gauge", name, labels, g.value))
        return rows


def merge(exports: Iterable[Iterable[tuple[str, str, LabelPairs, int]]]) -> dict[tuple[str, str, LabelPairs], int]:
    """Sum rows of several workers' exports (counters and gauges both add up across processes)."""
    total: dict[tuple[str, str, LabelPairs], int] = {}
    for rows in exports:
        for kind, name, labels, value in rows:
            key = (kind, name, tuple(tuple(p) for p in labels))
            total[key] = total.get(key, 0) + value
    return total


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_prometheus(merged: dict[tuple[str, str, LabelPairs], int]) -> str:
    """Prometheus text exposition format 0.0.4."""
    by_name: dict[str, list[tuple[str, LabelPairs, int]]] = {}
    for (kind, name, labels), value in merged.items():
        by_name.setdefault(name, []).append((kind, labels, value))
    out: list[str] = []
    for name in sorted(by_name):
        rows = by_name[name]
        if name in HELP:
            out.append(f"# HELP {name} {HELP[name]}")
        out.append(f"# TYPE {name} {rows[0][0]}")
        for _, labels, value in sorted(rows, key=lambda r: r[1]):
            if labels:
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                out.append(f"{name}{{{inner}}} {value}")
            else:
                out.append(f"{name} {value}")
    return "\n".join(out) + "\n"
