"""Istio's standard metrics scraped by a real Prometheus: a client sidecar and a server sidecar
(`triomesh proxy` processes on loopback, the server one with two workers) between a test client and
a backend, and the queries of Istio's Grafana dashboards answered from what Prometheus scraped.

client --GET Host: preference:8080--> sidecar "customer" (Sidecar egress, reporter=source)
       --> sidecar "preference-v1" (Sidecar ingress, reporter=destination, 2 workers) --> backend

The backend answers after BACKEND_DELAY_S, so every request's duration falls in Envoy's (250, 500] ms
bucket at both sidecars, and histogram_quantile must answer inside that bucket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OK_REQUESTS = 24
FAILED_REQUESTS = 6  # answered 500 by the backend (not retried: Istio retries 503 by default)
BACKEND_DELAY_S = 0.3  # far from the bucket's edges: a busy machine's jitter stays inside it
BUCKET = (250.0, 500.0)  # the duration bucket every request lands in
CONCURRENT_REQUESTS = 4
SCRAPE_INTERVAL_S = 1
START_TIMEOUT_S = 20.0
SERVICE = "preference.tutorial.svc.cluster.local"

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                                reason="needs the prometheus binary (Debian package prometheus; make test installs it)")

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: preference, namespace: tutorial}}
spec:
  hosts: [preference]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {inbound}}}
    labels: {{app: preference, version: v1}}
"""

CLIENT_SIDECAR = """
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: tutorial}}
spec:
  egress:
  - port: {{number: {egress}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["*/*"]
"""

SERVER_SIDECAR = """
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: tutorial}}
spec:
  ingress:
  - port: {{number: {inbound}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:{backend}
"""


class Backend(BaseHTTPRequestHandler):
    seen_peer_headers: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.headers.get("x-triomesh-peer") is not None:
            Backend.seen_peer_headers.append(self.headers["x-triomesh-peer"])
        time.sleep(BACKEND_DELAY_S)
        status = 500 if self.path.startswith("/fail") else 200
        body = b"preference\n"
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def get(port: int, path: str, *, host: str | None = None, timeout_s: float = 10.0):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"host": host} if host else {})
    try:
        with _DIRECT.open(request, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_until(check, what: str, timeout_s: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        log.close()
        self.running.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.running:  # our own processes only, by their process group (workers included)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with _DIRECT.open(url, timeout=5) as resp:
        answer = json.load(resp)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def by(results: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in results}


@pytest.fixture
def mesh(tmp_path: Path):
    ports = {name: free_port() for name in ("egress", "inbound", "admin_client", "admin_server", "prometheus")}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    ports["backend"] = server.server_address[1]
    Backend.seen_peer_headers = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client_dir, server_dir = tmp_path / "client", tmp_path / "server"
    client_dir.mkdir()
    server_dir.mkdir()
    (client_dir / "mesh.yaml").write_text(SERVICE_ENTRY.format(**ports) + CLIENT_SIDECAR.format(**ports))
    (server_dir / "mesh.yaml").write_text(SERVICE_ENTRY.format(**ports) + SERVER_SIDECAR.format(**ports))
    (tmp_path / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {SCRAPE_INTERVAL_S}s, evaluation_interval: {SCRAPE_INTERVAL_S}s}}\n"
        "scrape_configs:\n"
        "- job_name: triomesh\n"
        "  metrics_path: /stats/prometheus\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{ports['admin_client']}', '127.0.0.1:{ports['admin_server']}']}}]\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    proxy = [sys.executable, "-m", "proxy.cli", "proxy", "--namespace", "tutorial", "--access-log", "off"]
    try:
        procs.start("client-sidecar", proxy + ["--config", str(client_dir), "--label", "app=customer",
                                               "--label", "version=v1", "--workload-name", "customer-v1",
                                               "--concurrency", "1",
                                               "--admin-address", f"127.0.0.1:{ports['admin_client']}"])
        procs.start("server-sidecar", proxy + ["--config", str(server_dir), "--label", "app=preference",
                                               "--label", "version=v1", "--workload-name", "preference-v1",
                                               "--concurrency", "2",
                                               "--admin-address", f"127.0.0.1:{ports['admin_server']}"])
        procs.start("prometheus", ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{ports['prometheus']}"])
        for name in ("admin_client", "admin_server"):
            wait_until(lambda port=ports[name]: get(port, "/ready")[0] == 200, f"{name} /ready")
        wait_until(lambda: get(ports["prometheus"], "/-/ready")[0] == 200, "prometheus /-/ready")
        yield ports, procs
    finally:
        procs.stop()
        server.shutdown()
        server.server_close()


def test_istio_dashboard_queries_on_scraped_sidecars(mesh) -> None:
    ports, procs = mesh
    started = time.monotonic()
    prom = ports["prometheus"]
    # one request of each outcome first, so every series exists before the counted traffic and the
    # dashboards' rate() windows see all of that traffic as increase
    assert get(ports["egress"], "/ok", host="preference:8080")[0] == 200
    assert get(ports["egress"], "/fail", host="preference:8080")[0] == 500
    wait_until(lambda: len(query(prom, "istio_requests_total")) == 4, "the four series in Prometheus", timeout_s=10)
    paths = ["/fail" if i % 5 == 4 else "/ok" for i in range(OK_REQUESTS + FAILED_REQUESTS)]
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        answers = list(pool.map(lambda path: get(ports["egress"], path, host="preference:8080"), paths))
    assert [a[0] for a in answers].count(200) == OK_REQUESTS, (answers[:3], procs.tail("client-sidecar"))
    assert [a[0] for a in answers].count(500) == FAILED_REQUESTS
    # the metadata exchange stays between the sidecars: neither app sees the header
    assert Backend.seen_peer_headers == []
    assert not any("x-triomesh-peer" in {k.lower() for k in a[1]} for a in answers)

    total = OK_REQUESTS + FAILED_REQUESTS + 2  # with the first two
    # every request, by both reporters, once both sidecars' last scrape has seen them all
    seen: list = []

    def scraped_all() -> bool:
        seen.append(by(query(prom, "sum(istio_requests_total) by (reporter)"), "reporter"))
        return seen[-1] == {"source": total, "destination": total}

    try:
        wait_until(scraped_all, "Prometheus to scrape every request", timeout_s=15)
    except AssertionError as e:
        raise AssertionError(f"{e}: {seen[-1:]}, {get(ports['admin_server'], '/stats/prometheus')[2].decode()}") from e

    # counts exact, by service and by workload, with the labels each side fills
    assert by(query(prom, 'sum(istio_requests_total{reporter="destination"}) by (destination_service)'),
              "destination_service") == {SERVICE: total}
    assert by(query(prom, 'sum(istio_requests_total{reporter="destination"}) by (source_workload)'),
              "source_workload") == {"customer-v1": total}
    assert by(query(prom, 'sum(istio_requests_total{reporter="source"}) by (destination_workload)'),
              "destination_workload") == {"preference-v1": total}
    assert by(query(prom, 'sum(istio_requests_total) by (response_code)'), "response_code") == {
        "200": 2 * (OK_REQUESTS + 1), "500": 2 * (FAILED_REQUESTS + 1)}
    [destination] = query(prom, 'istio_requests_total{reporter="destination", response_code="200"}')
    labels = destination["metric"]
    assert {k: labels[k] for k in ("source_app", "source_version", "source_workload_namespace", "source_canonical_service",
                                   "destination_app", "destination_version", "destination_workload",
                                   "destination_service_name", "destination_service_namespace", "request_protocol",
                                   "response_flags", "connection_security_policy", "source_principal",
                                   "source_cluster")} == {
        "source_app": "customer", "source_version": "v1", "source_workload_namespace": "tutorial",
        "source_canonical_service": "customer", "destination_app": "preference", "destination_version": "v1",
        "destination_workload": "preference-v1", "destination_service_name": "preference",
        "destination_service_namespace": "tutorial", "request_protocol": "http", "response_flags": "-",
        "connection_security_policy": "none", "source_principal": "unknown", "source_cluster": "Kubernetes"}

    # Istio's dashboards: request rate by service, success rate (non-5xx / all), latency quantiles.
    # Rates over one window scale every series of one target alike, so their ratio is the traffic's.
    [rate] = query(prom, 'sum(rate(istio_requests_total{reporter="destination"}[1m])) by (destination_service)')
    assert rate["metric"] == {"destination_service": SERVICE} and float(rate["value"][1]) > 0
    # the counted traffic's increase (rate() extrapolates to the window's edges: allow for it)
    [increase] = query(prom, 'sum(increase(istio_requests_total{reporter="destination"}[1m]))')
    assert OK_REQUESTS + FAILED_REQUESTS <= float(increase["value"][1]) < 1.5 * (OK_REQUESTS + FAILED_REQUESTS + 2), increase
    [success] = query(prom, 'sum(rate(istio_requests_total{reporter="destination",response_code!~"5.*"}[1m])) '
                            '/ sum(rate(istio_requests_total{reporter="destination"}[1m]))')
    assert abs(float(success["value"][1]) - OK_REQUESTS / (OK_REQUESTS + FAILED_REQUESTS)) < 0.05, success
    for quantile in (0.5, 0.9, 0.99):
        for reporter, group in (("destination", "destination_service"), ("destination", "destination_workload"),
                                ("source", "source_workload")):
            results = query(prom, f"histogram_quantile({quantile}, sum(rate(istio_request_duration_milliseconds_bucket"
                                  f'{{reporter="{reporter}"}}[1m])) by (le, {group}))')
            assert len(results) == 1, results
            value = float(results[0]["value"][1])
            assert BUCKET[0] < value <= BUCKET[1], (quantile, reporter, group, value)
    # sizes: the backend's body is 11 bytes, requests have none
    assert by(query(prom, 'sum(istio_response_bytes_sum) by (reporter)'), "reporter") == {
        "source": 11.0 * total, "destination": 11.0 * total}
    assert by(query(prom, 'sum(istio_request_bytes_count) by (reporter)'), "reporter") == {
        "source": total, "destination": total}
    assert time.monotonic() - started < 30
