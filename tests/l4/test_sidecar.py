"""Capture config and decisions: which listeners a capturing Sidecar yields, and what the sidecar does
with a captured connection given its original destination (pure, from real compiled config)."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.l4.addrs import OrigDstAddr, UpstreamAddr
from proxy.l4.sidecar import (
    L7,
    INBOUND_PASSTHROUGH_CLUSTER,
    PASSTHROUGH_CLUSTER,
    Passthrough,
    Refuse,
    Tcp,
    capture_table,
    decide_inbound,
    decide_outbound,
    inbound_needs_sniff,
    outbound_needs_sniff,
)
from proxy.l4.sniff import Protocol

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  addresses: [10.9.0.1]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP, targetPort: 19080}]
  endpoints:
  - {address: 10.1.0.5, labels: {version: v1}}
  - {address: 10.1.0.6, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.1.0.7}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.1.0.8}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: allowed, namespace: shop}
spec:
  hosts: ["*.allowed.test"]
  resolution: NONE
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache, namespace: shop}
spec:
  hosts: [cache.example.com]
  resolution: DNS
  ports: [{number: 6379, name: redis, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""


def sidecar(mode: str = "REGISTRY_ONLY", capture: str = "IPTABLES", ingress_capture: str = "DEFAULT") -> str:
    return textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: shop}}
        spec:
          outboundTrafficPolicy: {{mode: {mode}}}
          ingress:
          - port: {{number: 9080, name: http, protocol: HTTP}}
            captureMode: {ingress_capture}
            defaultEndpoint: 127.0.0.1:9080
          egress:
          - captureMode: {capture}
            hosts: ["./*"]
        """)


def snapshot(*docs: str):
    resources = []
    for i, doc in enumerate(docs):
        resources.extend(load_bytes(doc.encode(), f"doc{i}.yaml"))
    return compile_resources(resources, version="1")


def test_capture_listeners_and_virtual_listeners() -> None:
    snap = snapshot(SERVICES, sidecar())
    by_name = {l.name: l for l in snap.listeners}
    outbound, inbound = by_name["virtualOutbound"], by_name["virtualInbound"]
    assert (outbound.port, outbound.use_original_dst, outbound.bind_to_port, outbound.traffic_direction) == (
        15001, True, True, "OUTBOUND")
    assert (inbound.port, inbound.use_original_dst, inbound.traffic_direction) == (15006, True, "INBOUND")
    # one virtual listener per HTTP service port (TCP/TLS services have none), plus the captured ingress port
    virtual = sorted(l.name for l in snap.listeners if not l.bind_to_port)
    assert virtual == ["inbound|9080", "outbound|9080|ratings", "outbound|9080|reviews"]
    # the reviews listener carries the VirtualService routes as its catch-all; ratings a default route
    reviews = by_name["outbound|9080|reviews"].route_table.catch_all
    assert [r.name for r in reviews.routes] == ["shop.reviews.0", "shop.reviews.1"]
    ratings = by_name["outbound|9080|ratings"].route_table.catch_all
    assert [d.cluster for r in ratings.routes for d in r.destinations] == ["outbound|9080||ratings"]
    # DEFAULT ingress follows the Sidecar's capture: no bound listener on the app's port
    assert all(l.port != 9080 or not l.bind_to_port for l in snap.listeners)


def test_no_capture_without_iptables_capture_mode() -> None:
    snap = snapshot(SERVICES, sidecar(capture="DEFAULT", ingress_capture="NONE"))
    names = {l.name for l in snap.listeners}
    assert "virtualOutbound" not in names and "virtualInbound" not in names
    assert [l.name for l in snap.listeners] == ["0.0.0.0_9080"]  # NONE ingress keeps its bound listener


def test_outbound_decisions_by_original_destination() -> None:
    table = capture_table(snapshot(SERVICES, sidecar("REGISTRY_ONLY")))
    vip = OrigDstAddr("10.9.0.1", 9080)
    assert outbound_needs_sniff(table, vip)
    assert decide_outbound(table, vip, Protocol.HTTP1) == L7("outbound|9080|reviews")
    # h2c (prior knowledge) on an HTTP port is L7 too; TLS to an HTTP port: the TCP proxy to the same service
    assert decide_outbound(table, vip, Protocol.HTTP2) == L7("outbound|9080|reviews")
    assert decide_outbound(table, vip, Protocol.TLS) == Tcp("outbound|9080||reviews")
    # an endpoint dialled directly (its target port) is recognised too
    assert decide_outbound(table, OrigDstAddr("10.1.0.6", 19080), Protocol.HTTP1) == L7("outbound|9080|reviews")
    assert decide_outbound(table, OrigDstAddr("10.1.0.7", 9080), Protocol.HTTP1) == L7("outbound|9080|ratings")
    # a TCP service needs no sniffing (server-first protocols must not wait)
    db = OrigDstAddr("10.1.0.8", 5432)
    assert not outbound_needs_sniff(table, db)
    assert decide_outbound(table, db, None) == Tcp("outbound|5432||db")
    # a TCP service known by name only (no VIP, DNS endpoints) owns its port, whatever the address
    cache = OrigDstAddr("192.0.2.3", 6379)
    assert not outbound_needs_sniff(table, cache)
    assert decide_outbound(table, cache, None) == Tcp("outbound|6379||cache.example.com")


def test_tls_routed_by_sni_and_refused_otherwise() -> None:
    table = capture_table(snapshot(SERVICES, sidecar("REGISTRY_ONLY")))
    anywhere = OrigDstAddr("192.0.2.1", 443)
    assert outbound_needs_sniff(table, anywhere)
    assert decide_outbound(table, anywhere, Protocol.TLS, "api.example.com") == Tcp("outbound|443||api.example.com")
    assert decide_outbound(table, anywhere, Protocol.TLS, "eu.api.allowed.test") == Tcp("outbound|443||*.allowed.test")
    for sni in ("evil.test", "allowed.test", None):  # "*.x" needs a label before ".x"
        assert isinstance(decide_outbound(table, anywhere, Protocol.TLS, sni), Refuse), sni
    assert isinstance(decide_outbound(table, anywhere, Protocol.HTTP1), Refuse)  # plain HTTP to 443
    relaxed = capture_table(snapshot(SERVICES, sidecar("ALLOW_ANY")))
    assert decide_outbound(relaxed, anywhere, Protocol.TLS, "evil.test") == Passthrough(
        UpstreamAddr("192.0.2.1", 443), PASSTHROUGH_CLUSTER)


def test_unknown_destinations_registry_only_and_allow_any() -> None:
    unknown = OrigDstAddr("192.0.2.9", 9080)  # port shared with services, address unknown
    strict = capture_table(snapshot(SERVICES, sidecar("REGISTRY_ONLY")))
    assert outbound_needs_sniff(strict, unknown)  # HTTP gets a 502, the rest a reset
    assert isinstance(decide_outbound(strict, unknown, Protocol.HTTP1), Refuse)
    assert isinstance(decide_outbound(strict, unknown, Protocol.OPAQUE), Refuse)
    relaxed = capture_table(snapshot(SERVICES, sidecar("ALLOW_ANY")))
    assert not outbound_needs_sniff(relaxed, unknown)
    assert decide_outbound(relaxed, unknown, None) == Passthrough(UpstreamAddr("192.0.2.9", 9080), PASSTHROUGH_CLUSTER)


def test_inbound_decisions() -> None:
    table = capture_table(snapshot(SERVICES, sidecar()))
    declared = OrigDstAddr("10.1.0.5", 9080)
    assert inbound_needs_sniff(table, declared)
    assert decide_inbound(table, declared, Protocol.HTTP1) == L7("inbound|9080")
    assert decide_inbound(table, declared, Protocol.HTTP2) == L7("inbound|9080")
    assert decide_inbound(table, declared, Protocol.OPAQUE) == Tcp("inbound|9080||")
    other = OrigDstAddr("10.1.0.5", 7000)
    assert not inbound_needs_sniff(table, other)
    assert decide_inbound(table, other, None) == Passthrough(
        UpstreamAddr("10.1.0.5", 7000), INBOUND_PASSTHROUGH_CLUSTER, bind_ip="127.0.0.6")


@pytest.mark.parametrize("port", [15001, 15006])
def test_capture_port_taken_by_another_listener_is_an_error(port: int) -> None:
    gateway = textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: gw, namespace: shop}}
        spec:
          servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
        """)
    with pytest.raises(Exception, match=f"capture port {port}"):
        snapshot(SERVICES, sidecar(), gateway)


L4_ROUTES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  addresses: [10.9.0.8]
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints:
  - {address: 10.1.0.8, labels: {version: v1}}
  - {address: 10.1.0.9, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.9.0.0/24]}]
    route:
    - {destination: {host: db, subset: v1}, weight: 90}
    - {destination: {host: db, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: allowed, namespace: shop}
spec:
  hosts: ["*.allowed.test"]
  resolution: NONE
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.shop.internal]
  resolution: STATIC
  ports: [{number: 8443, name: tls, protocol: TLS}]
  endpoints: [{address: 10.1.0.20}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: allowed, namespace: shop}
spec:
  hosts: ["*.allowed.test"]
  tls:
  - match: [{sniHosts: [pay.allowed.test], port: 443}]
    route: [{destination: {host: legacy.shop.internal, port: {number: 8443}}}]
"""


def test_tcp_routes_by_port_and_subnet_with_weights() -> None:
    table = capture_table(snapshot(L4_ROUTES, sidecar()))
    vip = OrigDstAddr("10.9.0.8", 5432)
    assert not outbound_needs_sniff(table, vip)  # tcp routes need no bytes
    assert decide_outbound(table, vip, None, rand_below=lambda n: 0) == Tcp("outbound|5432|v1|db")
    assert decide_outbound(table, vip, None, rand_below=lambda n: 89) == Tcp("outbound|5432|v1|db")
    assert decide_outbound(table, vip, None, rand_below=lambda n: 90) == Tcp("outbound|5432|v2|db")
    # the endpoint dialled directly is outside destinationSubnets: the service's own cluster
    assert decide_outbound(table, OrigDstAddr("10.1.0.9", 5432), None) == Tcp("outbound|5432||db")


def test_tls_routes_by_sni() -> None:
    table = capture_table(snapshot(L4_ROUTES, sidecar()))
    anywhere = OrigDstAddr("192.0.2.1", 443)
    assert decide_outbound(table, anywhere, Protocol.TLS, "pay.allowed.test") == Tcp("outbound|8443||legacy.shop.internal")
    assert decide_outbound(table, anywhere, Protocol.TLS, "api.allowed.test") == Tcp("outbound|443||*.allowed.test")


@pytest.mark.parametrize(
    ("vs", "path", "message"),
    [
        ({"hosts": ["db"], "tls": [{"route": [{"destination": {"host": "db"}}]}]}, "$.spec.tls[0].match",
         "a tls route needs a match with sniHosts"),
        ({"hosts": ["db"], "tls": [{"match": [{"port": 5432}], "route": [{"destination": {"host": "db"}}]}]},
         "$.spec.tls[0].match[0].sniHosts", "a tls match needs at least one sniHosts entry"),
        ({"hosts": ["db"], "tcp": [{"route": [{"destination": {"host": "db", "subset": "v1"}, "weight": 50},
                                               {"destination": {"host": "db", "subset": "v2"}, "weight": 40}]}]},
         "$.spec.tcp[0].route", "total destination weight 90 != 100"),
        ({"hosts": ["db"], "tcp": [{"route": [{"destination": {"host": "nowhere"}}]}]},
         "$.spec.tcp[0].route[0].destination.host", "host 'nowhere' matches no ServiceEntry host"),
        ({"hosts": ["db"], "tcp": [{"match": [{"destinationSubnets": ["10.0.0.0/33"]}],
                                    "route": [{"destination": {"host": "db"}}]}]},
         "$.spec.tcp[0].match[0].destinationSubnets[0]", "'10.0.0.0/33' is not an IP address or CIDR block"),
    ],
)
def test_l4_route_errors_name_the_field(vs: dict, path: str, message: str) -> None:
    import yaml

    bad = yaml.safe_dump({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                          "metadata": {"name": "bad", "namespace": "shop"}, "spec": vs})
    services = L4_ROUTES.split("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db")[0]
    with pytest.raises(Exception) as info:
        snapshot(services, sidecar(), bad)
    assert (info.value.field_path, info.value.message) == (path, message)


def test_egress_hosts_limit_what_captured_traffic_reaches() -> None:
    scoped = sidecar("REGISTRY_ONLY").replace('hosts: ["./*"]', 'hosts: ["./reviews", "*/*.allowed.test"]')
    snap = snapshot(SERVICES, scoped)
    assert snap.captured_hosts == frozenset({"reviews", "*.allowed.test"})
    assert {l.name for l in snap.listeners if l.name.startswith("outbound|")} == {"outbound|9080|reviews"}
    table = capture_table(snap)
    assert decide_outbound(table, OrigDstAddr("10.9.0.1", 9080), Protocol.HTTP1) == L7("outbound|9080|reviews")
    # ratings and db exist in the registry but not for this workload: refused like unknown hosts
    assert isinstance(decide_outbound(table, OrigDstAddr("10.1.0.7", 9080), Protocol.HTTP1), Refuse)
    assert isinstance(decide_outbound(table, OrigDstAddr("10.1.0.8", 5432), Protocol.OPAQUE), Refuse)
    assert decide_outbound(table, OrigDstAddr("192.0.2.1", 443), Protocol.TLS, "a.allowed.test") == Tcp(
        "outbound|443||*.allowed.test")
    assert isinstance(decide_outbound(table, OrigDstAddr("192.0.2.1", 443), Protocol.TLS, "api.example.com"), Refuse)
    # "./*" names every service of the namespace
    assert snapshot(SERVICES, sidecar()).captured_hosts == frozenset(
        {"reviews", "ratings", "db", "api.example.com", "*.allowed.test", "cache.example.com"})
