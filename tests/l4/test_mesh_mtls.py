"""Inbound mesh mutual TLS on a sidecar's inbound capture, over real sockets on 127.0.0.1 with
certificates from the mesh CA (controlplane/ca.py): STRICT terminates mesh mTLS with the workload
certificate and refuses plaintext and TLS without a mesh certificate; PERMISSIVE terminates a
ClientHello offering `istio` ALPN and passes other TLS and plaintext through; the verified SPIFFE ID
is what AuthorizationPolicy principals see; a renewed certificate serves new handshakes while open
connections keep theirs."""

from __future__ import annotations

import ssl

import trio

from controlplane.ca import CertificateAuthority
from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.identity.csr import new_key_and_request
from proxy.identity.holder import IdentityHolder
from proxy.identity.spiffe import SpiffeId
from proxy.identity.workload import WorkloadIdentity
from proxy.l7.dataplane import DataPlane
from proxy.l4.transparent import CaptureServer, CaptureSettings
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from proxy.tls import mesh
from tests.l4.harness import receive_all, tcp_server
from tests.l4.test_inbound_security import Capture, _closed_unanswered, _echo_handler, _http_handler
from tests.l4.tls_fixtures import client_hello
from tests.tls.certs import stdlib_mesh_context

HTTP_PORT = 9080

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: httpbin, namespace: foo}
spec:
  workloadSelector: {labels: {app: httpbin}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:APP_PORT
    captureMode: IPTABLES
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls:
    ECHO_PORT: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
  - to: [{operation: {ports: ["ECHO_PORT"]}}]
"""


def issue(ca: CertificateAuthority, namespace: str, service_account: str, ttl_s: float = 3600) -> WorkloadIdentity:
    spiffe = SpiffeId("cluster.local", namespace, service_account)
    request = new_key_and_request(spiffe)
    issued = ca.issue(request.csr_pem, spiffe, ttl_s)
    return WorkloadIdentity.from_pem(issued.chain_pem, request.private_key_pem, ca.trust_bundle_pem)


async def mesh_client(capture: Capture, port: int, identity: WorkloadIdentity | None, alpn: str,
                      trust_bundle: bytes) -> trio.SSLStream:
    """A TLS client as a sidecar originates it (with `identity`), or without a client certificate."""
    if identity is not None:
        context = stdlib_mesh_context(identity, server_side=False, alpn=(alpn,))
    else:
        context = ssl.create_default_context(cadata=trust_bundle.decode())
        context.check_hostname = False
        context.set_alpn_protocols([alpn])
    stream = trio.SSLStream(await capture.connect(port), context, server_hostname="outbound_.9080_._.httpbin")
    await stream.do_handshake()
    return stream


async def test_inbound_mesh_mtls_strict_permissive_principals_and_renewal(nursery, tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    bundle = ca.trust_bundle_pem
    sleep, intruder = issue(ca, "foo", "sleep"), issue(ca, "foo", "intruder")
    async with tcp_server(_http_handler) as app_port, tcp_server(_echo_handler) as echo_port:
        text = CONFIG.replace("APP_PORT", str(app_port)).replace("ECHO_PORT", str(echo_port))
        snapshot = compile_resources(load_bytes(text, "sidecar.yaml"), version="1", proxy_labels={"app": "httpbin"},
                                     proxy_namespace="foo")
        stats = Stats()
        plane = DataPlane(SnapshotHolder(snapshot), stats)
        plane.workload_identity = IdentityHolder()
        first = issue(ca, "foo", "httpbin")
        plane.workload_identity.swap(first)
        capture = Capture(CaptureServer(plane, stats, nursery, CaptureSettings(sniff_timeout_s=0.5)), nursery)

        def outcome(port: int, name: str) -> int:
            return stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(port), outcome=name).value

        with trio.fail_after(20):
            # STRICT HTTP port, mesh mTLS (istio-http/1.1): the allowed principal is served
            client = await mesh_client(capture, HTTP_PORT, sleep, mesh.ISTIO_HTTP1, bundle)
            assert client.selected_alpn_protocol() == mesh.ISTIO_HTTP1
            server_cert = client.getpeercert()
            assert ("URI", "spiffe://cluster.local/ns/foo/sa/httpbin") in server_cert["subjectAltName"]
            await client.send_all(b"GET / HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n")
            reply = await receive_all(client)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"app"), reply
            # another mesh identity: the principals rule does not match, 403
            client = await mesh_client(capture, HTTP_PORT, intruder, mesh.ISTIO_HTTP1, bundle)
            await client.send_all(b"GET / HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n")
            assert (await receive_all(client)).startswith(b"HTTP/1.1 403 Forbidden")
            assert outcome(HTTP_PORT, "mtls") == 2

            # STRICT: plaintext closed unanswered; TLS without a mesh certificate fails its handshake
            async with await capture.connect(HTTP_PORT) as plain:
                await plain.send_all(b"GET / HTTP/1.1\r\nhost: httpbin\r\n\r\n")
                assert await _closed_unanswered(plain)
            assert outcome(HTTP_PORT, "refused") == 1
            try:  # TLS 1.3: the client's handshake ends before the server checks its (missing) certificate
                anonymous = await mesh_client(capture, HTTP_PORT, None, mesh.ISTIO_HTTP1, bundle)
                await anonymous.send_all(b"GET / HTTP/1.1\r\nhost: httpbin\r\n\r\n")
                assert await anonymous.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass
            await trio.sleep(0.05)
            assert stats.counter("triomesh_sidecar_inbound_mtls_handshake_fail_total", port=str(HTTP_PORT),
                                 reason="fail_verify_no_cert").value == 1

            # PERMISSIVE port: istio ALPN terminated (the echo sees plaintext), other TLS and plaintext pass
            client = await mesh_client(capture, echo_port, sleep, mesh.ISTIO_TCP, bundle)
            await client.send_all(b"hi")
            assert await client.receive_some(100) == b"echo hi"
            await client.aclose()
            hello = client_hello("app.example", ["h2"])
            async with await capture.connect(echo_port) as raw:
                await raw.send_all(hello)
                assert await raw.receive_some(len(hello) + 5) == b"echo " + hello
            async with await capture.connect(echo_port) as raw:
                await raw.send_all(b"plain")
                assert await raw.receive_some(100) == b"echo plain"
            assert (outcome(echo_port, "mtls"), outcome(echo_port, "tls_passthrough"),
                    outcome(echo_port, "plaintext")) == (1, 1, 1)

            # renewal: new handshakes get the new certificate, an open connection keeps working
            held = await mesh_client(capture, echo_port, sleep, mesh.ISTIO_TCP, bundle)
            renewed = issue(ca, "foo", "httpbin")
            plane.workload_identity.swap(renewed)
            fresh = await mesh_client(capture, echo_port, sleep, mesh.ISTIO_TCP, bundle)
            serial = int(fresh.getpeercert()["serialNumber"], 16)
            assert format(serial, "x") == renewed.serial != first.serial
            for stream in (held, fresh):
                await stream.send_all(b"again")
                assert await stream.receive_some(100) == b"echo again"
                await stream.aclose()
