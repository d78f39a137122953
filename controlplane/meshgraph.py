"""The mesh view's arithmetic: proxies' Istio metrics (Prometheus text) -> a service graph whose edges
carry request rate, 5xx share, p99 latency and mTLS over a sliding window. Pure: no IO, no clock.

Theory of operation. The control plane scrapes each proxy's `/stats/prometheus` (controlplane/scraper.py)
and records a `Summary` per scrape: `istio_requests_total` and `istio_request_duration_milliseconds`
summed per (reporter, edge). An edge is source workload -> destination workload, with the destination
service it was called by. Over the window, each proxy's newest summary minus its oldest gives counts;
rates divide by that proxy's own elapsed time (as Prometheus' `rate()` does per series), then sum over
proxies. Like Kiali, an edge's numbers come from the `reporter="destination"` series (the server
sidecar knows the mTLS of the connection and the true workload); `reporter="source"` series fill in
edges no server sidecar reports (a destination outside the mesh). A counter that went down (the proxy
restarted) counts from zero, as Prometheus counts a reset. p99 is Prometheus' `histogram_quantile`
(linear inside the bucket) over the window's bucket counts.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
DEFAULT_WINDOW_S = 30.0
UNKNOWN = "unknown"

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, order=True)
class EdgeKey:
    source_workload: str
    source_namespace: str
    destination_workload: str
    destination_namespace: str
    destination_service: str

    @property
    def source_id(self) -> str:
        return node_id(self.source_namespace, self.source_workload)

    @property
    def destination_id(self) -> str:
        return node_id(self.destination_namespace, self.destination_workload)


def node_id(namespace: str, workload: str) -> str:
    return f"{namespace}/{workload}"


@dataclass
class EdgeCounts:
    """Cumulative counts of one (reporter, edge), summed over the other labels."""

    requests: float = 0.0
    errors: float = 0.0  # response_code 5xx
    mutual_tls: float = 0.0  # connection_security_policy="mutual_tls"
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count (le may be inf)

    def minus(self, older: EdgeCounts | None) -> EdgeCounts:
        """Counts since `older`; when any counter went down the proxy restarted: all of self is new."""
        if older is None or older.requests > self.requests or any(
                older.buckets.get(le, 0.0) > count for le, count in self.buckets.items()):
            return EdgeCounts(self.requests, self.errors, self.mutual_tls, dict(self.buckets))
        return EdgeCounts(self.requests - older.requests, self.errors - older.errors,
                          self.mutual_tls - older.mutual_tls,
                          {le: count - older.buckets.get(le, 0.0) for le, count in self.buckets.items()})

    def add(self, other: EdgeCounts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.mutual_tls += other.mutual_tls
        for le, count in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + count


Summary = dict[tuple[str, EdgeKey], EdgeCounts]  # (reporter, edge) -> counts


def _labels(text: str) -> dict[str, str]:
    return {name: re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value)
            for name, value in _LABEL.findall(text)}


def _edge(labels: dict[str, str]) -> EdgeKey:
    return EdgeKey(labels.get("source_workload", UNKNOWN), labels.get("source_workload_namespace", UNKNOWN),
                   labels.get("destination_workload", UNKNOWN), labels.get("destination_workload_namespace", UNKNOWN),
                   labels.get("destination_service", UNKNOWN))


def summarize(exposition: str) -> Summary:
    """The request counters and duration buckets of one `/stats/prometheus` text, per (reporter, edge).
    Other metrics and malformed lines are skipped (a proxy's text is not ours to refuse)."""
    summary: Summary = {}
    for line in exposition.splitlines():
        if not line.startswith(("istio_requests_total", "istio_request_duration_milliseconds_bucket")):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, label_text, value_text = match.groups()
        try:
            value = float(value_text)
        except ValueError:
            continue
        labels = _labels(label_text or "")
        key = (labels.get("reporter", UNKNOWN), _edge(labels))
        counts = summary.setdefault(key, EdgeCounts())
        if name == REQUESTS:
            counts.requests += value
            if labels.get("response_code", "").startswith("5"):
                counts.errors += value
            if labels.get("connection_security_policy") == "mutual_tls":
                counts.mutual_tls += value
        elif name == DURATION_BUCKET and "le" in labels:
            try:
                le = float(labels["le"])  # float("+Inf") is inf
            except ValueError:
                continue
            counts.buckets[le] = counts.buckets.get(le, 0.0) + value
    return summary


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative `buckets` (le -> count): the bucket holding rank
    q * total, linearly interpolated; in the +Inf bucket, the highest finite bound. None without data."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if math.isinf(bounds[-1]) else None
    if total is None or total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True)
class Edge:
    source: str  # node ids
    destination: str
    destination_service: str
    requests: float  # in the window
    request_rate: float  # per second
    error_rate: float  # 5xx share of the requests, 0..1
    p99_ms: float | None
    mtls: bool | None  # every request over mutual TLS; None: unknown (no server sidecar reported, or idle)
    reporter: str


@dataclass(frozen=True)
class Node:
    id: str
    workload: str
    namespace: str
    depth: int  # call depth from the nodes nothing calls, for a layered layout


@dataclass(frozen=True)
class Graph:
    nodes: list[Node]
    edges: list[Edge]
    window_s: float


@dataclass
class TelemetryWindow:
    """Each proxy's summaries of the last `window_s` seconds (times from the caller's clock)."""

    window_s: float = DEFAULT_WINDOW_S
    scrapes: dict[str, deque[tuple[float, Summary]]] = field(default_factory=dict)

    def record(self, proxy: str, now: float, summary: Summary) -> None:
        history = self.scrapes.setdefault(proxy, deque())
        history.append((now, summary))
        while len(history) > 2 and history[1][0] <= now - self.window_s:
            history.popleft()  # keep one scrape at or before the window's start as its base

    def forget(self, proxy: str) -> None:
        self.scrapes.pop(proxy, None)

    def graph(self) -> Graph:
        totals: dict[tuple[str, EdgeKey], EdgeCounts] = {}
        rates: dict[tuple[str, EdgeKey], float] = {}
        for history in self.scrapes.values():
            if len(history) < 2:
                continue  # one scrape is no rate yet
            (old_time, oldest), (new_time, newest) = history[0], history[-1]
            elapsed = new_time - old_time
            if elapsed <= 0:
                continue
            for key, counts in newest.items():
                delta = counts.minus(oldest.get(key))
                totals.setdefault(key, EdgeCounts()).add(delta)
                rates[key] = rates.get(key, 0.0) + delta.requests / elapsed
        # calls a server sidecar reports, by caller and service: the client side may not know the workload
        reported = {(edge.source_id, edge.destination_service) for reporter, edge in totals if reporter == "destination"}
        totals = {(reporter, edge): counts for (reporter, edge), counts in totals.items()
                  if reporter == "destination" or (reporter == "source" and (edge.source_id, edge.destination_service) not in reported)}
        edges = []
        for (reporter, edge), counts in sorted(totals.items(), key=lambda item: (item[0][1], item[0][0])):
            edges.append(Edge(
                source=edge.source_id, destination=edge.destination_id, destination_service=edge.destination_service,
                requests=counts.requests, request_rate=rates[(reporter, edge)],
                error_rate=counts.errors / counts.requests if counts.requests > 0 else 0.0,
                p99_ms=quantile(0.99, counts.buckets),
                mtls=(counts.mutual_tls >= counts.requests) if reporter == "destination" and counts.requests > 0 else None,
                reporter=reporter))
        return Graph(nodes=_nodes(totals), edges=edges, window_s=self.window_s)


def _nodes(totals: dict[tuple[str, EdgeKey], EdgeCounts]) -> list[Node]:
    names: dict[str, tuple[str, str]] = {}
    calls: dict[str, set[str]] = {}
    for _, edge in totals:
        names[edge.source_id] = (edge.source_workload, edge.source_namespace)
        names[edge.destination_id] = (edge.destination_workload, edge.destination_namespace)
        if edge.source_id != edge.destination_id:
            calls.setdefault(edge.source_id, set()).add(edge.destination_id)
    depths = _call_depths(sorted(names), calls)
    return [Node(id=node, workload=names[node][0], namespace=names[node][1], depth=depths[node]) for node in sorted(names)]


def _call_depths(nodes: list[str], calls: dict[str, set[str]]) -> dict[str, int]:
    """Longest call chain above each node. A depth-first walk from the nodes nothing calls (then from
    any node left, for a mesh that is one cycle) drops the calls that close a cycle; the rest is acyclic."""
    called = {callee for callees in calls.values() for callee in callees}
    state: dict[str, int] = {}  # 1: on the walk's path, 2: done
    forward: list[tuple[str, str]] = []
    order: list[str] = []  # post-order: callees before callers

    def walk(node: str) -> None:
        state[node] = 1
        for callee in sorted(calls.get(node, ())):
            if state.get(callee) == 1:
                continue  # closes a cycle
            forward.append((node, callee))
            if callee not in state:
                walk(callee)
        state[node] = 2
        order.append(node)

    for node in [n for n in nodes if n not in called] + nodes:
        if node not in state:
            walk(node)
    depths = dict.fromkeys(nodes, 0)
    callees_of: dict[str, list[str]] = {}
    for caller, callee in forward:
        callees_of.setdefault(caller, []).append(callee)
    for node in reversed(order):  # callers before callees
        for callee in callees_of.get(node, ()):
            depths[callee] = max(depths[callee], depths[node] + 1)
    return depths
