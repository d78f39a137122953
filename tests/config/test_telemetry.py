"""Istio's Telemetry kind: its tracing settings loaded with precise errors, and resolved for one proxy
at mesh, namespace and workload scope."""

from __future__ import annotations

import pytest

from proxy.config.errors import ConfigError
from proxy.config.load import load_bytes
from proxy.config.telemetry import TracingPolicy
from tests.config.helpers import compile_docs, dump


def telemetry(name: str, namespace: str, spec: dict, api_version: str = "telemetry.istio.io/v1") -> dict:
    return {"apiVersion": api_version, "kind": "Telemetry", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def _error(*docs: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bytes(dump(*docs), "t.yaml")
    return info.value


@pytest.mark.parametrize("api_version", ["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"])
def test_tracing_fields_load(api_version):
    [r] = load_bytes(dump(telemetry("mesh-default", "istio-system", {
        "tracing": [{"providers": [{"name": "zipkin"}], "randomSamplingPercentage": 12.5,
                     "disableSpanReporting": False}]}, api_version)), "t.yaml")
    assert r.obj.spec.tracing[0].random_sampling_percentage == 12.5


@pytest.mark.parametrize(("spec", "path", "message"), [
    ({"metrics": [{"providers": [{"name": "stackdriver"}]}]}, "$.spec.metrics[0].providers[0].name",
     "metrics provider 'stackdriver' is not one triomesh has; it serves 'prometheus' (the admin /stats/prometheus)"),
    ({"metrics": [{"reportingInterval": "5s"}]}, "$.spec.metrics[0].reportingInterval",
     "`reportingInterval` is an Istio TelemetryMetrics field triomesh does not support yet"),
    ({"metrics": [{"overrides": [{"match": {"customMetric": "my_metric"}}]}]},
     "$.spec.metrics[0].overrides[0].match.customMetric",
     "`customMetric` is an Istio MetricSelector field triomesh does not support yet"),
    ({"metrics": [{"overrides": [{"match": {"metric": "REQUEST_COUNTS"}}]}]},
     "$.spec.metrics[0].overrides[0].match.metric", None),
    ({"metrics": [{"overrides": [{"tagOverrides": {"host": {"value": "request.host"}}}]}]},
     "$.spec.metrics[0].overrides[0].tagOverrides.host.value",
     "tag value 'request.host' is not one triomesh evaluates: only a quoted string literal ('text' or \"text\"), "
     "applied when the metrics are served; attribute expressions would cost every request"),
    ({"metrics": [{"overrides": [{"tagOverrides": {"host": {"operation": "UPSERT"}}}]}]},
     "$.spec.metrics[0].overrides[0].tagOverrides.host.value", "UPSERT needs a `value`"),
    ({"accessLogging": [{"providers": [{"name": "otel"}]}]}, "$.spec.accessLogging[0].providers[0].name",
     "access-log provider 'otel' is not one triomesh has; it writes to 'envoy' (Envoy's text format on the "
     "proxy's access log): meshConfig extensionProviders are not configurable"),
    ({"accessLogging": [{"filter": {"expression": "response.code >= '400'"}}]},
     "$.spec.accessLogging[0].filter.expression",
     "filter expression \"response.code >= '400'\" is not one triomesh evaluates: response.code compares with "
     "an integer; found \"'400'\" at offset 17"),
    ({"accessLogging": [{"filter": {"expression": "request.size > 10"}}]},
     "$.spec.accessLogging[0].filter.expression",
     "filter expression 'request.size > 10' is not one triomesh evaluates: unknown attribute 'request.size' "
     "at offset 0; the attributes are: response.code, request.method, request.host, request.path, "
     "request.url_path, xds.cluster_name"),
    ({"accessLogging": [{"match": {"mode": "BOTH"}}]}, "$.spec.accessLogging[0].match.mode",
     "Invalid enum value 'BOTH'; expected one of CLIENT, CLIENT_AND_SERVER, SERVER"),
    ({"targetRef": {"kind": "Gateway", "name": "g"}}, "$.spec.targetRef",
     "`targetRef` is an Istio TelemetrySpec field triomesh does not support yet"),
    ({"tracing": [{"customTags": {"a": {"literal": {"value": "b"}}}}]}, "$.spec.tracing[0].customTags",
     "`customTags` is an Istio TelemetryTracing field triomesh does not support yet"),
    ({"tracing": [{"match": {"mode": "SERVER"}}]}, "$.spec.tracing[0].match",
     "`match` is an Istio TelemetryTracing field triomesh does not support yet"),
    ({"tracing": [{"providers": [{"name": "otel"}]}]}, "$.spec.tracing[0].providers[0].name",
     "tracing provider 'otel' is not one triomesh has; it reports to 'zipkin' (the collector of --zipkin-address)"),
    ({"tracing": [{"randomSamplingPercentage": 101}]}, "$.spec.tracing[0].randomSamplingPercentage",
     "Expected `float` <= 100.0"),
    ({"tracing": [{"randomSamplingPercentag": 1}]}, "$.spec.tracing[0].randomSamplingPercentag",
     "unknown field `randomSamplingPercentag`"),
])
def test_what_is_not_supported_is_refused_by_name(spec, path, message):
    e = _error(telemetry("t", "shop", spec))
    assert (e.file, e.kind, e.name, e.field_path) == ("t.yaml", "Telemetry", "shop/t", path)
    assert message is None or e.message == message


def test_wrong_api_version_is_named():
    e = _error(telemetry("t", "shop", {}, api_version="networking.istio.io/v1"))
    assert e.field_path == "$.apiVersion" and "telemetry.istio.io/v1alpha1" in e.message


MESH = telemetry("mesh-default", "istio-system", {"tracing": [{"randomSamplingPercentage": 10}]})
NAMESPACE = telemetry("shop", "shop", {"tracing": [{"randomSamplingPercentage": 50}]})
WORKLOAD = telemetry("reviews", "shop", {"selector": {"matchLabels": {"app": "reviews"}},
                                         "tracing": [{"disableSpanReporting": True}]})
OTHER_WORKLOAD = telemetry("ratings", "shop", {"selector": {"matchLabels": {"app": "ratings"}},
                                               "tracing": [{"randomSamplingPercentage": 0}]})


@pytest.mark.parametrize(("namespace", "labels", "expected"), [
    ("shop", {"app": "reviews"}, TracingPolicy(50, True, ("istio-system/mesh-default", "shop/shop", "shop/reviews"))),
    ("shop", {"app": "ratings"}, TracingPolicy(0, False, ("istio-system/mesh-default", "shop/shop", "shop/ratings"))),
    ("shop", {"app": "other"}, TracingPolicy(50, False, ("istio-system/mesh-default", "shop/shop"))),
    ("elsewhere", {"app": "reviews"}, TracingPolicy(10, False, ("istio-system/mesh-default",))),
    (None, None, TracingPolicy(10, False, ("istio-system/mesh-default",))),  # a gateway: the mesh's
])
def test_the_most_specific_scope_wins_field_by_field(namespace, labels, expected):
    snapshot = compile_docs(MESH, NAMESPACE, WORKLOAD, OTHER_WORKLOAD, proxy_namespace=namespace, proxy_labels=labels)
    assert snapshot.tracing == expected
    assert snapshot.dump["tracing"]["sources"] == list(expected.sources)


def test_without_telemetry_the_proxy_default_applies():
    assert compile_docs().tracing == TracingPolicy()


def _request(status: int, method: bytes = b"GET", target: bytes = b"/", cluster: str | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(status=status, request=SimpleNamespace(method=method, authority=b"shop", target=target),
                           cluster=SimpleNamespace(name=cluster) if cluster else None)


def test_access_logging_scopes_and_modes():
    from proxy.config.telemetry import AccessLogChoice

    mesh = telemetry("mesh-default", "istio-system", {"accessLogging": [
        {"providers": [{"name": "envoy"}], "filter": {"expression": "response.code >= 400"}}]})
    namespace = telemetry("shop", "shop", {"accessLogging": [{"match": {"mode": "SERVER"}, "disabled": True}]})
    workload = telemetry("reviews", "shop", {"selector": {"matchLabels": {"app": "reviews"}},
                                             "accessLogging": [{"match": {"mode": "SERVER"}, "disabled": False}]})
    other = compile_docs(mesh, namespace, workload, proxy_namespace="shop", proxy_labels={"app": "ratings"})
    policy = other.access_logging
    assert policy.sources == ("istio-system/mesh-default", "shop/shop")
    assert (policy.client.enabled, policy.client.text, policy.client.filter_expression) == (
        True, True, "response.code >= 400")
    assert policy.server.enabled is False
    assert policy.client.logs(_request(503)) and not policy.client.logs(_request(200))
    reviews = compile_docs(mesh, namespace, workload, proxy_namespace="shop", proxy_labels={"app": "reviews"})
    assert reviews.access_logging.server.logs(_request(404)) and not reviews.access_logging.server.logs(_request(200))
    assert reviews.dump["access_logging"]["server"] == {"enabled": True, "filter": "response.code >= 400",
                                                        "provider": "envoy"}
    assert compile_docs(proxy_namespace="shop").access_logging is None
    assert AccessLogChoice().logs(_request(200))


@pytest.mark.parametrize(("expression", "logged", "not_logged"), [
    ("response.code >= 400", _request(500), _request(200)),
    ("response.code == 0 || response.code == 503", _request(0), _request(502)),
    ("request.method != 'GET' && !(response.code < 300)", _request(404, b"POST"), _request(200, b"POST")),
    ('request.url_path.startsWith("/api") && request.path != "/api/health"', _request(200, target=b"/api/x?y=1"),
     _request(200, target=b"/api/health")),
    ("xds.cluster_name == 'PassthroughCluster'", _request(200, cluster="PassthroughCluster"), _request(200)),
])
def test_access_log_filter_expressions(expression, logged, not_logged):
    from proxy.config.access_log_filter import compile_filter

    predicate = compile_filter(expression)
    assert predicate(logged) and not predicate(not_logged)


def test_metrics_overrides_resolve_in_scope_order():
    from proxy.config.telemetry import MetricsRule

    mesh = telemetry("mesh-default", "istio-system", {"metrics": [{"providers": [{"name": "prometheus"}], "overrides": [
        {"match": {"metric": "REQUEST_SIZE"}, "disabled": True},
        {"tagOverrides": {"request_protocol": {"operation": "REMOVE"}}}]}]})
    workload = telemetry("reviews", "shop", {"selector": {"matchLabels": {"app": "reviews"}}, "metrics": [{"overrides": [
        {"match": {"metric": "REQUEST_SIZE", "mode": "SERVER"}, "disabled": False,
         "tagOverrides": {"team": {"value": "'books'"}}}]}]})
    policy = compile_docs(mesh, workload, proxy_namespace="shop", proxy_labels={"app": "reviews"}).metrics
    assert policy.sources == ("istio-system/mesh-default", "shop/reviews")
    assert policy.rules[0] == MetricsRule(frozenset({"istio_request_bytes"}), frozenset({"source", "destination"}),
                                          True)
    assert len(policy.rules[1].metrics) == 10 and policy.rules[1].remove == ("request_protocol",)
    assert policy.rules[2] == MetricsRule(frozenset({"istio_request_bytes"}), frozenset({"destination"}), False,
                                          (), (("team", "books"),))
    assert compile_docs(proxy_namespace="shop").metrics is None
