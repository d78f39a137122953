"""The mesh view's arithmetic (controlplane/meshgraph.py): Prometheus text -> edges with rate, 5xx
share, p99 and mTLS over a window; Kiali's choice of the destination reporter; counter resets; layout depth."""

from __future__ import annotations

import math

import pytest

from controlplane.meshgraph import EdgeKey, TelemetryWindow, quantile, summarize

BOUNDS = ("0.5", "1", "5", "10", "25", "50", "100", "+Inf")


def series(reporter: str, source: str, destination: str, service: str, *, ok: int = 0, errors: int = 0,
           mtls: bool = True, latencies_ms: tuple[float, ...] = (), namespace: str = "tutorial") -> str:
    """The rows one proxy renders for one edge: requests by response code, and the duration histogram."""
    common = (f'reporter="{reporter}",source_workload="{source}",source_workload_namespace="{namespace}",'
              f'destination_workload="{destination}",destination_workload_namespace="{namespace}",'
              f'destination_service="{service}",'
              f'connection_security_policy="{"mutual_tls" if mtls else ("none" if reporter == "destination" else "unknown")}"')
    rows = []
    if ok:
        rows.append(f'istio_requests_total{{{common},response_code="200"}} {ok}')
    if errors:
        rows.append(f'istio_requests_total{{{common},response_code="503"}} {errors}')
    for bound in BOUNDS:
        limit = float(bound)
        count = sum(1 for latency in latencies_ms if latency <= limit)
        rows.append(f'istio_request_duration_milliseconds_bucket{{{common},response_code="200",le="{bound}"}} {count}')
    return "\n".join(rows) + "\n"


def test_summarize_sums_codes_and_skips_other_metrics():
    text = ("# TYPE istio_requests_total counter\n"
            + series("destination", "customer-v1", "preference-v1", "preference.tutorial.svc.cluster.local",
                     ok=7, errors=3, latencies_ms=(0.4, 3, 3))
            + 'triomesh_requests_total{listener="x"} 99\nistio_requests_total{reporter="source"} not-a-number\n')
    summary = summarize(text)
    key = ("destination", EdgeKey("customer-v1", "tutorial", "preference-v1", "tutorial",
                                  "preference.tutorial.svc.cluster.local"))
    assert set(summary) == {key}
    counts = summary[key]
    assert (counts.requests, counts.errors, counts.mutual_tls) == (10, 3, 10)
    assert counts.buckets[0.5] == 1 and counts.buckets[5.0] == 3 and counts.buckets[math.inf] == 3


def test_label_values_are_unescaped():
    text = 'istio_requests_total{reporter="destination",source_workload="a\\"b\\\\c",response_code="200"} 1\n'
    [(_, edge)] = summarize(text)
    assert edge.source_workload == 'a"b\\c'


@pytest.mark.parametrize("q, counts, expected", [
    (0.99, {1.0: 0, 5.0: 100, math.inf: 100}, 1.0 + 4.0 * 0.99),  # interpolated in (1, 5]
    (0.5, {1.0: 50, 5.0: 100, math.inf: 100}, 1.0),
    (0.99, {1.0: 10, 5.0: 10, math.inf: 100}, 5.0),  # in +Inf: the highest finite bound
    (0.99, {1.0: 0, math.inf: 0}, None),
    (0.99, {}, None),
])
def test_quantile_as_prometheus(q, counts, expected):
    result = quantile(q, counts)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_window_rates_error_share_p99_and_mtls_from_the_destination_reporter():
    window = TelemetryWindow(window_s=30)
    service = "preference.tutorial.svc.cluster.local"
    for now in (0.0, 5.0):
        window.record("customer-v1", now, summarize(series("source", "customer-v1", "preference-v1", service, ok=5)))
        window.record("preference-v1", now, summarize(series("destination", "customer-v1", "preference-v1", service, ok=5)))
    assert [(edge.request_rate, edge.mtls) for edge in window.graph().edges] == [(0.0, None)]  # two equal scrapes: idle
    # 10 s later: 90 more OK and 10 errors, 99 of them fast (< 1 ms) and one slow
    latencies = (0.8,) * 99 + (40,)
    window.record("customer-v1", 10.0, summarize(series("source", "customer-v1", "preference-v1", service, ok=95, errors=10)))
    window.record("preference-v1", 10.0, summarize(series("destination", "customer-v1", "preference-v1", service,
                                                           ok=95, errors=10, latencies_ms=latencies)))
    graph = window.graph()
    [edge] = graph.edges
    assert (edge.source, edge.destination, edge.destination_service) == ("tutorial/customer-v1", "tutorial/preference-v1", service)
    assert edge.reporter == "destination" and edge.mtls is True
    assert edge.requests == 100 and edge.request_rate == pytest.approx(10.0)
    assert edge.error_rate == pytest.approx(0.1)
    assert edge.p99_ms == pytest.approx(1.0)  # rank 99 of 100 sits at the top of the le=1 bucket
    assert [(n.id, n.depth) for n in graph.nodes] == [("tutorial/customer-v1", 0), ("tutorial/preference-v1", 1)]


def test_source_reporter_fills_in_edges_no_server_sidecar_reports():
    window = TelemetryWindow()
    for now, ok in ((0.0, 0), (5.0, 10)):
        window.record("customer-v1", now, summarize(series("source", "customer-v1", "unknown", "httpbin.org", ok=ok, mtls=False)
                                                   if ok else ""))
    [edge] = window.graph().edges
    assert edge.reporter == "source" and edge.mtls is None and edge.request_rate == pytest.approx(2.0)


def test_plaintext_requests_are_not_mtls_and_rates_add_over_replicas_of_a_workload():
    window = TelemetryWindow()
    service = "recommendation.tutorial.svc.cluster.local"
    for proxy, (before, after), mtls in (("recommendation-a", (0, 20), True), ("recommendation-b", (0, 40), False)):
        window.record(proxy, 0.0, summarize(series("destination", "preference-v1", "recommendation", service, ok=before, mtls=mtls)))
        window.record(proxy, 20.0, summarize(series("destination", "preference-v1", "recommendation", service, ok=after, mtls=mtls)))
    [edge] = window.graph().edges
    assert edge.requests == 60 and edge.request_rate == pytest.approx(3.0)
    assert edge.mtls is False  # a third of the requests arrived in plaintext


def test_a_restarted_proxy_counts_from_zero_and_old_scrapes_leave_the_window():
    window = TelemetryWindow(window_s=30)
    service = "preference.tutorial.svc.cluster.local"
    window.record("p", 0.0, summarize(series("destination", "c", "p", service, ok=500)))
    window.record("p", 10.0, summarize(series("destination", "c", "p", service, ok=20)))  # restarted: 20 new
    assert window.graph().edges[0].requests == 20
    for now in (20.0, 30.0, 40.0, 50.0):
        window.record("p", now, summarize(series("destination", "c", "p", service, ok=20 + int(now))))
    history = window.scrapes["p"]
    assert history[0][0] == 20.0  # the newest scrape at or before now - 30 s is the base
    assert window.graph().edges[0].request_rate == pytest.approx(1.0)
    window.forget("p")
    assert window.graph().edges == []


def test_depth_follows_the_longest_call_chain_and_survives_cycles():
    window = TelemetryWindow()
    rows = "".join(series("destination", source, destination, f"{destination}.svc", ok=1)
                   for source, destination in (("unknown", "customer"), ("customer", "preference"),
                                               ("preference", "recommendation"), ("customer", "recommendation"),
                                               ("recommendation", "customer")))
    window.record("all", 0.0, summarize(rows))
    window.record("all", 1.0, summarize(rows))
    depths = {node.workload: node.depth for node in window.graph().nodes}
    assert depths["unknown"] == 0 and depths["customer"] >= 1
    assert depths["preference"] == depths["customer"] + 1 and depths["recommendation"] == depths["preference"] + 1


def test_a_client_side_series_without_the_server_workload_adds_no_edge_when_the_server_reports_the_call():
    window = TelemetryWindow()
    service = "preference.tutorial.svc.cluster.local"
    for now, ok in ((0.0, 1), (2.0, 5)):
        window.record("customer-v1", now, summarize(series("source", "customer-v1", "unknown", service, ok=ok)))
        window.record("preference-v1", now, summarize(series("destination", "customer-v1", "preference-v1", service, ok=ok)))
    graph = window.graph()
    assert [(edge.source, edge.destination, edge.reporter) for edge in graph.edges] == [
        ("tutorial/customer-v1", "tutorial/preference-v1", "destination")]
    assert [node.id for node in graph.nodes] == ["tutorial/customer-v1", "tutorial/preference-v1"]
