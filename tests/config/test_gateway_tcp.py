"""Gateway TCP servers (Istio's tcp-echo at the edge): which VirtualService tcp route a server takes."""

from __future__ import annotations

import json

import pytest

from proxy.config.errors import ConfigError
from tests.config.helpers import compile_docs, doc


def _echo_service(ports=((9000, "TCP"),)) -> dict:
    """A STATIC ServiceEntry with two versions (subsets v1/v2 come from the DestinationRule)."""
    return doc("ServiceEntry", "tcp-echo", {
        "hosts": ["tcp-echo.shop.svc.cluster.local"],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": n, "name": f"tcp-{n}", "protocol": p} for n, p in ports],
        "endpoints": [
            {"address": "127.0.0.1", "ports": {f"tcp-{n}": 19001 for n, _ in ports}, "labels": {"version": "v1"}},
            {"address": "127.0.0.1", "ports": {f"tcp-{n}": 19002 for n, _ in ports}, "labels": {"version": "v2"}},
        ],
    }, "shop")


def _subsets() -> dict:
    return doc("DestinationRule", "tcp-echo", {
        "host": "tcp-echo.shop.svc.cluster.local",
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
    }, "shop")


def _gateway(*servers: tuple[int, str, str], name: str = "edge") -> dict:
    return doc("Gateway", name, {"selector": {"istio": "ingressgateway"}, "servers": [
        {"port": {"number": n, "name": f"s{n}", "protocol": p}, "hosts": [h]} for n, p, h in servers]}, "shop")


def _vs(name: str, tcp: list[dict], hosts=("*",), gateways=("edge",)) -> dict:
    return doc("VirtualService", name, {"hosts": list(hosts), "gateways": list(gateways), "tcp": tcp}, "shop")


def _route(*subset_weights: tuple[str, int], port: int = 9000) -> list[dict]:
    return [{"destination": {"host": "tcp-echo", "port": {"number": port}, "subset": s}, "weight": w}
            for s, w in subset_weights]


def _tcp_listener(snap, port: int = 31400):
    (listener,) = [l for l in snap.listeners if l.port == port]
    assert listener.protocol == "TCP"
    return listener


def test_weighted_tcp_route_on_a_tcp_server():
    snap = compile_docs(_echo_service(), _subsets(), _gateway((31400, "TCP", "*")),
                        _vs("tcp-echo", [{"match": [{"port": 31400}], "route": _route(("v1", 80), ("v2", 20))}]))
    route = _tcp_listener(snap).tcp_route
    assert route.virtual_service == "shop/tcp-echo"
    assert [(d.cluster, d.weight) for d in route.destinations] == [
        ("outbound|9000|v1|tcp-echo.shop.svc.cluster.local", 80),
        ("outbound|9000|v2|tcp-echo.shop.svc.cluster.local", 20),
    ]
    assert route.cumulative_weights == (80, 100)
    picks = [route.pick_cluster(lambda n, v=v: v) for v in (0, 79, 80, 99)]
    assert [p.split("|")[2] for p in picks] == ["v1", "v1", "v2", "v2"]
    (dumped,) = [l for l in json.loads(json.dumps(snap.dump))["listeners"] if l["port"] == 31400]
    assert dumped["protocol"] == "TCP"
    assert dumped["tcp_route"]["virtual_service"] == "shop/tcp-echo"
    assert dumped["tcp_route"]["path"] == "$.spec.tcp[0]"
    assert [d["weight"] for d in dumped["tcp_route"]["destinations"]] == [80, 20]


@pytest.mark.parametrize("protocol", ["TCP", "MONGO", "MYSQL", "REDIS", "tcp"])
def test_opaque_tcp_protocols_are_tcp_servers(protocol):
    snap = compile_docs(_echo_service(), _subsets(), _gateway((31400, protocol, "*")),
                        _vs("tcp-echo", [{"route": _route(("v1", 100))}]))
    assert _tcp_listener(snap).tcp_route.destinations[0].cluster == "outbound|9000|v1|tcp-echo.shop.svc.cluster.local"


def test_first_route_matching_port_and_gateway_wins():
    gw = _gateway((31400, "TCP", "*"), (31401, "TCP", "*"))
    vs = _vs("tcp-echo", [
        {"match": [{"port": 31401}], "route": _route(("v2", 100))},
        {"match": [{"gateways": ["other"]}], "route": _route(("v2", 100))},  # another gateway only
        {"match": [{"port": 31400, "gateways": ["shop/edge"]}], "route": _route(("v1", 100))},
        {"route": _route(("v2", 100))},  # never reached for 31400: the one before it matched
    ])
    other = doc("Gateway", "other", {"servers": [{"port": {"number": 31500, "name": "t", "protocol": "TCP"}, "hosts": ["*"]}]}, "shop")
    snap = compile_docs(_echo_service(), _subsets(), gw, other, vs)
    assert _tcp_listener(snap, 31400).tcp_route.destinations[0].cluster.split("|")[2] == "v1"
    assert _tcp_listener(snap, 31401).tcp_route.destinations[0].cluster.split("|")[2] == "v2"
    # "other" is not in the VirtualService's gateways: its server gets no route
    assert _tcp_listener(snap, 31500).tcp_route is None


def test_source_labels_and_destination_subnets_are_not_consulted_at_a_gateway():
    vs = _vs("tcp-echo", [{"match": [{"port": 31400, "sourceLabels": {"app": "nobody"}, "destinationSubnets": ["10.9.9.0/24"]}],
                           "route": _route(("v2", 100))}])
    snap = compile_docs(_echo_service(), _subsets(), _gateway((31400, "TCP", "*")), vs, proxy_labels={"istio": "ingressgateway"})
    assert _tcp_listener(snap).tcp_route.destinations[0].cluster.split("|")[2] == "v2"


def test_server_hosts_select_the_virtual_service():
    gw = _gateway((31400, "TCP", "echo.example.com"))
    snap = compile_docs(_echo_service(), _subsets(), gw,
                        _vs("elsewhere", [{"route": _route(("v2", 100))}], hosts=("other.example.com",)),
                        _vs("echo", [{"route": _route(("v1", 100))}], hosts=("*.example.com",)))
    assert _tcp_listener(snap).tcp_route.virtual_service == "shop/echo"


def test_tcp_server_without_a_route_has_a_listener_that_closes_connections():
    snap = compile_docs(_echo_service(), _gateway((31400, "TCP", "*")))
    listener = _tcp_listener(snap)
    assert listener.tcp_route is None
    (dumped,) = snap.dump["listeners"]
    assert dumped["tcp_route"] is None


def test_http_routes_do_not_serve_a_tcp_server():
    http_only = doc("VirtualService", "web", {"hosts": ["*"], "gateways": ["edge"],
                                              "http": [{"route": [{"destination": {"host": "tcp-echo", "port": {"number": 9000}}}]}]}, "shop")
    snap = compile_docs(_echo_service(), _gateway((31400, "TCP", "*")), http_only)
    assert _tcp_listener(snap).tcp_route is None


def test_mesh_tcp_routes_are_unchanged_by_gateway_binding():
    """A VirtualService bound to the gateway only gives sidecars no tcp routes (and the reverse)."""
    snap = compile_docs(_echo_service(), _subsets(), _gateway((31400, "TCP", "*")),
                        _vs("tcp-echo", [{"route": _route(("v1", 100))}]))
    assert snap.l4_routes == {}


def test_tcp_and_http_servers_on_one_port_conflict():
    with pytest.raises(ConfigError) as info:
        compile_docs(_echo_service(), _gateway((31400, "HTTP", "*"), (31400, "TCP", "*")))
    assert info.value.field_path == "$.spec.servers[1].port.number"
    assert info.value.message == ("127.0.0.1:31400 is already a HTTP listener of Gateway shop/edge; "
                                  "a TCP server cannot share its port")


def test_two_tcp_servers_on_one_port_conflict():
    with pytest.raises(ConfigError) as info:
        compile_docs(_echo_service(), _gateway((31400, "TCP", "a.example"), (31400, "TCP", "b.example")))
    assert info.value.field_path == "$.spec.servers[1].port.number"
    assert info.value.message == ("127.0.0.1:31400 is already the TCP server of Gateway shop/edge (one TCP server "
                                  "per port: connections carry no host to tell them apart)")


def test_tcp_route_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        compile_docs(_echo_service(), _subsets(), _gateway((31400, "TCP", "*")),
                     _vs("tcp-echo", [{"route": _route(("v1", 80), ("v3", 20))}]))
    assert info.value.field_path == "$.spec.tcp[0].route[1].destination.subset"
    with pytest.raises(ConfigError) as info:
        compile_docs(_echo_service(), _subsets(), _gateway((31400, "TCP", "*")),
                     _vs("tcp-echo", [{"route": _route(("v1", 80), ("v2", 10))}]))
    assert (info.value.field_path, info.value.message) == ("$.spec.tcp[0].route", "total destination weight 90 != 100")
