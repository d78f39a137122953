"""x-forwarded-client-cert on a sidecar's inbound side, as Istio configures Envoy there
(APPEND_FORWARD, with the subject, URI and DNS SANs): over mesh mutual TLS the app sees the client
sidecar's element appended to what came, on every request of a kept-alive connection; over
plaintext (a PERMISSIVE port) a client's own header never reaches the app. Real sockets on
127.0.0.1, certificates from the mesh CA, the app reading the header off the wire."""

from __future__ import annotations

import hashlib
import ssl

import trio

from controlplane.ca import CertificateAuthority
from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.identity.holder import IdentityHolder
from proxy.l4.transparent import CaptureServer, CaptureSettings
from proxy.l7.dataplane import DataPlane
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from proxy.tls import mesh
from tests.l4.harness import tcp_server
from tests.l4.test_inbound_security import Capture
from tests.l4.test_mesh_mtls import issue, mesh_client

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
  mtls: {mode: PERMISSIVE}
"""


async def _xfcc_app(stream: trio.SocketStream) -> None:
    """A keep-alive HTTP/1.1 app answering each request with its x-forwarded-client-cert lines
    (one per line, "-" when there is none)."""
    async with stream:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            values = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
                      if line.split(b":", 1)[0].strip().lower() == b"x-forwarded-client-cert"]
            body = b"\n".join(values) or b"-"
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


async def _exchange(stream, request: bytes) -> bytes:
    """One request on a kept-alive connection; the response body."""
    await stream.send_all(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += await stream.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


async def test_inbound_mtls_appends_the_client_element_and_plaintext_loses_the_header(nursery, tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    sleep = issue(ca, "foo", "sleep")
    sleep_der = ssl.PEM_cert_to_DER_cert(sleep.certificate_chain_pem.decode().split("-----END CERTIFICATE-----")[0]
                                         + "-----END CERTIFICATE-----\n")
    async with tcp_server(_xfcc_app) as app_port:
        snapshot = compile_resources(load_bytes(CONFIG.replace("APP_PORT", str(app_port)), "sidecar.yaml"),
                                     version="1", proxy_labels={"app": "httpbin"}, proxy_namespace="foo")
        stats = Stats()
        plane = DataPlane(SnapshotHolder(snapshot), stats)
        plane.workload_identity = IdentityHolder()
        plane.workload_identity.swap(issue(ca, "foo", "httpbin"))
        capture = Capture(CaptureServer(plane, stats, nursery, CaptureSettings(sniff_timeout_s=0.5)), nursery)
        element = (b"By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=" + hashlib.sha256(sleep_der).hexdigest().encode()
                   + b';Subject="";URI=spiffe://cluster.local/ns/foo/sa/sleep')
        with trio.fail_after(20):
            client = await mesh_client(capture, HTTP_PORT, sleep, mesh.ISTIO_HTTP1, ca.trust_bundle_pem)
            # what came (here written by the client itself) stays, the verified element is appended
            seen = await _exchange(client, b"GET / HTTP/1.1\r\nhost: httpbin\r\n"
                                           b"x-forwarded-client-cert: By=spiffe://forged;URI=spiffe://forged\r\n\r\n")
            assert seen == b"By=spiffe://forged;URI=spiffe://forged," + element
            # the next request on the connection carries it too; two fields that came are joined
            seen = await _exchange(client, b"GET / HTTP/1.1\r\nhost: httpbin\r\nx-forwarded-client-cert: a\r\n"
                                           b"x-forwarded-client-cert: b\r\n\r\n")
            assert seen == b"a,b," + element
            assert await _exchange(client, b"GET / HTTP/1.1\r\nhost: httpbin\r\n\r\n") == element
            await client.aclose()

            # plaintext on the PERMISSIVE port: no certificate was verified, a client's header is removed
            async with await capture.connect(HTTP_PORT) as plain:
                seen = await _exchange(plain, b"GET / HTTP/1.1\r\nhost: httpbin\r\n"
                                              b"x-forwarded-client-cert: " + element + b"\r\n\r\n")
                assert seen == b"-"
