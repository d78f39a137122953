"""Mutual TLS between sidecars with real processes on 127.0.0.1: a control plane issuing short-lived
certificates, a client sidecar (egress listener) originating Istio mutual TLS by auto mTLS (the
server sidecar registers itself, and its WorkloadEntry carries security.istio.io/tlsMode: istio) to a server sidecar's ingress listener under
STRICT, an AuthorizationPolicy on principals allowing one client workload and denying another, a
plaintext client and `openssl s_client` without a mesh certificate refused, and certificate rotation
under steady load without a failed request; DestinationRule ISTIO_MUTUAL with subjectAltNames; a
Gateway server in ISTIO_MUTUAL; TCP from the client proxy's TCP server over mesh mTLS (auto mTLS) to
the server proxy's ISTIO_MUTUAL TLS server and its echo app, with destination_principal in the
client's TCP metrics and in its request metrics. Every process is started here and stopped by PID."""

from __future__ import annotations

import http.client
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest

from controlplane.ca import CertificateAuthority
from proxy.identity.csr import new_key_and_request
from proxy.identity.spiffe import SpiffeId
from tests.runner.harness import Backend, ControlPlane, Proxy, free_port, triomesh

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None,
                                reason="needs the openssl and curl command line tools (Debian openssl, curl)")

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: preference, namespace: tutorial}}
spec:
  hosts: [preference]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP, targetPort: {inbound}}}]
  workloadSelector: {{labels: {{app: preference}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: customer, namespace: tutorial}}
spec:
  workloadSelector: {{labels: {{app: customer}}}}
  egress:
  - port: {{number: {egress}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["*/*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: intruder, namespace: tutorial}}
spec:
  workloadSelector: {{labels: {{app: intruder}}}}
  egress:
  - port: {{number: {egress_other}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["*/*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: preference, namespace: tutorial}}
spec:
  workloadSelector: {{labels: {{app: preference}}}}
  ingress:
  - port: {{number: {inbound}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:{backend}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: preference-direct, namespace: tutorial}}
spec:
  hosts: [preference-direct, preference-wrong]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {inbound}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: preference-direct, namespace: tutorial}}
spec:
  host: preference-direct
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/tutorial/sa/preference]}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: preference-wrong, namespace: tutorial}}
spec:
  host: preference-wrong
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/tutorial/sa/someone-else]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: tutorial}}
spec:
  hosts: [backend.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mesh-gateway, namespace: tutorial}}
spec:
  selector: {{app: preference}}
  servers:
  - port: {{number: {gateway}, name: https, protocol: HTTPS}}
    hosts: ["*"]
    tls: {{mode: ISTIO_MUTUAL}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: through-gateway, namespace: tutorial}}
spec:
  hosts: ["*"]
  gateways: [mesh-gateway]
  http: [{{route: [{{destination: {{host: backend.local, port: {{number: 80}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: customer-tcp, namespace: tutorial}}
spec:
  selector: {{app: customer}}
  servers: [{{port: {{number: {tcp_in}, name: tcp, protocol: TCP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: customer-tcp, namespace: tutorial}}
spec:
  hosts: ["*"]
  gateways: [customer-tcp]
  tcp: [{{route: [{{destination: {{host: preference-tcp, port: {{number: 7000}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: preference-tcp, namespace: tutorial}}
spec:
  hosts: [preference-tcp]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {tcp_gateway}}}, labels: {{app: preference, security.istio.io/tlsMode: istio}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: preference-tcp, namespace: tutorial}}
spec:
  selector: {{app: preference}}
  servers: [{{port: {{number: {tcp_gateway}, name: tls, protocol: TLS}}, hosts: ["*"], tls: {{mode: ISTIO_MUTUAL}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo-app, namespace: tutorial}}
spec:
  hosts: [echo-app]
  resolution: STATIC
  ports: [{{number: 7001, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: preference-tcp, namespace: tutorial}}
spec:
  hosts: ["*"]
  gateways: [preference-tcp]
  tcp: [{{route: [{{destination: {{host: echo-app, port: {{number: 7001}}}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: preference, namespace: tutorial}}
spec:
  selector: {{matchLabels: {{app: preference}}}}
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-customer, namespace: tutorial}}
spec:
  selector: {{matchLabels: {{app: preference}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/tutorial/sa/customer]}}}}]}}]
"""


def request(port: int, host: str = "preference:8080") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def steady_load(port: int, *, connections: int, total: int, max_s: float) -> tuple[int, list[str]]:
    """`connections` keep-alive clients, at most `total` requests for at most `max_s` seconds;
    every exception or non-200 is a failure (never retried)."""
    lock = threading.Lock()
    counts = {"ok": 0, "left": total}
    failures: list[str] = []
    deadline = time.monotonic() + max_s

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            with lock:
                if counts["left"] <= 0:
                    break
                counts["left"] -= 1
            try:
                conn.request("GET", "/", headers={"host": "preference:8080"})
                resp = conn.getresponse()
                body = resp.read()
            except Exception as e:  # noqa: BLE001 - every kind of failure counts
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            with lock:
                if resp.status == 200:
                    counts["ok"] += 1
                else:
                    failures.append(f"status {resp.status}: {body[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_s + 30)
    return counts["ok"], failures


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


def test_sidecars_speak_mutual_tls_with_principals_and_rotation(tmp_path: Path, procs) -> None:
    backend = Backend("preference-v1")
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        _run(tmp_path, procs, backend, echo.server_address[1])
    finally:
        backend.close()
        echo.shutdown()
        echo.server_close()


def _run(tmp_path: Path, procs: list, backend: Backend, echo_port: int) -> None:
    ports = {"egress": free_port(), "egress_other": free_port(), "inbound": free_port(), "gateway": free_port(),
             "backend": backend.port, "tcp_in": free_port(), "tcp_gateway": free_port(), "echo": echo_port}
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(CONFIG.format(**ports))
    ca_dir = tmp_path / "ca"
    cp = ControlPlane(config, tmp_path, extra_args=["--ca-dir", str(ca_dir), "--workload-cert-ttl", "4s"])
    procs.append(cp)
    cp.start()
    token = triomesh("controlplane", "token", "--ca-dir", str(ca_dir), "--namespace", "tutorial")
    assert token.returncode == 0, token.stderr
    token_file = tmp_path / "tutorial.token"
    token_file.write_bytes(token.stdout.strip())

    def sidecar(node: str, service_account: str, *labels: str, register: bool = False) -> Proxy:
        args = [*(["--register", "127.0.0.1"] if register else []), "--controlplane", cp.address, "--controlplane-ca", str(ca_dir / "root-cert.pem"),
                "--controlplane-token-file", str(token_file), "--node-id", node, "--namespace", "tutorial",
                "--service-account", service_account]
        for label in labels:
            args += ["--label", label]
        proxy = Proxy(None, tmp_path, concurrency=1, access_log="off", extra_args=args)
        procs.append(proxy)
        return proxy.start()

    # registered: its WorkloadEntry carries security.istio.io/tlsMode=istio, so clients use auto mTLS
    server = sidecar("preference-v1", "preference", "app=preference", register=True)
    customer = sidecar("customer-v1", "customer", "app=customer")
    for proxy in (server, customer):
        proxy.wait_for(lambda p=proxy: p.config_dump()["workload_identity"].get("serial"), "a workload certificate")

    # allowed: customer's identity; the server sidecar saw it on a mutual TLS connection
    deadline = time.monotonic() + 15
    while (status := request(ports["egress"]))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the egress listener and the cluster arrive with the first push
    assert status == (200, status[1]) and "preference-v1" in status[1], status
    stats = server.admin("/stats/prometheus")[1]
    assert 'connection_security_policy="mutual_tls"' in stats
    assert 'source_principal="spiffe://cluster.local/ns/tutorial/sa/customer"' in stats
    # each side names its own certificate's SPIFFE ID too, as Istio does
    assert 'destination_principal="spiffe://cluster.local/ns/tutorial/sa/preference"' in stats
    # the client side reports the server certificate's SPIFFE ID
    client_stats = customer.admin("/stats/prometheus")[1]
    assert 'destination_principal="spiffe://cluster.local/ns/tutorial/sa/preference"' in client_stats
    assert 'source_principal="spiffe://cluster.local/ns/tutorial/sa/customer"' in client_stats

    # TCP: the customer's TCP server routes to an endpoint labelled with a sidecar, so the customer
    # proxy originates mesh mTLS to the preference proxy's ISTIO_MUTUAL TLS server, which hands the
    # plaintext to the echo app; the customer's TCP metrics name the server's SPIFFE ID
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", ports["tcp_in"]), timeout=5) as tcp:
                tcp.sendall(b"PING\r\n")
                assert tcp.recv(100) == b"PING\r\n"
                break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the TCP listeners arrive with a push
    customer.wait_for(lambda: 'destination_principal="spiffe://cluster.local/ns/tutorial/sa/preference"' in "".join(
        line for line in customer.admin("/stats/prometheus")[1].splitlines()
        if line.startswith("istio_tcp_connections_closed_total")), "TCP metrics with the server's principal")

    # the next connections resume the session of an earlier one (no certificates exchanged), counted
    # by both proxies; certificates live 4 s here, so a renewal in between may start a new session
    def total(proxy: Proxy, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in proxy.admin("/stats/prometheus")[1].splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    for _ in range(10):
        with socket.create_connection(("127.0.0.1", ports["tcp_in"]), timeout=5) as tcp:
            tcp.sendall(b"PING\r\n")
            assert tcp.recv(100) == b"PING\r\n"
        if total(customer, "triomesh_upstream_tls_session_reused_total"):
            break
    assert total(customer, "triomesh_upstream_tls_session_reused_total") >= 1
    server.wait_for(lambda: total(server, "triomesh_tls_session_reused_total") >= 1,
                    "the server's count of resumed handshakes")

    # DestinationRule ISTIO_MUTUAL to an endpoint without the label: the server's SPIFFE ID is checked
    # against subjectAltNames (a mismatch fails the handshake: 503 UF, fail_verify_san)
    assert request(ports["egress"], "preference-direct:8080")[0] == 200
    status, body = request(ports["egress"], "preference-wrong:8080")
    assert status == 503, (status, body)
    assert 'reason="fail_verify_san"' in customer.admin("/stats/prometheus")[1]

    # plaintext straight to the STRICT inbound port: closed without an answer
    with socket.create_connection(("127.0.0.1", ports["inbound"]), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nhost: preference\r\n\r\n")
        try:
            assert plain.recv(100) == b""
        except ConnectionResetError:
            pass
    # TLS without a mesh certificate: the handshake fails (the certificate is required)
    s_client = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{ports['inbound']}",
                               "-alpn", "istio-http/1.1", "-CAfile", str(ca_dir / "root-cert.pem"), "-ign_eof"],
                              input=b"GET / HTTP/1.1\r\nhost: preference\r\n\r\n", capture_output=True, timeout=30)
    assert b"200 OK" not in s_client.stdout
    # TLS 1.3: the server's alert comes after the client's side of the handshake (-ign_eof waits for it)
    assert b"alert certificate required" in s_client.stderr, s_client.stderr
    # the server's certificate is the mesh identity of the preference workload
    shown = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{ports['inbound']}", "-alpn", "istio",
                            "-showcerts"], input=b"", capture_output=True, timeout=30)
    leaf = shown.stdout.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=leaf[leaf.index(b"-----BEGIN"):],
                          capture_output=True, timeout=10).stdout
    assert b"URI:spiffe://cluster.local/ns/tutorial/sa/preference" in text, text

    # a Gateway server in ISTIO_MUTUAL presents the workload certificate and wants a mesh one
    ca = CertificateAuthority.load(ca_dir, "cluster.local")
    for service_account in ("curl", "customer"):
        spiffe = SpiffeId("cluster.local", "tutorial", service_account)
        key_and_request = new_key_and_request(spiffe)
        (tmp_path / f"{service_account}.pem").write_bytes(ca.issue(key_and_request.csr_pem, spiffe, 3600).chain_pem)
        (tmp_path / f"{service_account}.key").write_bytes(key_and_request.private_key_pem)
    # -k: a workload certificate names a SPIFFE ID, no DNS name for curl to check
    curl = ["curl", "-sS", "-k", f"https://127.0.0.1:{ports['gateway']}/"]

    def curl_as(service_account: str) -> subprocess.CompletedProcess:
        return subprocess.run([*curl, "--cert", str(tmp_path / f"{service_account}.pem"),
                               "--key", str(tmp_path / f"{service_account}.key")], capture_output=True, timeout=30)

    deadline = time.monotonic() + 15
    while (answer := curl_as("customer")).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the gateway listener arrives with a push
    assert answer.returncode == 0 and b"preference-v1" in answer.stdout, (answer.stdout, answer.stderr)
    # the workload's ALLOW policy sees the gateway client's principal too
    assert curl_as("curl").stdout == b"RBAC: access denied"
    # without a client certificate: the handshake fails (curl reports the alert or the close, by timing)
    without = subprocess.run(curl, capture_output=True, timeout=30)
    assert without.returncode != 0 and without.stdout == b"", without
    server.wait_for(lambda: 'reason="fail_verify_no_cert"' in server.admin("/stats/prometheus")[1],
                    "the gateway's handshake failure counted")

    # denied: another workload of the namespace, with its own mesh identity (403 from RBAC)
    intruder = sidecar("intruder-v1", "intruder", "app=intruder")
    intruder.wait_for(lambda: intruder.config_dump()["workload_identity"].get("serial"), "a workload certificate")
    deadline = time.monotonic() + 15
    while (status := request(ports["egress_other"]))[0] != 403 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == (403, "RBAC: access denied"), status

    # rotation under load: certificates live 4 s; ~20 s of steady traffic, not one failure
    def issued() -> dict[str, int]:
        records = [r for r in cp.log_records() if r.get("event") == "certificate_issued"]
        return {node: sum(1 for r in records if r.get("node_id") == node) for node in ("preference-v1", "customer-v1")}

    before = issued()
    started = time.monotonic()
    ok, failures = steady_load(ports["egress"], connections=2, total=12000, max_s=18)
    assert failures == [] and ok > 500, (ok, failures[:5])
    after = issued()
    # both sides renewed several times while the traffic ran
    if time.monotonic() - started > 10:
        assert all(after[node] - before[node] >= 2 for node in after), (before, after)
    else:
        assert all(after[node] - before[node] >= 1 for node in after), (before, after)
