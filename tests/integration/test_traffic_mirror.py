"""Mirroring (dark launch) through the real data plane: copies with the -shadow host, bodies,
percentages, and a slow or dead mirror that never delays or fails the real request."""

from __future__ import annotations

import socket

import trio

from tests.integration.traffic_harness import (
    Client,
    TrafficBackend,
    destination_rule,
    service_entry,
    start,
    virtual_service,
)

HOST = "svc.example.com"
MIRROR_HOST = "mirror.example.com"
SUBSETS = {"subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}


async def _setup(nursery, route_extra: dict, *, v2: TrafficBackend | None = None):
    v1 = await TrafficBackend("v1").start(nursery)
    if v2 is None:
        v2 = await TrafficBackend("v2").start(nursery)
    se = service_entry(HOST, [(v1, {"version": "v1"}), (v2, {"version": "v2"})])
    vs = virtual_service("svc", HOST, [{"route": [{"destination": {"host": HOST, "subset": "v1"}}],
                                        "mirror": {"host": HOST, "subset": "v2"}, **route_extra}])
    proxy = await start(nursery, se, destination_rule("svc", HOST, **SUBSETS), vs)
    return proxy, v1, v2


async def _until(cond, timeout_s: float = 3.0) -> None:
    with trio.fail_after(timeout_s):
        while not cond():
            await trio.sleep(0.01)


async def test_mirror_copies_request_with_shadow_host_and_body(nursery):
    proxy, v1, v2 = await _setup(nursery, {})
    c = Client(proxy.port)
    r = await c.request("/echo?a=1", method="POST", body=b"payload", host=f"{HOST}:8080")
    assert r.status == 200 and r.json()["backend"] == "v1"
    await _until(lambda: len(v2.requests) == 1)
    copy = v2.requests[0]
    assert copy["headers"]["host"] == f"svc.example.com-shadow:8080"
    assert (copy["method"], copy["target"], copy["body"]) == ("POST", "/echo?a=1", "payload")
    assert copy["headers"]["x-request-id"] == v1.requests[0]["headers"]["x-request-id"]
    # the proxy's peer metadata goes to the mesh-internal service with the copy as with the request
    assert copy["headers"]["x-triomesh-peer"] == v1.requests[0]["headers"]["x-triomesh-peer"]
    cluster = f"outbound|80|v2|{HOST}"
    assert proxy.counter("triomesh_mirror_requests_total", cluster=cluster) == 1
    await _until(lambda: proxy.counter("triomesh_upstream_rq_total", cluster=cluster, response_code="200") == 1)
    assert proxy.counter("triomesh_mirror_failed_total", cluster=cluster) == 0


def _located(entry: dict, location: str) -> dict:
    entry["spec"]["location"] = location
    return entry


async def _mirror_across_locations(nursery, primary_location: str, mirror_location: str):
    """The request to svc.example.com, its copy to mirror.example.com, each a ServiceEntry of its own
    location; returns the request and the copy as their backends saw them."""
    primary = await TrafficBackend("primary").start(nursery)
    mirror = await TrafficBackend("mirror").start(nursery)
    vs = virtual_service("svc", HOST, [{"route": [{"destination": {"host": HOST}}],
                                        "mirror": {"host": MIRROR_HOST}}])
    proxy = await start(nursery, _located(service_entry(HOST, [(primary, {})]), primary_location),
                        _located(service_entry(MIRROR_HOST, [(mirror, {})]), mirror_location), vs)
    r = await Client(proxy.port).request("/echo", method="POST", body=b"payload", host=HOST)
    assert r.status == 200 and r.json()["backend"] == "primary"
    await _until(lambda: len(mirror.requests) == 1)
    return primary.requests[0]["headers"], mirror.requests[0]["headers"]


async def test_mirror_to_an_external_service_gets_no_peer_metadata(nursery):
    """Each copy is decided by its own cluster: our workload's metadata goes to the mesh-internal
    primary, never with the copy to a MESH_EXTERNAL service."""
    request, copy = await _mirror_across_locations(nursery, "MESH_INTERNAL", "MESH_EXTERNAL")
    assert "x-triomesh-peer" in request
    assert "x-triomesh-peer" not in copy


async def test_mirror_to_an_internal_service_behind_an_external_primary_gets_peer_metadata(nursery):
    request, copy = await _mirror_across_locations(nursery, "MESH_EXTERNAL", "MESH_INTERNAL")
    assert "x-triomesh-peer" not in request
    assert "x-triomesh-peer" in copy


async def test_mirror_percentage_within_5_sigma(nursery):
    proxy, v1, v2 = await _setup(nursery, {"mirrorPercentage": {"value": 30.0}})
    c = Client(proxy.port)
    n = 1500
    for _ in range(n):
        await c.request("/")
    await _until(lambda: proxy.plane.mirrors_in_flight == 0)
    # binomial(1500, 0.3): mean 450, sigma 17.7; 5 sigma = 89
    assert abs(len(v2.requests) - 450) < 89
    assert len(v1.requests) == n


async def test_slow_mirror_never_delays_the_request(nursery):
    slow = await TrafficBackend("v2", delay_s=5.0).start(nursery)
    proxy, v1, _ = await _setup(nursery, {}, v2=slow)
    c = Client(proxy.port)
    t0 = trio.current_time()
    for _ in range(20):
        assert (await c.request("/")).body == b"v1"
    assert trio.current_time() - t0 < 1.0
    await _until(lambda: len(slow.requests) == 20)


async def test_dead_mirror_never_fails_the_request(nursery):
    dead = TrafficBackend("v2")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead.port = s.getsockname()[1]
    s.close()
    proxy, v1, _ = await _setup(nursery, {}, v2=dead)
    c = Client(proxy.port)
    assert {(await c.request("/")).status for _ in range(10)} == {200}
    cluster = f"outbound|80|v2|{HOST}"
    await _until(lambda: proxy.counter("triomesh_mirror_failed_total", cluster=cluster) == 10)


async def test_large_bodies_are_not_mirrored(nursery):
    proxy, v1, v2 = await _setup(nursery, {})
    c = Client(proxy.port)
    big = b"y" * (200 * 1024)
    r = await c.request("/echo", method="POST", body=big)
    assert r.status == 200 and len(v1.requests[0]["body"]) == len(big)
    assert proxy.counter("triomesh_mirror_dropped_total", cluster=f"outbound|80|v2|{HOST}") == 1
    await trio.sleep(0.1)
    assert v2.requests == []


async def test_mirrors_pick_like_requests_and_feed_the_outlier_detector(nursery):
    """A mirror picks its endpoint the way a request does (outlier ejections included) and its
    results reach the mirror cluster's outlier detector: a dead mirror endpoint is ejected, and the
    copies go to the live one."""
    v1 = await TrafficBackend("v1").start(nursery)
    live = await TrafficBackend("v2").start(nursery)
    dead = TrafficBackend("v2-dead")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead.port = s.getsockname()[1]
    s.close()
    se = service_entry(HOST, [(v1, {"version": "v1"}), (live, {"version": "v2"}), (dead, {"version": "v2"})])
    vs = virtual_service("svc", HOST, [{"route": [{"destination": {"host": HOST, "subset": "v1"}}],
                                        "mirror": {"host": HOST, "subset": "v2"}}])
    dr = destination_rule("svc", HOST, **SUBSETS, trafficPolicy={"outlierDetection": {
        "consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "30s", "maxEjectionPercent": 100}})
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    for _ in range(40):
        assert (await c.request("/")).status == 200
        await _until(lambda: proxy.plane.mirrors_in_flight == 0)
    cluster = f"outbound|80|v2|{HOST}"
    assert proxy.counter("triomesh_outlier_ejections_total", cluster=cluster) == 1
    failed = proxy.counter("triomesh_mirror_failed_total", cluster=cluster)
    assert failed <= 2, "after the ejection no copy goes to the dead endpoint"
    assert len(live.requests) == 40 - failed
