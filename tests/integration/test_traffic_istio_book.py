"""The combined resilience scenario of the classic Istio tutorial ("Introducing Istio Service Mesh",
recommendation service): three recommendation endpoints, one of which answers 503 to everything.
With retries, outlier detection and a connection-pool circuit breaker configured, 1,000 client
requests (5 concurrent clients) see no error, and the stats show the misbehaving host ejected."""

from __future__ import annotations

import trio
import yaml

from proxy.stats import merge, render_prometheus

from tests.integration.traffic_harness import Client, TrafficBackend, start

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: recommendation, namespace: tutorial}
spec:
  hosts: [recommendation]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 127.0.0.1, ports: {http: PORT_V1}, labels: {app: recommendation, version: v1}}
  - {address: 127.0.0.1, ports: {http: PORT_V2}, labels: {app: recommendation, version: v2}}
  - {address: 127.0.0.1, ports: {http: PORT_V2_BAD}, labels: {app: recommendation, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: recommendation, namespace: tutorial}
spec:
  host: recommendation
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10}
      http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 5s
      baseEjectionTime: 15m
      maxEjectionPercent: 100
  subsets:
  - {name: version-v1, labels: {version: v1}}
  - {name: version-v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: recommendation, namespace: tutorial}
spec:
  hosts: [recommendation]
  gateways: [default/gw]
  http:
  - route:
    - destination: {host: recommendation}
    retries:
      attempts: 3
      perTryTimeout: 4s
      retryOn: 5xx
"""


async def test_retries_outlier_detection_and_circuit_breaker_give_zero_errors(nursery):
    v1 = await TrafficBackend("recommendation v1").start(nursery)
    v2 = await TrafficBackend("recommendation v2").start(nursery)
    bad = await TrafficBackend("recommendation v2 misbehaving", status=503).start(nursery)
    text = (CONFIG.replace("PORT_V1", str(v1.port)).replace("PORT_V2_BAD", str(bad.port))
            .replace("PORT_V2", str(v2.port)))
    proxy = await start(nursery, *yaml.safe_load_all(text))
    statuses: list[int] = []

    async def client():
        c = Client(proxy.port, host="recommendation:8080")
        for _ in range(200):
            statuses.append((await c.request("/")).status)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(client)
    assert len(statuses) == 1000
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
    cluster = "outbound|8080||recommendation"
    assert proxy.counter("triomesh_outlier_ejections_total", cluster=cluster) == 1
    assert proxy.gauge("triomesh_outlier_ejections_active", cluster=cluster) == 1
    # the bad host saw only the requests in flight before its ejection, each retried elsewhere
    assert 1 <= len(bad.requests) <= 5
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster=cluster) == len(bad.requests)
    assert len(v1.requests) + len(v2.requests) == 1000
    assert min(len(v1.requests), len(v2.requests)) > 400, "the two good hosts share the load"
    text = render_prometheus(merge([proxy.plane.stats.export()]))
    assert "# HELP triomesh_outlier_ejections_total Hosts ejected by outlier detection, by cluster." in text
    assert f'triomesh_outlier_ejections_total{{cluster="{cluster}"}} 1' in text
    assert f'triomesh_upstream_rq_retry_total{{cluster="{cluster}"}} {len(bad.requests)}' in text
