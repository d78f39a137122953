"""The Istio tutorial's combined resilience scenario against the real `triomesh proxy` process: YAML
config file, real backends, 1,000 requests with zero errors, the ejection in /stats/prometheus and
the compiled retry/outlier/connection-pool policies in /config_dump."""

from __future__ import annotations

import trio

from tests.integration.test_traffic_istio_book import CONFIG
from tests.integration.traffic_harness import Client, TrafficBackend
from tests.runner.harness import Proxy, free_port

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  servers:
  - port: {number: GATEWAY_PORT, name: http, protocol: HTTP}
    hosts: ["*"]
---
"""


async def test_book_scenario_through_the_proxy_process(nursery, tmp_path):
    v1 = await TrafficBackend("recommendation v1").start(nursery)
    v2 = await TrafficBackend("recommendation v2").start(nursery)
    bad = await TrafficBackend("recommendation v2 misbehaving", status=503).start(nursery)
    port = free_port()
    text = (GATEWAY.replace("GATEWAY_PORT", str(port)) + CONFIG).replace("PORT_V1", str(v1.port)) \
        .replace("PORT_V2_BAD", str(bad.port)).replace("PORT_V2", str(v2.port))
    config = tmp_path / "mesh.yaml"
    config.write_text(text)
    proxy = Proxy(config=config, workdir=tmp_path, concurrency=1, access_log="off")
    await trio.to_thread.run_sync(proxy.start)
    try:
        statuses: list[int] = []

        async def client():
            c = Client(port, host="recommendation:8080")
            for _ in range(200):
                statuses.append((await c.request("/")).status)

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for _ in range(5):
                    n.start_soon(client)
        assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
        cluster = "outbound|8080||recommendation"
        ejections = await trio.to_thread.run_sync(proxy.stats, "triomesh_outlier_ejections_total")
        assert ejections[(("cluster", cluster),)] == 1.0
        assert ejections[(("cluster", "outbound|8080|version-v1|recommendation"),)] == 0.0
        retries = await trio.to_thread.run_sync(proxy.stats, "triomesh_upstream_rq_retry_total")
        assert retries[(("cluster", cluster),)] == len(bad.requests) >= 1
        dump = await trio.to_thread.run_sync(proxy.config_dump)
        text = str(dump)
        assert "outlier_detection" in text and "'consecutive_5xx': 1" in text and "'max_ejection_percent': 100" in text
        assert "'num_retries': 3" in text and "'per_try_timeout_s': 4.0" in text
        assert "'max_requests_per_connection': 1" in text
    finally:
        await trio.to_thread.run_sync(proxy.stop)
