"""What the loader tells a user moving from Istio: removed kinds and fields with their replacement,
kinds not supported yet, the apiVersion in every kind error, tls modes, List errors, and deprecated
fields accepted with Istio's meaning."""

from __future__ import annotations

import pytest

from proxy.config.errors import ConfigError
from proxy.config.load import load_bytes
from tests.config.helpers import compile_docs, doc, dump, service

ROUTE = [{"destination": {"host": "r"}}]


def _error(*docs: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bytes(dump(*docs), "m.yaml")
    return info.value


def _kind(api_version: str, kind: str) -> dict:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x", "namespace": "ns"}, "spec": {}}


@pytest.mark.parametrize(("api_version", "kind", "parts"), [
    ("config.istio.io/v1alpha2", "handler", ["removed in Istio 1.8", "Mixer", "Telemetry"]),
    ("config.istio.io/v1alpha2", "rule", ["removed in Istio 1.8", "Mixer", "AuthorizationPolicy"]),
    ("config.istio.io/v1alpha2", "instance", ["removed in Istio 1.8", "Mixer"]),
    ("config.istio.io/v1alpha2", "attributemanifest", ["removed in Istio 1.8", "Mixer"]),
    ("config.istio.io/v1alpha2", "RouteRule", ["removed in Istio 1.0", "use VirtualService"]),
    ("config.istio.io/v1alpha2", "DestinationPolicy", ["removed in Istio 1.0", "use DestinationRule"]),
    ("config.istio.io/v1alpha2", "EgressRule", ["removed in Istio 1.0", "use ServiceEntry"]),
    ("authentication.istio.io/v1alpha1", "Policy", ["removed in Istio 1.6", "PeerAuthentication", "RequestAuthentication"]),
    ("authentication.istio.io/v1alpha1", "MeshPolicy", ["removed in Istio 1.6", "PeerAuthentication in the root namespace"]),
    ("rbac.istio.io/v1alpha1", "ServiceRole", ["removed in Istio 1.6", "use AuthorizationPolicy"]),
    ("rbac.istio.io/v1alpha1", "ServiceRoleBinding", ["removed in Istio 1.6", "use AuthorizationPolicy"]),
    ("rbac.istio.io/v1alpha1", "ClusterRbacConfig", ["removed in Istio 1.6", "use AuthorizationPolicy"]),
    ("rbac.istio.io/v1alpha1", "RbacConfig", ["removed in Istio 1.6", "use AuthorizationPolicy"]),
])
def test_removed_kinds_say_when_and_what_replaced_them(api_version, kind, parts):
    e = _error(_kind(api_version, kind))
    assert (e.kind, e.name, e.field_path) == (kind, "ns/x", "$.kind")
    assert e.message.startswith(f"{kind} ({api_version}) was removed from Istio: ")
    for part in parts:
        assert part in e.message, e.message


@pytest.mark.parametrize(("api_version", "kind"), [
    ("security.istio.io/v1beta1", "RequestAuthentication"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
    ("networking.istio.io/v1", "WorkloadGroup"),
    ("networking.istio.io/v1beta1", "ProxyConfig"),
    ("extensions.istio.io/v1alpha1", "WasmPlugin"),
])
def test_current_istio_kinds_are_not_supported_yet(api_version, kind):
    e = _error(_kind(api_version, kind))
    assert e.message == f"{kind} ({api_version}) is an Istio kind triomesh does not support yet"


@pytest.mark.parametrize("kind", ["Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute", "ReferenceGrant"])
def test_gateway_api_kinds_are_not_supported_yet(kind):
    # Gateway API `Gateway` is not Istio's Gateway with a wrong apiVersion
    e = _error(_kind("gateway.networking.k8s.io/v1", kind))
    assert e.message == (f"{kind} (gateway.networking.k8s.io/v1) is a Kubernetes Gateway API kind; "
                         "triomesh does not support the Gateway API yet")


def test_a_generic_kind_name_of_another_group_is_just_unknown():
    e = _error(_kind("kyverno.io/v1", "Policy"))
    assert e.message.startswith("unknown kind 'Policy' (apiVersion 'kyverno.io/v1'); triomesh understands Gateway")


def test_kind_errors_show_the_api_version_given():
    e = _error({"kind": "Widget", "metadata": {"name": "w"}})
    assert "unknown kind 'Widget' (apiVersion None)" in e.message
    d = service("r")
    d["apiVersion"] = "networking.istio.io/v2"
    e = _error(d)
    assert (e.field_path, e.message) == (
        "$.apiVersion", "apiVersion 'networking.istio.io/v2' of kind ServiceEntry is not one of networking.istio.io/v1, "
                        "networking.istio.io/v1beta1, networking.istio.io/v1alpha3")


# ---- tls


def _dr(traffic_policy: dict | None = None, subsets: list | None = None) -> dict:
    spec: dict = {"host": "r"}
    if traffic_policy is not None:
        spec["trafficPolicy"] = traffic_policy
    if subsets is not None:
        spec["subsets"] = subsets
    return doc("DestinationRule", "r", spec)


TLS_PLACES = [
    (lambda tls: _dr({"tls": tls}), "$.spec.trafficPolicy.tls"),
    (lambda tls: _dr({"portLevelSettings": [{"port": {"number": 8080}, "tls": tls}]}),
     "$.spec.trafficPolicy.portLevelSettings[0].tls"),
    (lambda tls: _dr(subsets=[{"name": "v1", "labels": {"v": "1"}, "trafficPolicy": {"tls": tls}}]),
     "$.spec.subsets[0].trafficPolicy.tls"),
]


@pytest.mark.parametrize(("make", "path"), TLS_PLACES)
def test_tls_disable_loads_everywhere_istio_has_client_tls(make, path):
    compile_docs(service("r"), make({"mode": "DISABLE"}))
    compile_docs(service("r"), make({}))  # DISABLE is ClientTLSSettings' default mode


@pytest.mark.parametrize(("make", "path"), TLS_PLACES)
def test_istio_mutual_loads_everywhere_and_refuses_certificate_fields(make, path):
    compile_docs(service("r"), make({"mode": "ISTIO_MUTUAL"}))
    with pytest.raises(ConfigError) as info:
        compile_docs(service("r"), make({"mode": "ISTIO_MUTUAL", "clientCertificate": "/etc/cert.pem"}))
    assert info.value.field_path == f"{path}.clientCertificate"
    assert info.value.message.startswith("mode ISTIO_MUTUAL uses the workload certificate")


def test_ca_crl_is_not_supported_yet_and_typos_are_unknown():
    e = _error(_dr({"tls": {"mode": "SIMPLE", "caCrl": "/etc/crl.pem"}}))
    assert (e.field_path, e.message) == (
        "$.spec.trafficPolicy.tls.caCrl", "`caCrl` is an Istio ClientTLSSettings field triomesh does not support yet")
    e = _error(_dr({"tls": {"mode": "DISABLED"}}))
    assert e.message == ("Invalid enum value 'DISABLED'; expected one of DISABLE, ISTIO_MUTUAL, MUTUAL, SIMPLE")
    e = _error(_dr({"tls": {"mood": "DISABLE"}}))
    assert (e.field_path, e.message) == ("$.spec.trafficPolicy.tls.mood", "unknown field `mood`")


# ---- removed and deprecated fields


def test_websocket_upgrade_says_it_was_removed():
    e = _error(doc("VirtualService", "r", {"hosts": ["r"], "http": [{"route": ROUTE, "websocketUpgrade": True}]}))
    assert e.field_path == "$.spec.http[0].websocketUpgrade"
    assert e.message == ("`websocketUpgrade` was removed from Istio's VirtualService (deprecated in Istio 1.0): "
                         "WebSocket upgrades are always allowed; delete the field")


def _route_fault(fault: dict):
    gw = doc("Gateway", "gw", {"servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]})
    vs = doc("VirtualService", "r", {"hosts": ["r"], "gateways": ["gw"], "http": [{"route": ROUTE, "fault": fault}]})
    (listener,) = compile_docs(gw, service("r"), vs).listeners
    (route,) = listener.route_table.virtual_host_for(b"r").routes
    return route.fault


@pytest.mark.parametrize(("fault", "delay_ppm", "abort_ppm"), [
    ({"delay": {"fixedDelay": "1s", "percent": 10}}, 100_000, 0),
    ({"abort": {"httpStatus": 503, "percent": 5}}, 0, 50_000),
    ({"abort": {"httpStatus": 503}}, 0, 0),  # neither form: no request aborted (Istio's documented default)
    # the double `percentage` wins over the deprecated integer, as in Istio
    ({"delay": {"fixedDelay": "1s", "percent": 10, "percentage": {"value": 0.5}},
      "abort": {"httpStatus": 503, "percent": 5, "percentage": {"value": 2.5}}}, 5_000, 25_000),
])
def test_integer_fault_percents_are_accepted_for_delay_and_abort(fault, delay_ppm, abort_ppm):
    f = _route_fault(fault)
    assert (f.delay_ppm, f.abort_ppm) == (delay_ppm, abort_ppm)


def test_integer_fault_percent_is_checked_like_a_percent():
    e = _error(doc("VirtualService", "r", {"hosts": ["r"], "http": [
        {"route": ROUTE, "fault": {"abort": {"httpStatus": 503, "percent": 101}}}]}))
    assert (e.field_path, e.message) == ("$.spec.http[0].fault.abort.percent", "Expected `int` <= 100")


@pytest.mark.parametrize(("outlier", "consecutive_5xx", "gateway"), [
    ({"consecutiveErrors": 3}, 0, 3),  # gateway errors only, the 5xx detector off
    ({"consecutiveErrors": 3, "consecutive5xxErrors": 6}, 6, 3),
    ({"consecutiveErrors": 3, "consecutiveGatewayErrors": 8}, 0, 8),
    ({"consecutiveErrors": 0}, 5, 0),  # 0 is unset in Istio's proto3 int
    ({"interval": "1s"}, 5, 0),  # Envoy's defaults
])
def test_consecutive_errors_maps_as_istio_maps_it(outlier, consecutive_5xx, gateway):
    snap = compile_docs(service("r"), _dr({"outlierDetection": outlier}))
    od = snap.clusters["outbound|8080||r"].outlier
    assert (od.consecutive_5xx, od.consecutive_gateway) == (consecutive_5xx, gateway)


# ---- exported metadata and Lists


def test_server_managed_metadata_and_status_load_but_a_typo_does_not():
    exported = doc("ServiceEntry", "r", service("r")["spec"], "ns", creationTimestamp=None, resourceVersion="9",
                   uid="u-1", generation=2, managedFields=[{"manager": "kubectl"}], ownerReferences=[],
                   finalizers=["x/y"], selfLink="/apis/x", generateName="r-", deletionTimestamp="2024-01-01T00:00:00Z",
                   deletionGracePeriodSeconds=30, labels={"app": "r"},
                   annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    exported["status"] = {"conditions": [{"type": "Reconciled", "status": "True"}]}
    (r,) = load_bytes(dump(exported))
    assert (r.obj.metadata.labels, r.obj.metadata.annotations) == (
        {"app": "r"}, {"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    e = _error(doc("ServiceEntry", "r", service("r")["spec"], "ns", uid="u-1", namepsace="ns"))
    assert (e.field_path, e.message) == ("$.metadata.namepsace", "unknown field `namepsace`")


def _list(*items, **fields) -> dict:
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": list(items), **fields}


def test_list_item_errors_name_the_item_path_and_resource():
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"route": [{"destination": {"hots": "r"}}]}]}, "ns")
    e = _error(service("other"), _list(service("r"), bad))
    assert (e.document, e.kind, e.name, e.field_path) == (1, "VirtualService", "ns/r", "$.items[1].spec.http[0].route[0].destination.hots")
    e = _error(_list(_kind("rbac.istio.io/v1alpha1", "ServiceRole")))
    assert e.field_path == "$.items[0].kind" and "was removed from Istio" in e.message


def test_list_envelope_errors():
    e = _error(_list(apiVersion="networking.istio.io/v1"))
    assert (e.kind, e.field_path, e.message) == ("List", "$.apiVersion", "a List is apiVersion 'v1', got 'networking.istio.io/v1'")
    e = _error({"apiVersion": "v1", "kind": "List", "items": {"a": 1}})
    assert (e.field_path, e.message) == ("$.items", "expected a list of resources, got dict")
    e = _error(_list("just text"))
    assert (e.field_path, e.message) == ("$.items[0]", "expected a mapping (an Istio resource), got str")
    assert load_bytes(dump({"apiVersion": "v1", "kind": "List", "items": []})) == []
