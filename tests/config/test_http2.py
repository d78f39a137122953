"""HTTP/2 and gRPC on the config side: which clusters speak h2c upstream (port protocol, DestinationRule
h2UpgradePolicy with its subset and port overrides), maxConcurrentStreams, HTTP-family listener
protocols (Gateway, Sidecar ingress and egress, captured service ports) and the config dump."""

from __future__ import annotations

import json

import pytest

from proxy.config.compile import captured_outbound_listener
from proxy.config.errors import ConfigError
from proxy.config.istio import is_http_protocol
from proxy.config.validate import main as validate_main
from tests.config.helpers import compile_docs, doc, dump, head, listener, route_for, service, workload

HOST = "reviews"


def _se(*ports: tuple[int, str]) -> dict:
    return doc("ServiceEntry", "reviews", {
        "hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": n, "name": f"p{n}", "protocol": p} for n, p in ports],
        "endpoints": [{"address": "10.0.0.1", "labels": {"version": "v1"}},
                      {"address": "10.0.0.2", "labels": {"version": "v2"}}]})


def _dr(traffic_policy: dict | None = None, subsets: list[dict] | None = None) -> dict:
    spec: dict = {"host": HOST}
    if traffic_policy is not None:
        spec["trafficPolicy"] = traffic_policy
    if subsets is not None:
        spec["subsets"] = subsets
    return doc("DestinationRule", "reviews", spec)


def _pool(**http) -> dict:
    return {"connectionPool": {"http": http}}


def _http2(snap, port: int, subset: str = "") -> bool:
    return snap.clusters[f"outbound|{port}|{subset}|{HOST}"].http2


def test_is_http_protocol():
    assert [p for p in ("HTTP", "HTTP2", "GRPC", "GRPC-WEB") if is_http_protocol(p)] == ["HTTP", "HTTP2", "GRPC", "GRPC-WEB"]
    assert not any(is_http_protocol(p) for p in ("TCP", "TLS", "HTTPS", "HTTP_PROXY", "MONGO", "UDP"))


@pytest.mark.parametrize("protocol", ["HTTP2", "GRPC", "GRPC-WEB", "grpc"])
def test_http2_and_grpc_ports_are_h2_whatever_the_upgrade_policy(protocol):
    snap = compile_docs(_se((9080, protocol)))
    assert _http2(snap, 9080) is True
    snap = compile_docs(_se((9080, protocol)), _dr(_pool(h2UpgradePolicy="DO_NOT_UPGRADE")))
    assert _http2(snap, 9080) is True, "DO_NOT_UPGRADE only declines an upgrade of HTTP/1.1 ports"


@pytest.mark.parametrize("policy, http2", [(None, False), ("DEFAULT", False), ("DO_NOT_UPGRADE", False), ("UPGRADE", True)])
def test_http_port_is_h2_only_with_upgrade(policy, http2):
    docs = [_se((9080, "HTTP"))]
    if policy is not None:
        docs.append(_dr(_pool(h2UpgradePolicy=policy)))
    assert _http2(compile_docs(*docs), 9080) is http2  # DEFAULT: the mesh default, DO_NOT_UPGRADE


def test_non_http_ports_are_never_h2():
    snap = compile_docs(_se((5432, "TCP"), (443, "TLS"), (8443, "HTTPS")), _dr(_pool(h2UpgradePolicy="UPGRADE")))
    assert [_http2(snap, p) for p in (5432, 443, 8443)] == [False, False, False]


def test_subset_policy_overrides_h2_upgrade():
    dr = _dr(_pool(h2UpgradePolicy="UPGRADE", maxConcurrentStreams=50), subsets=[
        {"name": "v1", "labels": {"version": "v1"}},  # no policy: inherits the host's
        {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": _pool(h2UpgradePolicy="DO_NOT_UPGRADE")},
        # a subset connectionPool replaces the host's as a whole: no inherited UPGRADE
        {"name": "tcp", "labels": {"version": "v1"}, "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 3}}}},
        # a subset policy without connectionPool keeps the host's
        {"name": "lb", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
    ])
    snap = compile_docs(_se((9080, "HTTP")), dr)
    assert [_http2(snap, 9080, s) for s in ("", "v1", "v2", "tcp", "lb")] == [True, True, False, False, True]
    pools = {s: snap.clusters[f"outbound|9080|{s}|{HOST}"].connection_pool.max_concurrent_streams
             for s in ("", "v1", "v2", "tcp", "lb")}
    assert pools == {"": 50, "v1": 50, "v2": None, "tcp": None, "lb": 50}


def test_subset_upgrade_over_a_host_default():
    dr = _dr(subsets=[{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": _pool(h2UpgradePolicy="UPGRADE")}])
    snap = compile_docs(_se((9080, "HTTP")), dr)
    assert (_http2(snap, 9080), _http2(snap, 9080, "v1")) == (False, True)


def test_port_level_settings_override_h2_upgrade():
    dr = _dr({**_pool(h2UpgradePolicy="UPGRADE"), "portLevelSettings": [
        {"port": {"number": 9090}, **_pool(h2UpgradePolicy="DO_NOT_UPGRADE")},
        # a port entry replaces connectionPool as a whole, defaults included: no inherited UPGRADE
        {"port": {"number": 9091}, "loadBalancer": {"simple": "RANDOM"}},
    ]}, subsets=[
        {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"portLevelSettings": [
            {"port": {"number": 9090}, **_pool(h2UpgradePolicy="UPGRADE", maxConcurrentStreams=7)}]}},
    ])
    snap = compile_docs(_se((9080, "HTTP"), (9090, "HTTP"), (9091, "HTTP")), dr)
    assert [_http2(snap, p) for p in (9080, 9090, 9091)] == [True, False, False]
    # subset port-level > subset > host port-level > host
    assert [_http2(snap, p, "v1") for p in (9080, 9090, 9091)] == [True, True, False]
    assert snap.clusters[f"outbound|9090|v1|{HOST}"].connection_pool.max_concurrent_streams == 7


def test_max_concurrent_streams_compiles():
    snap = compile_docs(_se((9080, "GRPC")), _dr(_pool(maxConcurrentStreams=128, http2MaxRequests=1000)))
    pool = snap.clusters[f"outbound|9080||{HOST}"].connection_pool
    assert (pool.max_concurrent_streams, pool.max_requests) == (128, 1000)
    zero = compile_docs(_se((9080, "GRPC")), _dr(_pool(maxConcurrentStreams=0)))
    assert zero.clusters[f"outbound|9080||{HOST}"].connection_pool.max_concurrent_streams is None  # Istio: default
    assert compile_docs(_se((9080, "GRPC"))).clusters[f"outbound|9080||{HOST}"].connection_pool.max_concurrent_streams is None


def test_use_client_protocol_is_accepted():
    snap = compile_docs(_se((9080, "HTTP")), _dr(_pool(useClientProtocol=True)))
    assert _http2(snap, 9080) is False


def test_config_dump_shows_http2_and_max_concurrent_streams():
    snap = compile_docs(_se((9080, "HTTP"), (9090, "GRPC")), _dr(_pool(h2UpgradePolicy="UPGRADE", maxConcurrentStreams=64)))
    clusters = {c["name"]: c for c in json.loads(json.dumps(snap.dump))["clusters"]}
    grpc = clusters[f"outbound|9090||{HOST}"]
    assert (grpc["protocol"], grpc["http2"], grpc["connection_pool"]["max_concurrent_streams"]) == ("GRPC", True, 64)
    assert clusters[f"outbound|9080||{HOST}"]["http2"] is True
    plain = json.loads(json.dumps(compile_docs(_se((9080, "HTTP"))).dump))["clusters"][0]
    assert (plain["http2"], plain["connection_pool"]["max_concurrent_streams"]) == (False, None)


# --------------------------------------------------------------------------------------------------
# listeners


def _gateway(*servers: tuple[int, str, str]) -> dict:
    return doc("Gateway", "edge", {"servers": [
        {"port": {"number": n, "name": f"s{i}", "protocol": p}, "hosts": [h]} for i, (n, p, h) in enumerate(servers)]})


def _vs(hosts: list[str], dest: str, gateways: list[str] | None = None) -> dict:
    spec: dict = {"hosts": hosts, "http": [{"route": [{"destination": {"host": dest}}]}]}
    if gateways is not None:
        spec["gateways"] = gateways
    return doc("VirtualService", dest, spec)


@pytest.mark.parametrize("protocol", ["GRPC", "GRPC-WEB", "HTTP2"])
def test_gateway_accepts_http_family_servers(protocol):
    snap = compile_docs(service("shop"), workload("w", "shop", 9001), _gateway((8080, protocol, "*")),
                        _vs(["*"], "shop", ["edge"]))
    (l,) = snap.listeners
    assert (l.name, l.protocol) == ("127.0.0.1_8080", "HTTP"), "served by the HTTP listener (HTTP/1.1 and h2c)"
    assert route_for(snap, l.name, head()).destinations[0].cluster == "outbound|8080||shop"
    assert json.loads(json.dumps(snap.dump))["listeners"][0]["protocol"] == "HTTP"


def test_http_and_grpc_gateway_servers_share_a_port():
    gw = _gateway((8080, "HTTP", "a.example"), (8080, "GRPC", "b.example"))
    snap = compile_docs(service("shop"), gw, _vs(["a.example", "b.example"], "shop", ["edge"]))
    (l,) = snap.listeners
    assert {vh.name for vh in l.route_table.exact.values()} == {"a.example", "b.example"}


@pytest.mark.parametrize("protocol", ["HTTP_PROXY", "UDP"])
def test_gateway_still_refuses_other_protocols(protocol):
    with pytest.raises(ConfigError) as info:
        compile_docs(_gateway((8080, protocol, "*")))
    assert info.value.field_path == "$.spec.servers[0].port.protocol"
    assert info.value.message == f"protocol {protocol} on a Gateway server is not supported by triomesh yet"


@pytest.mark.parametrize("protocol, http2", [("GRPC", True), ("HTTP2", True), ("GRPC-WEB", True), ("HTTP", False)])
def test_sidecar_ingress_http_family(protocol, http2):
    sc = doc("Sidecar", "in", {"ingress": [{"port": {"number": 9080, "protocol": protocol, "name": "p"},
                                            "defaultEndpoint": "127.0.0.1:8080"}]})
    snap = compile_docs(sc)
    (l,) = snap.listeners
    assert (l.name, l.protocol, l.traffic_direction) == ("127.0.0.1_9080", "HTTP", "INBOUND")
    inbound = snap.clusters["inbound|9080||"]
    assert (inbound.protocol, inbound.http2) == (protocol, http2)


def test_sidecar_ingress_refuses_tcp():
    sc = doc("Sidecar", "in", {"ingress": [{"port": {"number": 9080, "protocol": "TCP", "name": "p"},
                                            "defaultEndpoint": "127.0.0.1:8080"}]})
    with pytest.raises(ConfigError) as info:
        compile_docs(sc)
    assert info.value.field_path == "$.spec.ingress[0].port.protocol"


@pytest.mark.parametrize("protocol", ["HTTP2", "GRPC", "GRPC-WEB"])
def test_sidecar_egress_http_family(protocol):
    sc = doc("Sidecar", "default", {"egress": [{"port": {"number": 15001, "protocol": protocol, "name": "p"}, "hosts": ["*/*"]}]})
    snap = compile_docs(service("shop"), sc)
    assert listener(snap, "127.0.0.1_15001").protocol == "HTTP"
    assert route_for(snap, "127.0.0.1_15001", head(authority=b"shop")).destinations[0].cluster == "outbound|8080||shop"


def test_captured_http_family_ports_get_l7_virtual_listeners():
    se = doc("ServiceEntry", "reviews", {
        "hosts": [HOST], "addresses": ["10.9.0.1"], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": n, "name": f"p{n}", "protocol": p} for n, p in (
            (80, "HTTP"), (81, "HTTP2"), (82, "GRPC"), (83, "GRPC-WEB"), (84, "TCP"), (85, "TLS"), (86, "HTTPS"))],
        "endpoints": [{"address": "10.0.0.1"}]})
    sc = doc("Sidecar", "default", {"egress": [{"captureMode": "IPTABLES", "hosts": ["*/*"]}]})
    snap = compile_docs(se, sc)
    names = {l.name for l in snap.listeners}
    l7 = [p for p in range(80, 87) if captured_outbound_listener(p, HOST) in names]
    assert l7 == [80, 81, 82, 83], "HTTP2/GRPC/GRPC-WEB are L7 like HTTP; TCP, TLS, HTTPS stay L4"
    grpc = listener(snap, captured_outbound_listener(82, HOST))
    assert (grpc.protocol, grpc.bind_to_port) == ("HTTP", False)
    assert grpc.route_table.catch_all.routes[0].destinations[0].cluster == f"outbound|82||{HOST}"


def test_validate_accepts_h2_upgrade_and_grpc(tmp_path, capsys):
    vs = doc("VirtualService", "reviews", {"hosts": ["*"], "gateways": ["edge"],
                                           "http": [{"route": [{"destination": {"host": HOST, "port": {"number": 9090}}}]}]})
    f = tmp_path / "h2.yaml"
    f.write_text(dump(_se((9080, "HTTP"), (9090, "GRPC")), _dr(_pool(h2UpgradePolicy="UPGRADE", maxConcurrentStreams=100)),
                      _gateway((8080, "GRPC", "*")), vs))
    assert validate_main([str(f)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("ok: 4 resources (1 ServiceEntry, 1 DestinationRule, 1 Gateway, 1 VirtualService); "
                          "1 listeners, 2 clusters\n", "")
