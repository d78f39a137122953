"""Telemetry `metrics` overrides applied to merged series at exposition: disabled metrics vanish,
removed labels sum the series that become equal, literal upserts set a label, per reporter."""

from __future__ import annotations

from proxy.config.telemetry import MetricsPolicy, MetricsRule
from proxy.stats import Stats, merge, render_prometheus
from proxy.telemetry.metrics_overrides import apply_overrides

BUCKETS = (1.0, 10.0)


def _stats() -> Stats:
    stats = Stats()
    for reporter, protocol, count in (("source", "http", 3), ("source", "grpc", 2), ("destination", "http", 5)):
        labels = (("reporter", reporter), ("request_protocol", protocol), ("response_code", "200"))
        stats.counter_with_labels("istio_requests_total", labels).value += count
        size = stats.histogram("istio_request_bytes", labels, BUCKETS)
        for _ in range(count):
            size.observe(5.0)
    stats.counter("triomesh_downstream_rq_total", response_code="200").value += 10
    return stats


def _rows(policy: MetricsPolicy | None) -> dict:
    return apply_overrides(merge([_stats().export()]), policy)


def test_without_a_policy_nothing_changes():
    merged = merge([_stats().export()])
    assert apply_overrides(merged, None) is merged


def test_removing_a_label_sums_the_series_that_become_equal_histograms_bucket_by_bucket():
    policy = MetricsPolicy((MetricsRule(frozenset({"istio_requests_total", "istio_request_bytes"}),
                                        frozenset({"source"}), None, ("request_protocol",)),))
    rows = _rows(policy)
    source = (("reporter", "source"), ("response_code", "200"))
    destination = (("reporter", "destination"), ("request_protocol", "http"), ("response_code", "200"))
    assert rows[("counter", "istio_requests_total", source)] == 5
    assert rows[("counter", "istio_requests_total", destination)] == 5
    assert rows[("histogram", "istio_request_bytes_bucket", source + (("le", "10"),))] == 5
    assert rows[("histogram", "istio_request_bytes_count", source)] == 5
    assert rows[("counter", "triomesh_downstream_rq_total", (("response_code", "200"),))] == 10
    text = render_prometheus(rows)
    assert 'istio_request_bytes_bucket{reporter="source",response_code="200",le="+Inf"} 5' in text


def test_disabled_then_enabled_again_for_one_side_and_a_literal_upsert():
    policy = MetricsPolicy((
        MetricsRule(frozenset({"istio_request_bytes"}), frozenset({"source", "destination"}), True),
        MetricsRule(frozenset({"istio_request_bytes"}), frozenset({"destination"}), False, (), (("team", "books"),)),
        MetricsRule(frozenset({"istio_requests_total"}), frozenset({"source"}), None, (),
                    (("request_protocol", "any"),)),
    ))
    rows = _rows(policy)
    families = {name for (_, name, labels) in rows if name.startswith("istio_request_bytes")
                for k, v in labels if k == "reporter" and v == "source"}
    assert families == set()  # the client side's size histogram is off
    assert rows[("histogram", "istio_request_bytes_count", (("reporter", "destination"), ("request_protocol", "http"),
                                                           ("response_code", "200"), ("team", "books")))] == 5
    assert rows[("counter", "istio_requests_total", (("reporter", "source"), ("request_protocol", "any"),
                                                     ("response_code", "200")))] == 5


def test_a_real_proxy_serves_its_metrics_reshaped_by_telemetry(tmp_path):
    from tests.runner.harness import Backend, Proxy, free_port, get, mesh_config

    backend = Backend("v1")
    port = free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh_config(port, backend.port, backend.port) + """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_SIZE}
      disabled: true
    - tagOverrides:
        request_protocol: {operation: REMOVE}
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides:
        mesh: {value: "'demo'"}
""")
    proxy = Proxy(config, tmp_path, concurrency=2).start()
    try:
        for i in range(4):
            assert get(port, f"/r{i}")[0] == 200
        requests = proxy.wait_for(lambda: proxy.stats("istio_requests_total"), "istio_requests_total")
        assert sum(requests.values()) == 4
        for labels in requests:
            names = dict(labels)
            assert "request_protocol" not in names and names["mesh"] == "demo" and names["reporter"] == "source"
        assert proxy.stats("istio_request_bytes_count") == {}
        response_sizes = proxy.stats("istio_response_bytes_count")
        assert sum(response_sizes.values()) == 4
        assert all("request_protocol" not in dict(labels) and "mesh" not in dict(labels) for labels in response_sizes)
        assert proxy.config_dump()["config"]["metrics"]["sources"] == ["istio-system/mesh-default"]
    finally:
        proxy.stop()
        backend.close()
