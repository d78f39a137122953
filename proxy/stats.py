"""Counters, gauges and histograms for one process, exported as Prometheus text and summed across workers.

Hot-path code asks for a metric object once (at compile/connection time) and bumps `.value` (or calls
`Histogram.observe`); it never formats names per request. Counts kept elsewhere (Istio's request
metrics, in a native table: proxy/telemetry/request_table.py) are registered as views
(`histogram_view`, `counter_view`), read only when the stats are exported. A metric is identified by
its name plus a tuple of label pairs (sorted, unless the caller gives them in a fixed order of its own).

A histogram is exported as the rows Prometheus reads (`<name>_bucket{le=...}` cumulative,
`<name>_sum`, `<name>_count`), all of kind "histogram", so summing rows across workers sums the
histograms bucket by bucket.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Iterable

LabelPairs = tuple[tuple[str, str], ...]
Row = tuple[str, str, LabelPairs, "int | float"]


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class HistogramCount:
    """A counter that is a histogram's number of observations (Istio's istio_requests_total counts
    exactly the requests its duration histogram observed): kept once, in the histogram."""

    __slots__ = ("histogram",)

    def __init__(self, histogram: Histogram | HistogramView) -> None:
        self.histogram = histogram

    @property
    def value(self) -> int:
        return sum(self.histogram.counts)


class Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Histogram:
    """Observations counted in buckets with inclusive upper `bounds` (Prometheus' `le`), plus +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bisect_left: a value equal to a bound is in it
        self.sum += value

    def rows(self, name: str, labels: LabelPairs) -> list[Row]:
        return histogram_rows(name, labels, self.bounds, self.counts, self.sum)


class HistogramView:
    """A histogram whose counts are kept elsewhere (e.g. a native table, proxy/telemetry/request_table.py):
    each source returns (counts per bucket, sum), and several sources add up (two owners of one label set)."""

    __slots__ = ("bounds", "sources")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.sources: list[Callable[[], tuple[list[int], float]]] = []

    def read(self) -> tuple[list[int], float]:
        counts = [0] * (len(self.bounds) + 1)
        total = 0.0
        for source in self.sources:
            part, part_sum = source()
            counts = [a + b for a, b in zip(counts, part)]
            total += part_sum
        return counts, total

    @property
    def counts(self) -> list[int]:
        return self.read()[0]

    def rows(self, name: str, labels: LabelPairs) -> list[Row]:
        counts, total = self.read()
        return histogram_rows(name, labels, self.bounds, counts, total)


class CounterView:
    """A counter kept elsewhere: the sum of its sources' values."""

    __slots__ = ("sources",)

    def __init__(self) -> None:
        self.sources: list[Callable[[], int]] = []

    @property
    def value(self) -> int:
        return sum(source() for source in self.sources)


def histogram_rows(name: str, labels: LabelPairs, bounds: tuple[float, ...], counts: list[int],
                   total: float) -> list[Row]:
    out: list[Row] = []
    running = 0
    for bound, count in zip(bounds, counts):
        running += count
        out.append(("histogram", name + "_bucket", labels + (("le", _number(bound)),), running))
    running += counts[-1]
    out.append(("histogram", name + "_bucket", labels + (("le", "+Inf"),), running))
    out.append(("histogram", name + "_sum", labels, total))
    out.append(("histogram", name + "_count", labels, running))
    return out


def _number(value: float) -> str:
    """A bound or sample as Prometheus writes it: integers without a fraction."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


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
        self._counters: dict[tuple[str, LabelPairs], Counter | HistogramCount | CounterView] = {}
        self._gauges: dict[tuple[str, LabelPairs], Gauge] = {}
        self._histograms: dict[tuple[str, LabelPairs], Histogram | HistogramView] = {}

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

    def counter_with_labels(self, name: str, labels: LabelPairs) -> Counter:
        """A counter whose label pairs come in the caller's fixed order (Istio's label order)."""
        key = (name, labels)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = Counter()
        return c

    def counter_of_histogram(self, name: str, labels: LabelPairs, histogram: Histogram | HistogramView) -> HistogramCount:
        """A counter (fixed label order, as counter_with_labels) whose value is `histogram`'s count."""
        key = (name, labels)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = HistogramCount(histogram)
        assert isinstance(c, HistogramCount) and c.histogram is histogram, f"{name} is counted twice"
        return c

    def histogram(self, name: str, labels: LabelPairs, bounds: tuple[float, ...]) -> Histogram:
        key = (name, labels)
        h = self._histograms.get(key)
        if h is None:
            h = self._histograms[key] = Histogram(bounds)
        return h

    def histogram_view(self, name: str, labels: LabelPairs, bounds: tuple[float, ...],
                       source: Callable[[], tuple[list[int], float]]) -> HistogramView:
        """A histogram (fixed label order) whose counts `source` returns; another source for the
        same name and labels adds to it."""
        key = (name, labels)
        h = self._histograms.get(key)
        if h is None:
            h = self._histograms[key] = HistogramView(bounds)
        assert isinstance(h, HistogramView) and h.bounds == bounds, f"{name} is kept twice"
        h.sources.append(source)
        return h

    def counter_view(self, name: str, labels: LabelPairs, source: Callable[[], int]) -> CounterView:
        """A counter (fixed label order) whose value `source` returns; sources add up."""
        key = (name, labels)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = CounterView()
        assert isinstance(c, CounterView), f"{name} is counted twice"
        c.sources.append(source)
        return c

    def export(self) -> list[Row]:
        """(kind, name, labels, value) rows; msgspec-encodable, for summing across workers."""
        rows: list[Row] = []
        for (name, labels), c in self._counters.items():
            rows.append(("counter", name, labels, c.value))
        for (name, labels), g in self._gauges.items():
            rows.append(("gauge", name, labels, g.value))
        for (name, labels), h in self._histograms.items():
            rows += h.rows(name, labels)
        return rows


def merge(exports: Iterable[Iterable[Row]]) -> dict[tuple[str, str, LabelPairs], int | float]:
    """Sum rows of several workers' exports (counters, gauges and histogram rows all add up across
    processes)."""
    total: dict[tuple[str, str, LabelPairs], int | float] = {}
    for rows in exports:
        for kind, name, labels, value in rows:
            key = (kind, name, tuple(tuple(p) for p in labels))
            total[key] = total.get(key, 0) + value
    return total


def cumulative_rows(exports: Iterable[Iterable[Row]]) -> list[Row]:
    """The counters and histograms of several exports summed, gauges left out: what outlives the
    processes that counted it (a restarted worker, a proxy replaced by a hot restart). Gauges
    describe a live process and die with it."""
    return [(kind, name, labels, value) for (kind, name, labels), value in
            merge([row for row in rows if row[0] != "gauge"] for rows in exports).items()]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_family(kind: str, name: str) -> str:
    """The family a merged row belongs to: a histogram's _bucket/_sum/_count rows are one family."""
    if kind == "histogram":
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
    return name


def _histogram_order(row: tuple[str, LabelPairs, int | float], family: str):
    """Within a histogram family: by series (labels without `le`), buckets by bound, then _sum, _count."""
    name, labels, _ = row
    if name.endswith("_bucket"):
        le = labels[-1][1]
        return labels[:-1], 0, float("inf") if le == "+Inf" else float(le)
    return labels, 1 if name.endswith("_sum") else 2, 0.0


def _sample(name: str, labels: LabelPairs, value: int | float) -> str:
    text = str(value) if isinstance(value, int) else _number(value)
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        return f"{name}{{{inner}}} {text}"
    return f"{name} {text}"


def render_prometheus(merged: dict[tuple[str, str, LabelPairs], int | float]) -> str:
    """Prometheus text exposition format 0.0.4."""
    families: dict[str, tuple[str, list[tuple[str, LabelPairs, int | float]]]] = {}
    for (kind, name, labels), value in merged.items():
        family = metric_family(kind, name)
        families.setdefault(family, (kind, []))[1].append((name, labels, value))
    out: list[str] = []
    for family in sorted(families):
        kind, rows = families[family]
        if family in HELP:
            out.append(f"# HELP {family} {HELP[family]}")
        out.append(f"# TYPE {family} {kind}")
        if kind == "histogram":
            rows.sort(key=lambda r: _histogram_order(r, family))
        else:
            rows.sort(key=lambda r: r[1])
        out.extend(_sample(name, labels, value) for name, labels, value in rows)
    return "\n".join(out) + "\n"
