"""Compiling resources into listeners, route tables and clusters."""

from __future__ import annotations

import json

import pytest

from proxy.config.errors import ConfigError
from tests.config.helpers import compile_docs, doc, head, listener, route_for, service, workload


def _gateway(name="edge", port=8080, hosts=("*",), namespace=None, **server):
    s = {"port": {"number": port, "name": "http", "protocol": "HTTP"}, "hosts": list(hosts), **server}
    return doc("Gateway", name, {"selector": {"istio": "ingressgateway"}, "servers": [s]}, namespace)


def _vs(name, hosts, dest, gateways=None, namespace=None, **http):
    spec = {"hosts": list(hosts), "http": [{"route": [{"destination": {"host": dest}}], **http}]}
    if gateways is not None:
        spec["gateways"] = list(gateways)
    return doc("VirtualService", name, spec, namespace)


def _egress(port=15001, hosts=("*/*",), namespace=None, **kw):
    return doc("Sidecar", "default", {"egress": [{"port": {"number": port, "protocol": "HTTP", "name": "http"}, "hosts": list(hosts), **kw}]}, namespace)


def _cluster(route) -> str:
    return route.destinations[0].cluster if route is not None else None


def test_gateway_listener_and_virtual_host_lookup():
    snap = compile_docs(
        service("shop"), service("api"), workload("shop-1", "shop", 9001), workload("api-1", "api", 9002),
        _gateway(hosts=["shop.example.com", "*.api.example.com", "*"]),
        _vs("shop", ["shop.example.com"], "shop", ["edge"]),
        _vs("api", ["*.api.example.com"], "api", ["edge"]),
    )
    (l,) = snap.listeners
    assert (l.name, l.address, l.port, l.protocol, l.traffic_direction) == ("127.0.0.1_8080", "127.0.0.1", 8080, "HTTP", "OUTBOUND")
    rt = l.route_table
    assert rt.virtual_host_for(b"shop.example.com").name == "shop.example.com"
    assert rt.virtual_host_for(b"SHOP.example.com:8080").name == "shop.example.com"  # case and port
    assert rt.virtual_host_for(b"v1.api.example.com").name == "*.api.example.com"
    assert rt.virtual_host_for(b"api.example.com") is None  # "*.x" does not cover "x"
    assert rt.virtual_host_for(b"other.example.com") is None
    assert _cluster(route_for(snap, "127.0.0.1_8080", head(authority=b"shop.example.com"))) == "outbound|8080||shop"
    assert _cluster(route_for(snap, "127.0.0.1_8080", head(authority=b"eu.api.example.com:8080"))) == "outbound|8080||api"


def test_gateway_server_hosts_filter_virtual_service_hosts():
    snap = compile_docs(
        service("shop"), _gateway(hosts=["*.example.com"]),
        _vs("shop", ["shop.example.com", "shop.other.org"], "shop", ["edge"]),
        _vs("all", ["*"], "shop", ["edge"]),
    )
    rt = snap.listeners[0].route_table
    assert rt.virtual_host_for(b"shop.example.com").name == "shop.example.com"
    assert rt.virtual_host_for(b"shop.other.org") is None
    # "*" intersected with the server's "*.example.com" is "*.example.com"
    assert rt.virtual_host_for(b"x.example.com").name == "*.example.com"
    assert rt.catch_all is None


def test_gateway_binding_by_namespace_and_catch_all():
    snap = compile_docs(
        service("shop", namespace="shop"), workload("w", "shop", 9000, namespace="shop"),
        service("other", namespace="other"),
        _gateway(namespace="istio-system", hosts=["shop/*"]),
        _vs("shop", ["*"], "shop", ["istio-system/edge"], namespace="shop"),
        # bound to the gateway, but the server only admits namespace "shop"
        _vs("other", ["other.example.com"], "other", ["istio-system/edge"], namespace="other"),
    )
    rt = snap.listeners[0].route_table
    assert rt.catch_all is not None
    assert rt.virtual_host_for(b"other.example.com") is rt.catch_all
    assert _cluster(rt.virtual_host_for(b"anything").route_for(head())) == "outbound|8080||shop"


def test_virtual_services_not_naming_the_gateway_stay_off_it():
    snap = compile_docs(service("shop"), _gateway(), _vs("mesh-only", ["shop"], "shop"))
    assert snap.listeners[0].route_table.virtual_host_for(b"shop") is None


def test_routes_are_ordered_first_match_wins():
    vs = doc("VirtualService", "reviews", {"hosts": ["reviews"], "gateways": ["edge"], "http": [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
    ]})
    dr = doc("DestinationRule", "reviews", {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]})
    snap = compile_docs(service("reviews"), dr, vs, _gateway(hosts=["reviews"]))
    jason = route_for(snap, "127.0.0.1_8080", head(authority=b"reviews", headers=[(b"end-user", b"jason")]))
    other = route_for(snap, "127.0.0.1_8080", head(authority=b"reviews"))
    assert _cluster(jason) == "outbound|8080|v2|reviews"
    assert _cluster(other) == "outbound|8080|v1|reviews"
    assert (jason.name, other.virtual_service) == ("default.reviews.0", "default/reviews")


def test_timeout_durations():
    for text, seconds in [("2s", 2.0), ("0.5s", 0.5), ("100ms", 0.1), ("1m30s", 90.0), ("1h", 3600.0)]:
        snap = compile_docs(service("a"), _gateway(), _vs("a", ["*"], "a", ["edge"], timeout=text))
        assert route_for(snap, "127.0.0.1_8080", head()).timeout_s == pytest.approx(seconds), text
    with pytest.raises(ConfigError, match="at least 1ms"):
        compile_docs(service("a"), _gateway(), _vs("a", ["*"], "a", ["edge"], timeout="10us"))


def test_sidecar_egress_routes_mesh_services_by_every_name():
    snap = compile_docs(
        service("preference", namespace="tutorial"), workload("p", "preference", 18082, namespace="tutorial"),
        service("ratings.prod.svc.cluster.local", namespace="prod", name="ratings"),
        _egress(namespace="tutorial"),
    )
    name = "127.0.0.1_15001"
    for authority in (b"preference", b"preference:8080", b"preference.tutorial", b"preference.tutorial.svc.cluster.local:8080"):
        assert _cluster(route_for(snap, name, head(authority=authority))) == "outbound|8080||preference", authority
    # a service of another namespace: not by its bare name, but by name.ns and the FQDN
    assert route_for(snap, name, head(authority=b"ratings")) is None
    assert _cluster(route_for(snap, name, head(authority=b"ratings.prod"))) == "outbound|8080||ratings.prod.svc.cluster.local"
    assert _cluster(route_for(snap, name, head(authority=b"ratings.prod.svc.cluster.local:8080"))) == "outbound|8080||ratings.prod.svc.cluster.local"
    assert route_for(snap, name, head(authority=b"unknown:8080")) is None
    assert listener(snap, name).traffic_direction == "OUTBOUND"


def test_sidecar_egress_host_scopes_and_export_to():
    snap = compile_docs(
        service("a", namespace="ns1"), service("b", namespace="ns2"),
        service("c", namespace="ns2", exportTo=["."]),
        _egress(hosts=["./*", "ns2/b.ns2.svc.cluster.local", "ns2/c.ns2.svc.cluster.local"], namespace="ns1"),
    )
    rt = snap.listeners[0].route_table
    assert rt.virtual_host_for(b"a") is not None
    assert rt.virtual_host_for(b"b.ns2") is not None
    assert rt.virtual_host_for(b"c.ns2") is None  # exported only to its own namespace


def test_mesh_virtual_service_replaces_the_default_route():
    dr = doc("DestinationRule", "rec", {"host": "recommendation", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]})
    vs = doc("VirtualService", "rec", {"hosts": ["recommendation"], "http": [{"route": [{"destination": {"host": "recommendation", "subset": "v2"}}]}]})
    snap = compile_docs(service("recommendation"), dr, vs, _egress())
    r = route_for(snap, "127.0.0.1_15001", head(authority=b"recommendation:8080"))
    assert _cluster(r) == "outbound|8080|v2|recommendation"
    vhosts = {vh["name"] for vh in snap.dump["listeners"][0]["virtual_hosts"]}
    assert vhosts == {"recommendation.default.svc.cluster.local"}


def test_gateway_only_virtual_service_does_not_apply_to_the_mesh():
    snap = compile_docs(service("shop"), _gateway(), _vs("shop", ["shop"], "shop", ["edge"]), _egress())
    assert route_for(snap, "127.0.0.1_15001", head(authority=b"shop")).virtual_service == ""  # default route


def test_mesh_wildcard_host_is_rejected():
    with pytest.raises(ConfigError) as info:
        compile_docs(service("a"), _vs("a", ["*"], "a"))
    assert info.value.field_path == "$.spec.hosts[0]"


def test_multi_port_service_default_routes_and_destination_port():
    multi = service("multi", ports=[{"number": 80, "name": "http", "protocol": "HTTP"}, {"number": 9090, "name": "admin", "protocol": "HTTP"}])
    snap = compile_docs(multi, _egress())
    name = "127.0.0.1_15001"
    assert _cluster(route_for(snap, name, head(authority=b"multi"))) == "outbound|80||multi"
    assert _cluster(route_for(snap, name, head(authority=b"multi:9090"))) == "outbound|9090||multi"
    with pytest.raises(ConfigError) as info:
        compile_docs(multi, _vs("m", ["multi"], "multi"))
    assert info.value.field_path == "$.spec.http[0].route[0].destination.port"
    vs = doc("VirtualService", "m", {"hosts": ["multi"], "http": [{"route": [{"destination": {"host": "multi", "port": {"number": 9090}}}]}]})
    snap = compile_docs(multi, vs, _egress())
    assert _cluster(route_for(snap, name, head(authority=b"multi"))) == "outbound|9090||multi"


def test_endpoint_port_from_ports_map_then_target_port_then_service_port():
    se = doc("ServiceEntry", "s", {
        "hosts": ["s.example"], "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8000}, {"number": 81, "name": "alt", "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1", "ports": {"http": 9000}}, {"address": "127.0.0.2"}],
    })
    snap = compile_docs(se)
    assert [(e.address, e.port) for e in snap.clusters["outbound|80||s.example"].endpoints] == [("127.0.0.1", 9000), ("127.0.0.2", 8000)]
    assert [(e.address, e.port) for e in snap.clusters["outbound|81||s.example"].endpoints] == [("127.0.0.1", 81), ("127.0.0.2", 81)]


def test_workload_entries_are_selected_in_the_service_namespace_only():
    snap = compile_docs(
        service("r", namespace="a"), workload("w1", "r", 9001, namespace="a"), workload("w2", "r", 9002, namespace="b"),
    )
    assert [e.port for e in snap.clusters["outbound|8080||r"].endpoints] == [9001]


def test_endpoint_weights_labels_and_lb_policy():
    se = service("r")
    w = workload("w1", "r", 9001)
    w["spec"]["weight"] = 3
    dr = doc("DestinationRule", "r", {
        "host": "r", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": {"simple": "LEAST_CONN"}}}, {"name": "none", "labels": {"version": "v9"}}],
    })
    snap = compile_docs(se, w, workload("w2", "r", 9002, version="v2"), dr)
    base = snap.clusters["outbound|8080||r"]
    assert base.lb_policy == "RANDOM"
    assert [(e.port, e.weight, dict(e.labels)) for e in base.endpoints] == [(9001, 3, {"app": "r", "version": "v1"}), (9002, 1, {"app": "r", "version": "v2"})]
    assert snap.clusters["outbound|8080|v1|r"].lb_policy == "LEAST_REQUEST"  # Istio treats LEAST_CONN as LEAST_REQUEST
    assert snap.clusters["outbound|8080|none|r"].endpoints == ()


def test_dns_service_without_endpoints_resolves_its_host():
    se = doc("ServiceEntry", "ext", {"hosts": ["localhost"], "resolution": "DNS", "location": "MESH_EXTERNAL", "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}]})
    c = compile_docs(se).clusters["outbound|8080||localhost"]
    assert (c.resolution, [(e.address, e.port) for e in c.endpoints]) == ("DNS", [("localhost", 8080)])


def test_sidecar_ingress_forwards_to_the_default_endpoint():
    sc = doc("Sidecar", "in", {"ingress": [{"port": {"number": 9080, "protocol": "HTTP", "name": "http"}, "defaultEndpoint": "127.0.0.1:8080"}]})
    snap = compile_docs(sc, bind_address="127.0.0.1")
    (l,) = snap.listeners
    assert (l.name, l.traffic_direction) == ("127.0.0.1_9080", "INBOUND")
    r = l.route_table.virtual_host_for(b"whatever:9080").route_for(head())
    assert r.destinations[0].cluster == "inbound|9080||"
    assert [(e.address, e.port) for e in snap.clusters["inbound|9080||"].endpoints] == [("127.0.0.1", 8080)]


def test_proxy_labels_select_gateways_and_sidecars():
    docs = (service("a"), _gateway(), _vs("a", ["*"], "a", ["edge"]), _egress())
    assert len(compile_docs(*docs).listeners) == 2  # labels unknown: everything applies
    assert [l.port for l in compile_docs(*docs, proxy_labels={"istio": "ingressgateway"}).listeners] == [8080, 15001]
    assert [l.port for l in compile_docs(*docs, proxy_labels={"app": "x"}).listeners] == [15001]
    scoped = doc("Sidecar", "default", {"workloadSelector": {"labels": {"app": "x"}}, "egress": [{"port": {"number": 15001, "protocol": "HTTP"}, "hosts": ["*/*"]}]})
    assert compile_docs(service("a"), scoped, proxy_labels={"app": "y"}).listeners == ()


def test_gateway_servers_on_one_port_share_a_listener():
    gw = doc("Gateway", "edge", {"servers": [
        {"port": {"number": 80, "name": "a", "protocol": "HTTP"}, "hosts": ["a.example"]},
        {"port": {"number": 80, "name": "b", "protocol": "HTTP"}, "hosts": ["b.example"]},
    ]})
    snap = compile_docs(service("a"), gw, _vs("a", ["a.example", "b.example"], "a", ["edge"]))
    (l,) = snap.listeners
    assert {vh.name for vh in l.route_table.exact.values()} == {"a.example", "b.example"}


def test_unsupported_listener_protocols():
    gw = doc("Gateway", "edge", {"servers": [{"port": {"number": 53, "name": "dns", "protocol": "UDP"}, "hosts": ["*"]}]})
    with pytest.raises(ConfigError) as info:
        compile_docs(gw)
    assert info.value.field_path == "$.spec.servers[0].port.protocol"
    assert "not supported by triomesh yet" in info.value.message


def test_dump_is_json_and_names_everything():
    snap = compile_docs(service("a"), workload("w", "a", 9000), _gateway(), _vs("a", ["*"], "a", ["edge"], match=[{"uri": {"regex": "/x.*"}}], timeout="1s"))
    text = json.dumps(snap.dump)
    d = json.loads(text)
    assert d["version"] == "t"
    assert d["resources"] == {"ServiceEntry": 1, "WorkloadEntry": 1, "Gateway": 1, "VirtualService": 1}
    (l,) = d["listeners"]
    route = l["virtual_hosts"][0]["routes"][0]
    assert route["match"] == [{"uri": {"regex": "/x.*"}}]
    assert route["timeout_s"] == 1.0
    assert {c["name"] for c in d["clusters"]} == {"outbound|8080||a"}
    assert d["clusters"][0]["endpoints"] == [{"address": "127.0.0.1", "port": 9000, "labels": {"app": "a", "version": "v1"},
                                              "weight": 1, "locality": ""}]


def test_endpoint_locality_is_kept_and_dumped():
    """ServiceEntry endpoints[].locality and WorkloadEntry locality ("region/zone/subzone") reach the
    compiled endpoints and the config dump, subsets included."""
    inline = service("b", resolution="STATIC", workloadSelector=None, endpoints=[
        {"address": "127.0.0.2", "ports": {"http": 9100}, "locality": "us-east1/us-east1-b", "labels": {"v": "1"}},
        {"address": "127.0.0.3", "ports": {"http": 9100}}])
    inline["spec"].pop("workloadSelector")
    selected = workload("w", "a", 9000)
    selected["spec"]["locality"] = "eu-west1/eu-west1-a/rack7"
    rule = doc("DestinationRule", "b", {"host": "b", "subsets": [{"name": "one", "labels": {"v": "1"}}]})
    snap = compile_docs(service("a"), selected, inline, rule)
    assert [e.locality for e in snap.clusters["outbound|8080||a"].endpoints] == ["eu-west1/eu-west1-a/rack7"]
    assert [e.locality for e in snap.clusters["outbound|8080||b"].endpoints] == ["us-east1/us-east1-b", ""]
    assert [e.locality for e in snap.clusters["outbound|8080|one|b"].endpoints] == ["us-east1/us-east1-b"]
    dumped = {c["name"]: [e["locality"] for e in c["endpoints"]] for c in json.loads(json.dumps(snap.dump))["clusters"]}
    assert dumped == {"outbound|8080||a": ["eu-west1/eu-west1-a/rack7"], "outbound|8080||b": ["us-east1/us-east1-b", ""],
                      "outbound|8080|one|b": ["us-east1/us-east1-b"]}


def test_compile_is_pure_and_repeatable():
    docs = (service("a"), workload("w", "a", 9000), _gateway(), _vs("a", ["*"], "a", ["edge"]))
    assert json.dumps(compile_docs(*docs).dump) == json.dumps(compile_docs(*docs).dump)


def test_endpoints_are_hashable_and_read_only():
    snap = compile_docs(service("a"), workload("w1", "a", 9001), workload("w2", "a", 9002))
    eps = snap.clusters["outbound|8080||a"].endpoints
    in_flight = {e: 0 for e in eps}  # the data plane may key state by endpoint
    assert len(in_flight) == 2
    with pytest.raises(TypeError):
        eps[0].labels["version"] = "v9"  # type: ignore[index]


def test_service_addresses_and_outbound_policy_for_captured_traffic():
    vip = service("db.example", addresses=["10.9.0.1", "10.8.0.0/16"], ports=[{"number": 5432, "name": "tcp", "protocol": "TCP"}])
    novip = service("cache.example", ports=[{"number": 6379, "name": "tcp", "protocol": "TCP"}])
    snap = compile_docs(vip, novip)
    assert dict(snap.service_addresses) == {("10.9.0.1", 5432): "db.example", ("*", 6379): "cache.example"}
    assert snap.outbound_traffic_policy == "ALLOW_ANY"  # Istio's default
    sc = doc("Sidecar", "default", {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})
    assert compile_docs(vip, sc).outbound_traffic_policy == "REGISTRY_ONLY"


def test_directory_files_load_in_name_order_and_the_first_mesh_virtual_service_serves(tmp_path):
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_path
    from tests.config.helpers import dump

    dr = doc("DestinationRule", "r", {"host": "r", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]})
    first = doc("VirtualService", "first", {"hosts": ["r"], "http": [{"match": [{"uri": {"prefix": "/a"}}], "route": [{"destination": {"host": "r", "subset": "v2"}}]}]})
    second = doc("VirtualService", "second", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r", "subset": "v1"}}]}]})
    (tmp_path / "b.yaml").write_text(dump(second))
    (tmp_path / "a.yml").write_text(dump(service("r"), dr, first))
    (tmp_path / "c.json").write_text("{}")  # not *.yaml / *.yml: not read
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text("not: [valid")  # not recursive
    resources = load_path(tmp_path)
    assert [(r.file.rsplit("/", 1)[1], r.document, r.name) for r in resources] == [
        ("a.yml", 0, "r"), ("a.yml", 1, "r"), ("a.yml", 2, "first"), ("b.yaml", 0, "second"),
    ]
    snap = compile_resources(resources, version="t")
    assert snap.listeners == ()  # no Gateway, no Sidecar
    snap = compile_docs(service("r"), dr, first, second, _egress())
    assert _cluster(route_for(snap, "127.0.0.1_15001", head(b"/a/x", authority=b"r"))) == "outbound|8080|v2|r"
    # Istio does not merge VirtualServices bound to the mesh: the first for a host (config order) serves
    assert route_for(snap, "127.0.0.1_15001", head(b"/b", authority=b"r")) is None
