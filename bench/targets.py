"""The processes a benchmark run starts: the nginx backend and the forwarders (direct, triomesh, Envoy).

Every process is started by us, tracked by PID and stopped by PID. Configs are generated into a temp
directory per run; ports come from the kernel (port 0), so runs never collide with anything else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import cpu_seconds, peak_rss_bytes, process_tree

SMALL_BODY = b"x" * 100
ONE_MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, *, timeout_s: float = 20.0, host: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers={"Host": host} if host else {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    resp.read()
                    return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout_s}s: {last}")


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    port: int
    workdir: Path
    extra_pids: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.pids())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def start_nginx(workdir: Path, *, cpus: str | None) -> Started:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "www" / "1m.bin").write_bytes(os.urandom(ONE_MIB))
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        worker_processes 1;
        daemon off;
        master_process on;
        user root;
        pid {workdir}/nginx.pid;
        error_log {workdir}/nginx-error.log warn;
        events {{ worker_connections 8192; }}
        http {{
          access_log off;
          client_body_temp_path {workdir}/tmp-body;
          proxy_temp_path {workdir}/tmp-proxy;
          fastcgi_temp_path {workdir}/tmp-fcgi;
          uwsgi_temp_path {workdir}/tmp-uwsgi;
          scgi_temp_path {workdir}/tmp-scgi;
          keepalive_requests 100000000;
          keepalive_timeout 300s;
          sendfile on;
          server {{
            listen 127.0.0.1:{port} backlog=4096;
            root {workdir}/www;
            location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.decode()}"; }}
            location = /1m {{ try_files /1m.bin =404; }}
          }}
        }}
        """))
    proc = subprocess.Popen(_pin(cpus) + ["nginx", "-c", str(conf), "-p", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = Started("nginx", proc, port, workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/small")
    except Exception:
        started.stop()
        raise
    return started


def start_envoy(workdir: Path, backend_port: int, *, envoy_bin: str, cpus: str | None, concurrency: int = 1) -> Started:
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    conf = workdir / "envoy.yaml"
    conf.write_text(textwrap.dedent(f"""\
        admin:
          address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
        static_resources:
          listeners:
          - name: http
            address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                  stat_prefix: ingress
                  route_config:
                    virtual_hosts:
                    - name: backend
                      domains: ["*"]
                      routes:
                      - match: {{prefix: "/"}}
                        route: {{cluster: backend}}
                  http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          clusters:
          - name: backend
            connect_timeout: 1s
            type: STATIC
            load_assignment:
              cluster_name: backend
              endpoints:
              - lb_endpoints:
                - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend_port}}}}}}}
        """))
    proc = subprocess.Popen(_pin(cpus) + [envoy_bin, "-c", str(conf), "--concurrency", str(concurrency),
                                          "--log-level", "error", "--disable-hot-restart"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "envoy.log", "wb"))
    started = Started("envoy", proc, port, workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/small")
    except Exception:
        started.stop()
        raise
    return started


def start_triomesh(workdir: Path, backend_port: int, *, cpus: str | None, concurrency: int = 1) -> Started:
    """The same single route as the Envoy config, written as Istio resources."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    cfg = workdir / "config"
    cfg.mkdir(exist_ok=True)
    (cfg / "bench.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: bench-gateway, namespace: bench}}
        spec:
          servers:
          - port: {{number: {port}, name: http, protocol: HTTP}}
            hosts: ["*"]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: backend, namespace: bench}}
        spec:
          hosts: [backend.bench.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: backend, namespace: bench}}
        spec:
          hosts: ["*"]
          gateways: [bench-gateway]
          http:
          - route:
            - destination: {{host: backend.bench.svc.cluster.local}}
        """))
    triomesh = str(Path(sys.executable).with_name("triomesh"))
    proc = subprocess.Popen(_pin(cpus) + [triomesh, "proxy", "--config", str(cfg), "--concurrency", str(concurrency),
                                          "--access-log", "off", "--bind-address", "127.0.0.1",
                                          "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "triomesh.log", "wb"))
    started = Started("triomesh", proc, port, workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready")
        wait_http_ok(f"http://127.0.0.1:{port}/small")
    except Exception:
        started.stop()
        raise
    return started
