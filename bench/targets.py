"""The processes a benchmark run starts: the nginx backend and the forwarders (direct, triomesh, Envoy).

Every process is started by us, tracked by PID and stopped by PID. Configs are generated into a temp
directory per run; ports come from the kernel (port 0), so runs never collide with anything else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.l4_bench import start_forwarder
from bench.measure import cpu_seconds, peak_rss_bytes, process_tree, reset_peak_rss, user_system_seconds

SMALL_BODY = b"x" * 100
ONE_MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, *, timeout_s: float = 20.0, host: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
    """Until `url` answers 200 (an https URL is spoken to with the `tls` client context)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers={"Host": host} if host else {})
            with urllib.request.urlopen(req, timeout=2, context=tls) as resp:
                if resp.status == 200:
                    resp.read()
                    return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout_s}s: {last}")


def wait_tcp_accepting(port: int, *, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"127.0.0.1:{port} did not accept in {timeout_s}s: {e}") from e
            time.sleep(0.1)


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    port: int
    workdir: Path
    extra_pids: list[int] = field(default_factory=list)
    h2c_port: int | None = None  # nginx only: a second server speaking HTTP/2 with prior knowledge

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def system_seconds(self) -> float:
        """Kernel part of the CPU time (10 ms ticks from /proc/<pid>/stat)."""
        return sum(user_system_seconds(p)[1] for p in self.pids())

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.pids())

    def reset_peak_rss(self) -> bool:
        return reset_peak_rss(self.pids())

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's stderr log (kept in its workdir), for a failure message."""
        logs = sorted(self.workdir.glob("*.log")) if self.workdir != Path(".") else []
        code = self.proc.poll()
        out = ["still running" if code is None else f"exited with status {code}"]
        for log in logs:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out += [f"--- {log.name} (last {len(text)} lines)", *text]
        return "\n".join(out)

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


def _nginx_preamble(workdir: Path) -> str:
    """What every nginx of the benchmarks shares: one pinned worker in the foreground, its files under
    workdir, no access log, keep-alive without limits; the caller's text continues inside `http {`."""
    return textwrap.dedent(f"""\
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
        """)


def start_nginx(workdir: Path, *, cpus: str | None) -> Started:
    """One nginx worker with two servers of the same content: HTTP/1.1 on `port`, and HTTP/2 with prior
    knowledge (h2c) on `h2c_port` (nginx 1.22: `listen ... http2` without ssl speaks h2c only; its
    http2_max_concurrent_streams stays at the default, 128 per connection)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "www" / "1m.bin").write_bytes(os.urandom(ONE_MIB))
    port, h2c_port = free_port(), free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_preamble(workdir) + textwrap.dedent(f"""\
          sendfile on;
          server {{
            listen 127.0.0.1:{port} backlog=4096;
            root {workdir}/www;
            location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.decode()}"; }}
            location = /1m {{ try_files /1m.bin =404; }}
          }}
          server {{
            listen 127.0.0.1:{h2c_port} http2 backlog=4096;
            root {workdir}/www;
            location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.decode()}"; }}
            location = /1m {{ try_files /1m.bin =404; }}
          }}
        }}
        """))
    proc = subprocess.Popen(_pin(cpus) + ["nginx", "-c", str(conf), "-p", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = Started("nginx", proc, port, workdir, h2c_port=h2c_port)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/small")
        wait_tcp_accepting(h2c_port)  # the same process and config: serving one means serving both
    except Exception as e:
        detail = started.log_tail()  # before stop(): whether it had exited on its own
        started.stop()
        raise RuntimeError(f"{started.name} did not start: {e}\n{detail}") from e
    return started


def _addr(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


# What makes Envoy speak HTTP/2 (h2c, prior knowledge) to a cluster, as Istio configures it for an HTTP2/GRPC
# port: the upstream HTTP protocol options with an explicit HTTP/2 config (Envoy's defaults otherwise).
_ENVOY_UPSTREAM_H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    },
}


def _envoy_config(network_filter: dict, *, port: int, admin_port: int, backend_port: int,
                  upstream_h2: bool = False, transport_socket: dict | None = None) -> str:
    """A static Envoy bootstrap: one listener on 127.0.0.1:port with one network filter (behind
    `transport_socket`, e.g. TLS, when given), one STATIC cluster (spoken to in h2c when upstream_h2).
    Written as JSON, which Envoy reads as YAML."""
    cluster = {
        "name": "backend", "connect_timeout": "1s", "type": "STATIC",
        "load_assignment": {"cluster_name": "backend",
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(backend_port)}}]}]},
    }
    if upstream_h2:
        cluster["typed_extension_protocol_options"] = _ENVOY_UPSTREAM_H2
    chain: dict = {"filters": [network_filter]}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    return json.dumps({
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [{"name": "bench", "address": _addr(port), "filter_chains": [chain]}],
            "clusters": [cluster],
        },
    }, indent=1)


# HTTP: one route to the backend, router only (no access log, no tracing), as triomesh's VirtualService.
# codec_type AUTO (Envoy's default, spelled out): HTTP/1.1, or HTTP/2 when a connection opens with the
# HTTP/2 preface (h2c with prior knowledge), on the same listener, as triomesh's HTTP listeners.
_ENVOY_HTTP_FILTER = {
    "name": "envoy.filters.network.http_connection_manager",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    },
}

# Over mutual TLS, the HTTP listener as Istio configures a gateway's (gatewayTopology's default): the
# verified client certificate forwarded in x-forwarded-client-cert, replacing what the client sent,
# with its subject, PEM, URI and DNS SANs, as triomesh's MUTUAL gateway server writes it
# (proxy/l7/stages/forwarding.py)
_ENVOY_MTLS_HTTP_FILTER = {
    "name": _ENVOY_HTTP_FILTER["name"],
    "typed_config": {**_ENVOY_HTTP_FILTER["typed_config"],
                     "forward_client_cert_details": "SANITIZE_SET",
                     "set_current_client_cert_details": {"subject": True, "cert": True, "uri": True, "dns": True}},
}

# TCP: tcp_proxy to the cluster with Envoy's defaults (1 MiB per-connection buffer limit, no access log).
_ENVOY_TCP_FILTER = {
    "name": "envoy.filters.network.tcp_proxy",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp",
        "cluster": "backend",
    },
}


def _start_envoy(workdir: Path, network_filter: dict, backend_port: int, *, envoy_bin: str, cpus: str | None,
                 concurrency: int, name: str, upstream_h2: bool = False,
                 transport_socket: dict | None = None) -> tuple[Started, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    conf = workdir / "envoy.yaml"
    conf.write_text(_envoy_config(network_filter, port=port, admin_port=admin_port, backend_port=backend_port,
                                  upstream_h2=upstream_h2, transport_socket=transport_socket))
    proc = subprocess.Popen(_pin(cpus) + [envoy_bin, "-c", str(conf), "--concurrency", str(concurrency),
                                          "--log-level", "error", "--disable-hot-restart"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "envoy.log", "wb"))
    return Started(name, proc, port, workdir), admin_port


def start_envoy(workdir: Path, backend_port: int, *, envoy_bin: str, cpus: str | None, concurrency: int = 1,
                upstream_h2: bool = False) -> Started:
    """Envoy's HTTP listener (HTTP/1.1 and h2c) in front of the backend, which it speaks HTTP/1.1 to, or
    h2c when upstream_h2."""
    started, _ = _start_envoy(workdir, _ENVOY_HTTP_FILTER, backend_port, envoy_bin=envoy_bin, cpus=cpus,
                              concurrency=concurrency, name="envoy", upstream_h2=upstream_h2)
    try:
        wait_http_ok(f"http://127.0.0.1:{started.port}/small")
    except Exception as e:
        detail = started.log_tail()  # before stop(): whether it had exited on its own
        started.stop()
        raise RuntimeError(f"{started.name} did not start: {e}\n{detail}") from e
    return started


def start_envoy_tcp(workdir: Path, upstream_port: int, *, envoy_bin: str, cpus: str | None) -> Started:
    """Envoy with a tcp_proxy listener in front of 127.0.0.1:upstream_port (one worker)."""
    started, admin_port = _start_envoy(workdir, _ENVOY_TCP_FILTER, upstream_port, envoy_bin=envoy_bin, cpus=cpus,
                                       concurrency=1, name="envoy-tcp")
    try:
        # /ready answers 200 once the listeners are initialised; the port accepting is the proof
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready")
        wait_tcp_accepting(started.port)
    except Exception as e:
        detail = started.log_tail()  # before stop(): whether it had exited on its own
        started.stop()
        raise RuntimeError(f"{started.name} did not start: {e}\n{detail}") from e
    return started


def start_l4_forwarder(upstream_port: int, *, mode: str, cpus: str | None) -> Started:
    """triomesh's L4 forwarder (`python -m proxy.l4.forward`) in splice or copy mode."""
    proc, port = start_forwarder(upstream_port, cpus, mode)
    return Started(f"triomesh-{mode}", proc, port, Path("."))


def triomesh_config(port: int, backend_port: int, *, upstream_protocol: str = "HTTP",
                    location: str = "MESH_INTERNAL") -> str:
    """The Istio resources of the benchmark: one Gateway server, the backend as a ServiceEntry, one
    VirtualService route (no retries, timeouts or faults set: Istio's defaults apply, as for a user).
    The ServiceEntry port's protocol says how the backend is spoken to: HTTP is HTTP/1.1, HTTP2 (or
    GRPC) is h2c with prior knowledge. The Gateway's HTTP server takes HTTP/1.1 and h2c alike.
    `location`: MESH_INTERNAL (the gateway exchanges peer metadata with the backend, as toward a
    mesh service) or MESH_EXTERNAL (it does not)."""
    port_name = upstream_protocol.lower().replace("-", "")
    return textwrap.dedent(f"""\
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
          location: {location}
          resolution: STATIC
          ports: [{{number: 80, name: {port_name}, protocol: {upstream_protocol}}}]
          endpoints: [{{address: 127.0.0.1, ports: {{{port_name}: {backend_port}}}}}]
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
        """)


def start_triomesh(workdir: Path, backend_port: int, *, cpus: str | None, concurrency: int = 1,
                   upstream_protocol: str = "HTTP") -> Started:
    """The same single route as the Envoy config, written as Istio resources (upstream_protocol: the
    backend's ServiceEntry port protocol, HTTP or HTTP2)."""
    return _start_triomesh(workdir, lambda port: triomesh_config(port, backend_port, upstream_protocol=upstream_protocol),
                           cpus=cpus, concurrency=concurrency, name="triomesh",
                           ready=lambda port: wait_http_ok(f"http://127.0.0.1:{port}/small"))


def _start_triomesh(workdir: Path, config: Callable[[int], str], *, cpus: str | None, concurrency: int, name: str,
                    ready: Callable[[int], None]) -> Started:
    """`triomesh proxy` with the Istio resources config(port) on a fresh port; ready(port) returns once
    it serves there."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    cfg = workdir / "config"
    cfg.mkdir(exist_ok=True)
    (cfg / "bench.yaml").write_text(config(port))
    triomesh = str(Path(sys.executable).with_name("triomesh"))
    proc = subprocess.Popen(_pin(cpus) + [triomesh, "proxy", "--config", str(cfg), "--concurrency", str(concurrency),
                                          "--access-log", "off", "--bind-address", "127.0.0.1",
                                          "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "triomesh.log", "wb"))
    started = Started(name, proc, port, workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready")
        ready(port)
    except Exception as e:
        detail = started.log_tail()  # before stop(): whether it had exited on its own
        started.stop()
        raise RuntimeError(f"{started.name} did not start: {e}\n{detail}") from e
    return started


# --- mutual TLS -----------------------------------------------------------------------------------
# Both proxies terminate mutual TLS with the same files (bench.mtls.MeshCertificates: an ECDSA P-256
# CA, server and client certificates), TLS 1.3 only, and require a client certificate the CA signed.
# The client side of the hop is the same for both: nginx (start_mtls_client) or bench.mtls's bulk client.

MTLS_SERVER_NAME = "bench.example.com"


def _envoy_downstream_mtls(certs) -> dict:
    """Envoy's DownstreamTlsContext for the same files as triomesh's MUTUAL server: TLS 1.3 only, client
    certificate required and verified against the CA. TLS 1.3 suites are not configurable in Envoy
    (BoringSSL's), nor in triomesh (OpenSSL's defaults): the client offers one (see start_mtls_client)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                               "tls_maximum_protocol_version": "TLSv1_3"},
                "tls_certificates": [{"certificate_chain": {"filename": certs.server_cert},
                                      "private_key": {"filename": certs.server_key}}],
                "validation_context": {"trusted_ca": {"filename": certs.ca}},
            },
        },
    }


def start_envoy_mtls(workdir: Path, upstream_port: int, certs, *, envoy_bin: str, cpus: str | None,
                     tcp: bool = False) -> Started:
    """Envoy terminating mutual TLS (one worker) in front of 127.0.0.1:upstream_port: the HTTP listener
    of start_envoy, or (tcp) the tcp_proxy of start_envoy_tcp."""
    network_filter = _ENVOY_TCP_FILTER if tcp else _ENVOY_MTLS_HTTP_FILTER
    started, admin_port = _start_envoy(workdir, network_filter, upstream_port, envoy_bin=envoy_bin, cpus=cpus,
                                       concurrency=1, name="envoy-mtls-tcp" if tcp else "envoy-mtls",
                                       transport_socket=_envoy_downstream_mtls(certs))
    try:
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready")
        if tcp:
            wait_tcp_accepting(started.port)
        else:
            wait_http_ok(f"https://127.0.0.1:{started.port}/small", tls=certs.client_context())
    except Exception as e:
        detail = started.log_tail()  # before stop(): whether it had exited on its own
        started.stop()
        raise RuntimeError(f"{started.name} did not start: {e}\n{detail}") from e
    return started


def triomesh_mtls_config(port: int, upstream_port: int, certs, *, tcp: bool = False) -> str:
    """A Gateway server in MUTUAL mode with the certificate files (TLS 1.3 only), then the route of
    triomesh_config: protocol HTTPS and an http route to the backend, or (tcp) protocol TLS and a tcp
    route to the sink (TLS terminated, the plaintext spliced on)."""
    protocol, port_name, route = ("TLS", "tcp", "tcp") if tcp else ("HTTPS", "http", "http")
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: bench-gateway, namespace: bench}}
        spec:
          servers:
          - port: {{number: {port}, name: {protocol.lower()}, protocol: {protocol}}}
            hosts: ["*"]
            tls:
              mode: MUTUAL
              serverCertificate: {certs.server_cert}
              privateKey: {certs.server_key}
              caCertificates: {certs.ca}
              minProtocolVersion: TLSV1_3
              maxProtocolVersion: TLSV1_3
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: backend, namespace: bench}}
        spec:
          hosts: [backend.bench.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: {port_name}, protocol: {port_name.upper()}}}]
          endpoints: [{{address: 127.0.0.1, ports: {{{port_name}: {upstream_port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: backend, namespace: bench}}
        spec:
          hosts: ["*"]
          gateways: [bench-gateway]
          {route}:
          - route:
            - destination: {{host: backend.bench.svc.cluster.local, port: {{number: 80}}}}
        """)


def start_triomesh_mtls(workdir: Path, upstream_port: int, certs, *, cpus: str | None, tcp: bool = False) -> Started:
    """triomesh terminating mutual TLS (one worker) with the config of triomesh_mtls_config."""
    def ready(port: int) -> None:
        if tcp:
            wait_tcp_accepting(port)
        else:
            wait_http_ok(f"https://127.0.0.1:{port}/small", tls=certs.client_context())
    return _start_triomesh(workdir, lambda port: triomesh_mtls_config(port, upstream_port, certs, tcp=tcp), cpus=cpus,
                           concurrency=1, name="triomesh-mtls-tcp" if tcp else "triomesh-mtls", ready=ready)


@dataclass
class MtlsClient:
    """The nginx that plays the client sidecar: per proxy, a plaintext port whose requests it sends over
    kept-alive mutual TLS connections, one whose requests each open a new one (a full handshake), and
    one whose requests each open a new one resuming the session of an earlier one (a ticket)."""
    started: Started
    keepalive_ports: dict[str, int]
    new_connection_ports: dict[str, int]
    resumed_ports: dict[str, int]

    def stop(self) -> None:
        self.started.stop()


def start_mtls_client(workdir: Path, upstream_ports: dict[str, int], certs, *, cpus: str | None) -> MtlsClient:
    """One nginx worker originating mutual TLS to each proxy in upstream_ports (name -> port), as a client
    sidecar does: the client certificate, the server's verified against the CA (name MTLS_SERVER_NAME,
    also sent as SNI), TLS 1.3 only with one suite offered (TLS_AES_128_GCM_SHA256, so that both servers
    use the same), and no session resumption (proxy_ssl_session_reuse off: every new connection is a
    full handshake) but on the resumed ports (proxy_ssl_session_reuse on: nginx offers the ticket of
    the session it saved last, as a client sidecar that keeps sessions does). Keep-alive ports pool up
    to 256 idle connections per proxy; the new-connection and resumed ports close the upstream
    connection after each response (nginx's default Connection: close)."""
    workdir.mkdir(parents=True, exist_ok=True)
    keepalive = {name: free_port() for name in upstream_ports}
    fresh = {name: free_port() for name in upstream_ports}
    resumed = {name: free_port() for name in upstream_ports}
    blocks = []
    for name, port in upstream_ports.items():
        blocks.append(f"""
          upstream {name}_keepalive {{ server 127.0.0.1:{port}; keepalive 256; keepalive_requests 100000000;
                                      keepalive_timeout 300s; }}
          upstream {name}_new {{ server 127.0.0.1:{port}; }}
          upstream {name}_resumed {{ server 127.0.0.1:{port}; }}
          server {{
            listen 127.0.0.1:{keepalive[name]} backlog=4096;
            location / {{ proxy_pass https://{name}_keepalive; proxy_set_header Connection ""; }}
          }}
          server {{
            listen 127.0.0.1:{fresh[name]} backlog=4096;
            location / {{ proxy_pass https://{name}_new; }}
          }}
          server {{
            listen 127.0.0.1:{resumed[name]} backlog=4096;
            location / {{ proxy_pass https://{name}_resumed; proxy_ssl_session_reuse on; }}
          }}""")
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_preamble(workdir) + textwrap.dedent(f"""\
          proxy_http_version 1.1;
          proxy_ssl_certificate {certs.client_cert};
          proxy_ssl_certificate_key {certs.client_key};
          proxy_ssl_trusted_certificate {certs.ca};
          proxy_ssl_verify on;
          proxy_ssl_name {MTLS_SERVER_NAME};
          proxy_ssl_server_name on;
          proxy_ssl_protocols TLSv1.3;
          proxy_ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
          proxy_ssl_session_reuse off;
        """) + "".join(blocks) + "\n}\n")
    proc = subprocess.Popen(_pin(cpus) + ["nginx", "-c", str(conf), "-p", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = Started("nginx-mtls-client", proc, next(iter(keepalive.values())), workdir)
    try:
        for name in upstream_ports:
            wait_http_ok(f"http://127.0.0.1:{keepalive[name]}/small")
            wait_http_ok(f"http://127.0.0.1:{fresh[name]}/small")
            wait_http_ok(f"http://127.0.0.1:{resumed[name]}/small")
    except Exception as e:
        detail = started.log_tail()  # before stop(): whether it had exited on its own
        started.stop()
        raise RuntimeError(f"{started.name} did not start: {e}\n{detail}") from e
    return MtlsClient(started, keepalive, fresh, resumed)
