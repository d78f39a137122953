"""Locality load balancing through the real data plane, real backends on 127.0.0.1: failover to the
next-closest locality when the proxy's own locality fails (outlier detection), and `distribute`."""

from __future__ import annotations

import socket

from tests.integration.traffic_harness import (
    Client,
    TrafficBackend,
    destination_rule,
    doc,
    start,
    virtual_service,
)

HOST = "svc.example.com"
CLUSTER = f"outbound|80||{HOST}"
ZONE1 = {"istio-locality": "us-west.zone1"}


def _service(endpoints: list[tuple[int, str]]) -> dict:
    return doc("ServiceEntry", "svc", {
        "hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}, "locality": loc} for port, loc in endpoints],
    })


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connecting is refused


async def test_failover_to_the_next_closest_locality(nursery):
    same_region = await TrafficBackend("zone2").start(nursery)
    far = await TrafficBackend("us-east").start(nursery)
    local = await TrafficBackend("zone1").start(nursery)
    svc = _service([(local.port, "us-west/zone1"), (same_region.port, "us-west/zone2"), (far.port, "us-east/zone1")])
    dr = destination_rule("svc", HOST, trafficPolicy={"outlierDetection": {"consecutive5xxErrors": 1, "baseEjectionTime": "5m",
                                                                           "maxEjectionPercent": 100}})
    vs = virtual_service("svc", HOST, [{"route": [{"destination": {"host": HOST}}]}])
    proxy = await start(nursery, svc, dr, vs, proxy_labels=ZONE1)
    c = Client(proxy.port)
    assert {(await c.request("/")).body for _ in range(20)} == {b"zone1"}, "the proxy's own locality first"

    # the local endpoint dies: refused connections eject it, and traffic moves to the same region's
    # other zone, never to the other region while that zone is healthy
    svc = _service([(_refused_port(), "us-west/zone1"), (same_region.port, "us-west/zone2"), (far.port, "us-east/zone1")])
    proxy.apply(svc, dr, vs)
    answers = [(await c.request("/")) for _ in range(30)]
    assert {r.status for r in answers} == {200}, "the default retry policy covers the failed connection"
    assert {r.body for r in answers} == {b"zone2"}
    assert far.requests == []
    assert proxy.counter("triomesh_outlier_ejections_total", cluster=CLUSTER) == 1


async def test_distribute_splits_by_locality_weight(nursery):
    zone1 = [await TrafficBackend(f"zone1-{i}").start(nursery) for i in range(2)]
    zone2 = await TrafficBackend("zone2").start(nursery)
    elsewhere = await TrafficBackend("eu").start(nursery)
    svc = _service([(b.port, "us-west/zone1") for b in zone1] + [(zone2.port, "us-west/zone2"), (elsewhere.port, "eu/z")])
    dr = destination_rule("svc", HOST, trafficPolicy={"loadBalancer": {"localityLbSetting": {"distribute": [
        {"from": "us-west/zone1/*", "to": {"us-west/zone1/*": 80, "us-west/zone2/*": 20}}]}}})
    vs = virtual_service("svc", HOST, [{"route": [{"destination": {"host": HOST}}]}])
    proxy = await start(nursery, svc, dr, vs, proxy_labels=ZONE1)
    c = Client(proxy.port)
    bodies = [(await c.request("/")).body for _ in range(400)]
    to_zone1 = sum(b.startswith(b"zone1-") for b in bodies)
    # binomial(400, 0.8): sigma 8; +-60 is 7.5 sigma, never failing by chance
    assert abs(to_zone1 - 320) <= 60, to_zone1
    assert bodies.count(b"zone2") == 400 - to_zone1
    assert elsewhere.requests == [], "a locality no `to` names gets nothing"
