"""A Gateway's client certificates, in the real `triomesh proxy` process driven by curl: mode
OPTIONAL_MUTUAL (a certificate asked for, verified when sent, not required), and
x-forwarded-client-cert as Istio's gateways write it (SANITIZE_SET with the certificate, subject,
URI and DNS SANs): set from the verified certificate over mutual TLS, whatever the client sent;
removed over SIMPLE TLS, over OPTIONAL_MUTUAL without a certificate and over plaintext HTTP. The
expected subject is OpenSSL's own RFC 2253 printing of the certificate (`openssl x509 -nameopt
RFC2253`), the hash the SHA-256 of its DER."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from tests.runner.harness import Proxy, free_port
from tests.tls.certs import write_cert

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  servers:
  - port: {number: MTLS_PORT, name: https-mtls, protocol: HTTPS}
    hosts: ["mtls.example.com"]
    tls: {mode: MUTUAL, serverCertificate: SERVER_CERT, privateKey: SERVER_KEY, caCertificates: CA_FILE}
  - port: {number: OPTIONAL_PORT, name: https-optional, protocol: HTTPS}
    hosts: ["optional.example.com"]
    tls: {mode: OPTIONAL_MUTUAL, serverCertificate: SERVER_CERT, privateKey: SERVER_KEY, caCertificates: CA_FILE}
  - port: {number: SIMPLE_PORT, name: https-simple, protocol: HTTPS}
    hosts: ["simple.example.com"]
    tls: {mode: SIMPLE, serverCertificate: SERVER_CERT, privateKey: SERVER_KEY}
  - port: {number: HTTP_PORT, name: http, protocol: HTTP}
    hosts: ["plain.example.com"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: BACKEND_PORT}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [mtls.example.com, optional.example.com, simple.example.com, plain.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: web.shop.svc.cluster.local, port: {number: 8080}}}]
"""

FORGED = "By=spiffe://forged;Hash=00;URI=spiffe://cluster.local/ns/admin/sa/root"


class XfccBackend:
    """An HTTP/1.1 server answering each GET with its x-forwarded-client-cert fields, one per line
    ("-" when there is none)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = ("\n".join(self.headers.get_all("x-forwarded-client-cert") or []) or "-").encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-xfcc")
    ca, other_ca = trustme.CA(), trustme.CA()
    for name in ("server", "client", "stranger"):
        (tmp / name).mkdir()
    server = write_cert(ca, tmp / "server", "server", "mtls.example.com", "optional.example.com", "simple.example.com")
    client = write_cert(ca, tmp / "client", "client", "client.example.com", "client-2.example.com")
    stranger = write_cert(other_ca, tmp / "stranger", "stranger", "client.example.com")
    backend = XfccBackend()
    ports = {name: free_port() for name in ("MTLS_PORT", "OPTIONAL_PORT", "SIMPLE_PORT", "HTTP_PORT")}
    text = CONFIG
    for name, value in {**ports, "SERVER_CERT": server.cert, "SERVER_KEY": server.key, "CA_FILE": server.ca,
                        "BACKEND_PORT": backend.port}.items():
        text = text.replace(name, str(value))
    config = tmp / "gateway.yaml"
    config.write_text(text)
    proxy = Proxy(config=config, workdir=tmp, concurrency=1, access_log="off")
    proxy.start()
    try:
        yield {"proxy": proxy, "ports": ports, "ca_file": server.ca, "client": client, "stranger": stranger}
    finally:
        proxy.stop()
        backend.close()


def _get(gateway, host: str, port_name: str, *extra: str) -> subprocess.CompletedProcess:
    port = gateway["ports"][port_name]
    scheme = "http" if port_name == "HTTP_PORT" else "https"
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", gateway["ca_file"], "--resolve",
                           f"{host}:{port}:127.0.0.1", "-H", f"x-forwarded-client-cert: {FORGED}", *extra,
                           f"{scheme}://{host}:{port}/"], capture_output=True, text=True, timeout=20)


def _expected_element(cert_file: str) -> str:
    """What Envoy writes for this client certificate on a gateway (no By: the gateway's own
    certificate has no URI SAN; `URI=` stays when the client's has none either)."""
    pem = Path(cert_file).read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    der = ssl.PEM_cert_to_DER_cert(pem)
    encoded = pem
    for raw, escaped in (("\n", "%0A"), (" ", "%20"), ("+", "%2B"), ("/", "%2F"), ("=", "%3D")):
        encoded = encoded.replace(raw, escaped)
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", cert_file],
                             capture_output=True, text=True, check=True).stdout.strip().removeprefix("subject=")
    return (f'Hash={hashlib.sha256(der).hexdigest()};Cert="{encoded}";Subject="{subject}";'
            "URI=;DNS=client.example.com;DNS=client-2.example.com")


def test_mutual_sets_the_verified_certificate_over_what_the_client_sent(gateway):
    client = gateway["client"]
    for version in ("--http1.1", "--http2"):
        seen = _get(gateway, "mtls.example.com", "MTLS_PORT", version, "--cert", client.cert, "--key", client.key)
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout == _expected_element(client.cert)


def test_optional_mutual_verifies_a_certificate_when_one_comes(gateway):
    client, stranger = gateway["client"], gateway["stranger"]
    with_cert = _get(gateway, "optional.example.com", "OPTIONAL_PORT", "--cert", client.cert, "--key", client.key)
    assert with_cert.returncode == 0, with_cert.stderr
    assert with_cert.stdout == _expected_element(client.cert)
    # no certificate: served, and the client's own header does not pass
    without = _get(gateway, "optional.example.com", "OPTIONAL_PORT")
    assert (without.returncode, without.stdout) == (0, "-"), without.stderr
    # a certificate from a CA the server does not trust: the handshake fails
    refused = _get(gateway, "optional.example.com", "OPTIONAL_PORT", "--cert", stranger.cert, "--key", stranger.key)
    assert refused.returncode != 0 and refused.stdout == ""
    proxy = gateway["proxy"]
    listener = f"127.0.0.1_{gateway['ports']['OPTIONAL_PORT']}"
    errors = proxy.wait_for(lambda: proxy.stats("triomesh_tls_handshake_error_total").get(
        (("listener", listener), ("reason", "fail_verify_error"))), "the untrusted certificate counted")
    assert errors == 1


def test_simple_tls_and_plaintext_remove_the_header(gateway):
    simple = _get(gateway, "simple.example.com", "SIMPLE_PORT")
    assert (simple.returncode, simple.stdout) == (0, "-"), simple.stderr
    plain = _get(gateway, "plain.example.com", "HTTP_PORT")
    assert (plain.returncode, plain.stdout) == (0, "-"), plain.stderr
