"""The real `triomesh proxy` process with `--zipkin-address` and `--trace-sampling`: curl's requests
become spans at our collector (tests/tracing/collector.py's schema check), named after the proxy's
workload and node, and counted in /stats/prometheus."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.runner.harness import Backend, Proxy, free_port, mesh_config, triomesh
from tests.tracing.collector import schema_violations


class ThreadedCollector:
    """POST /api/v2/spans on 127.0.0.1 in a thread (the test itself is synchronous)."""

    def __init__(self) -> None:
        spans: list[dict] = []
        violations: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path != "/api/v2/spans":
                    violations.append(f"posted to {self.path}")
                for span in body:
                    violations.extend(schema_violations(span))
                    spans.append(span)
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.spans, self.violations = spans, violations
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _curl(port: int, path: str, *headers: str) -> int:
    args = [arg for h in headers for arg in ("-H", h)]
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10", "-w", "%{http_code}", *args,
                        f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=False)
    return int(r.stdout or 0)


def test_proxy_flags_send_sampled_requests_to_the_collector(tmp_path: Path) -> None:
    v1, v2, collector = Backend("v1"), Backend("v2"), ThreadedCollector()
    gateway_port = free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh_config(gateway_port, v1.port, v2.port, weights=(100, 0)))
    proxy = Proxy(config, tmp_path, concurrency=1, extra_args=[
        "--zipkin-address", f"127.0.0.1:{collector.port}", "--trace-sampling", "0",
        "--namespace", "edge", "--label", "app=ingress", "--node-id", "router~127.0.0.1~ingress.edge~edge.svc"])
    try:
        proxy.start()
        assert _curl(gateway_port, "/not-sampled") == 200  # 0%: no span
        assert _curl(gateway_port, "/sampled", "x-b3-sampled: 1") == 200
        proxy.wait_for(lambda: len(collector.spans) >= 2 or None, "two spans at the collector", 10)
        assert collector.violations == []
        assert sorted(s["kind"] for s in collector.spans) == ["CLIENT", "SERVER"]
        for span in collector.spans:
            assert span["localEndpoint"]["serviceName"] == "ingress.edge"
            assert span["tags"]["node_id"] == "router~127.0.0.1~ingress.edge~edge.svc"
            assert span["tags"]["http.url"] == f"http://127.0.0.1:{gateway_port}/sampled"
            assert span["tags"]["upstream_cluster"] == "outbound|80|v1|backend"
        sent = proxy.wait_for(lambda: proxy.stats("triomesh_tracing_spans_sent_total") or None, "sent counter", 5)
        assert sum(sent.values()) == 2
        assert sum(proxy.stats("triomesh_tracing_spans_dropped_total").values()) == 0
    finally:
        proxy.stop()
        v1.close()
        v2.close()
        collector.close()


def test_bad_tracing_flags_are_refused() -> None:
    r = triomesh("proxy", "--trace-sampling", "150")
    assert r.returncode == 2 and "--trace-sampling: expected a percentage from 0 to 100, got '150'" in r.stderr.decode()
    r = triomesh("proxy", "--zipkin-address", "zipkin")
    assert r.returncode == 2 and "--zipkin-address: expected HOST:PORT, got 'zipkin'" in r.stderr.decode()
