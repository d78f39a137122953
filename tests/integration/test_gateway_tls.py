"""Gateway TLS in the real `triomesh proxy` process, driven by curl and openssl s_client: SIMPLE with
two certificates on one port chosen by SNI (files and credentialName), HTTP/1.1 and HTTP/2 over TLS,
MUTUAL with and without a client certificate, httpsRedirect, PASSTHROUGH by SNI to a TLS backend,
a certificate replaced while a keep-alive connection stays open, a bad replacement kept out, and the
stats and /certs that show all of it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trio
import trustme

from proxy.tls.conn import TlsConn
from proxy.tls.context import client_context

from tests.runner.harness import Backend, Proxy, free_port
from tests.tls.certs import CertFiles, write_cert

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  servers:
  - port: {number: HTTPS_PORT, name: https-a, protocol: HTTPS}
    hosts: ["a.example.com"]
    tls: {mode: SIMPLE, serverCertificate: A_CERT, privateKey: A_KEY}
  - port: {number: HTTPS_PORT, name: https-b, protocol: HTTPS}
    hosts: ["shop/b.example.com"]
    tls: {mode: SIMPLE, credentialName: b-credential}
  - port: {number: MTLS_PORT, name: https-mtls, protocol: HTTPS}
    hosts: ["mtls.example.com"]
    tls: {mode: MUTUAL, credentialName: mtls-credential, minProtocolVersion: TLSV1_3}
  - port: {number: HTTP_PORT, name: http, protocol: HTTP}
    hosts: ["a.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: PASSTHROUGH_PORT, name: tls, protocol: TLS}
    hosts: ["pass.example.com", "refused.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: TCP_TLS_PORT, name: tls-echo, protocol: TLS}
    hosts: ["echo.example.com", "refused.example.com"]
    tls: {mode: SIMPLE, credentialName: echo-credential}
  - port: {number: ROTATE_PORT, name: https-rotate, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialName: rotating}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 127.0.0.1, ports: {http: A_BACKEND}, labels: {version: a}}
  - {address: 127.0.0.1, ports: {http: B_BACKEND}, labels: {version: b}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web.shop.svc.cluster.local
  subsets:
  - {name: a, labels: {version: a}}
  - {name: b, labels: {version: b}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pass, namespace: shop}
spec:
  hosts: [pass.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS}]
  endpoints:
  - {address: 127.0.0.1, ports: {tls: PASS_BACKEND}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  endpoints:
  - {address: 127.0.0.1, ports: {tcp: ECHO_BACKEND}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo.example.com]
  gateways: [edge]
  tcp:
  - route: [{destination: {host: echo.shop.svc.cluster.local, port: {number: 9000}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: shop}
spec:
  hosts: [a.example.com, mtls.example.com, rotate.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: web, port: {number: 8080}, subset: a}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop}
spec:
  hosts: [b.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: web, port: {number: 8080}, subset: b}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass, namespace: shop}
spec:
  hosts: [pass.example.com]
  gateways: [edge]
  tls:
  - match: [{sniHosts: [pass.example.com, refused.example.com]}]
    route: [{destination: {host: pass.example.com, port: {number: 443}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: refuse-by-sni, namespace: istio-system}
spec:
  action: DENY
  rules: [{when: [{key: connection.sni, values: [refused.example.com]}]}]
"""


class TlsBackend:
    """A stdlib TLS server on 127.0.0.1 answering every connection's first request with a fixed
    HTTP/1.1 response naming itself (the PASSTHROUGH upstream)."""

    def __init__(self, files: CertFiles) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(files.cert, files.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(5)
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 19\r\nconnection: close\r\n\r\npassthrough-backend")
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


class EchoBackend:
    """A plain TCP server on 127.0.0.1 answering each connection's bytes with "echo " + the bytes,
    then ending its side when the client ends its own (the upstream of the TLS-terminating server)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while chunk := conn.recv(65536):
                        data += chunk
                    conn.sendall(b"echo " + data)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def _credential(ca: trustme.CA, credentials: Path, name: str, *hosts: str, with_ca: bool = False) -> None:
    directory = credentials / name
    directory.mkdir(parents=True)
    files = write_cert(ca, directory, "leaf", *hosts)
    Path(files.cert).rename(directory / "tls.crt")
    Path(files.key).rename(directory / "tls.key")
    if not with_ca:
        (directory / "ca.crt").unlink()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-tls")
    ca = trustme.CA()
    (tmp / "a").mkdir()
    a = write_cert(ca, tmp / "a", "a", "a.example.com")
    credentials = tmp / "credentials"
    _credential(ca, credentials, "b-credential", "b.example.com")
    _credential(ca, credentials, "mtls-credential", "mtls.example.com", with_ca=True)
    _credential(ca, credentials, "rotating", "rotate.example.com")
    _credential(ca, credentials, "echo-credential", "echo.example.com", "refused.example.com")
    echo = EchoBackend()
    (tmp / "pass").mkdir()
    passthrough = TlsBackend(write_cert(ca, tmp / "pass", "pass", "pass.example.com"))
    (tmp / "client").mkdir()
    client = write_cert(ca, tmp / "client", "client", "client.example.com")
    backend_a, backend_b = Backend("backend-a"), Backend("backend-b")
    ports = {name: free_port() for name in ("HTTPS_PORT", "MTLS_PORT", "HTTP_PORT", "PASSTHROUGH_PORT", "ROTATE_PORT",
                                             "TCP_TLS_PORT")}
    text = CONFIG
    for name, value in {**ports, "A_CERT": a.cert, "A_KEY": a.key, "A_BACKEND": backend_a.port,
                        "B_BACKEND": backend_b.port, "PASS_BACKEND": passthrough.port, "ECHO_BACKEND": echo.port}.items():
        text = text.replace(name, str(value))
    config = tmp / "gateway.yaml"
    config.write_text(text)
    proxy = Proxy(config=config, workdir=tmp, concurrency=1, access_log="off",
                  extra_args=["--credentials-dir", str(credentials)])
    proxy.start()
    try:
        yield {"proxy": proxy, "ports": ports, "ca": ca, "ca_file": a.ca, "client": client, "tmp": tmp,
               "credentials": credentials}
    finally:
        proxy.stop()
        backend_a.close()
        backend_b.close()
        passthrough.close()
        echo.close()


def _curl(*args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=timeout_s)


def _https(gateway, host: str, port_name: str, *extra: str, path: str = "/hello") -> subprocess.CompletedProcess:
    port = gateway["ports"][port_name]
    return _curl("--cacert", gateway["ca_file"], "--resolve", f"{host}:{port}:127.0.0.1", *extra,
                 f"https://{host}:{port}{path}")


def _peer_subject(port: int, server_name: str | None) -> str:
    """The subject of the certificate the gateway presents, by openssl s_client."""
    sni = ["-servername", server_name] if server_name else ["-noservername"]
    shown = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *sni, "-brief"],
                           input="", capture_output=True, text=True, timeout=20)
    for line in (shown.stdout + shown.stderr).splitlines():
        if line.startswith("Peer certificate:"):
            return line.split(":", 1)[1].strip()
    return f"no certificate: {shown.stdout}{shown.stderr}"


def _subject_of(cert_file: str) -> str:
    return subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", cert_file],
                          capture_output=True, text=True, check=True).stdout


def _serial_mark(subject: str) -> str:
    mark = re.search(r"Testing cert #[\w-]+", subject)
    assert mark is not None, subject
    return mark.group(0)


def test_simple_http1_and_http2_with_a_certificate_per_sni(gateway):
    one = _https(gateway, "a.example.com", "HTTPS_PORT", "--http1.1", "-w", " %{http_version}")
    assert one.returncode == 0, one.stderr
    assert one.stdout == "backend-a /hello 1.1"
    two = _https(gateway, "b.example.com", "HTTPS_PORT", "--http2", "-w", " %{http_version}")
    assert two.returncode == 0, two.stderr
    assert two.stdout == "backend-b /hello 2"
    # each server serves its own hosts only: a.example.com's Host over b.example.com's TLS finds no route
    crossed = _https(gateway, "b.example.com", "HTTPS_PORT", "-H", "host: a.example.com", "-o", "/dev/null",
                     "-w", "%{http_code}")
    assert crossed.stdout == "404", crossed
    # plaintext HTTP to the TLS port: no answer, the handshake failure counted as such
    plain = _curl(f"http://127.0.0.1:{gateway['ports']['HTTPS_PORT']}/hello")
    assert plain.returncode != 0 and plain.stdout == ""
    proxy = gateway["proxy"]
    listener = f"127.0.0.1_{gateway['ports']['HTTPS_PORT']}"
    errors = proxy.wait_for(lambda: proxy.stats("triomesh_tls_handshake_error_total").get(
        (("listener", listener), ("reason", "not_tls"))), "the plaintext request counted")
    assert errors == 1
    assert proxy.stats("triomesh_tls_handshake_total")[(("listener", listener),)] >= 3


def test_h2load_over_tls(gateway):
    """Many HTTP/2 streams at once over TLS: the codec's reader and writer share one TLS connection."""
    port = gateway["ports"]["HTTPS_PORT"]
    run = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "10", "--connect-to", f"127.0.0.1:{port}",
                          f"https://b.example.com:{port}/load"], capture_output=True, text=True, timeout=60)
    assert "400 succeeded, 0 failed, 0 errored" in run.stdout, run.stdout + run.stderr
    assert "Application protocol: h2" in run.stdout


def test_sni_chooses_the_certificate_and_no_sni_gets_the_first_server(gateway):
    port = gateway["ports"]["HTTPS_PORT"]
    a_cert = str(Path(gateway["ca_file"]).parent / "a.crt")
    b_cert = str(gateway["credentials"] / "b-credential" / "tls.crt")
    # trustme names each certificate "Testing cert #<unique>" in its subject
    assert _serial_mark(_peer_subject(port, "a.example.com")) == _serial_mark(_subject_of(a_cert))
    assert _serial_mark(_peer_subject(port, "b.example.com")) == _serial_mark(_subject_of(b_cert))
    assert _serial_mark(_peer_subject(port, None)) == _serial_mark(_subject_of(a_cert))
    assert _serial_mark(_subject_of(a_cert)) != _serial_mark(_subject_of(b_cert))
    # a name no server on the port takes: the handshake is refused (unrecognized_name)
    refused = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "c.example.com",
                              "-brief"], input="", capture_output=True, text=True, timeout=20)
    assert "unrecognized name" in (refused.stdout + refused.stderr).lower()


def test_mutual_needs_a_client_certificate(gateway):
    client = gateway["client"]
    ok = _https(gateway, "mtls.example.com", "MTLS_PORT", "--cert", client.cert, "--key", client.key)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "backend-a /hello"
    refused = _https(gateway, "mtls.example.com", "MTLS_PORT")
    assert refused.returncode != 0 and refused.stdout == ""
    proxy = gateway["proxy"]
    listener = f"127.0.0.1_{gateway['ports']['MTLS_PORT']}"
    errors = proxy.wait_for(lambda: proxy.stats("triomesh_tls_handshake_error_total"), "handshake error stats")
    assert errors[(("listener", listener), ("reason", "fail_verify_no_cert"))] >= 1
    # minProtocolVersion TLSV1_3: a TLS 1.2 client is refused
    too_old = _https(gateway, "mtls.example.com", "MTLS_PORT", "--cert", client.cert, "--key", client.key,
                     "--tls-max", "1.2")
    assert too_old.returncode != 0


def test_tls_termination_then_tcp(gateway):
    """Protocol TLS in mode SIMPLE: the gateway terminates, the tcp route takes the plaintext; the
    client's half-close reaches the upstream, whose answer and close come back over TLS."""
    port = gateway["ports"]["TCP_TLS_PORT"]
    payload = b"x" * 200_000 + b"end"

    async def exchange() -> bytes:
        # the stdlib's blocking client cannot half-close TLS; TlsConn can (close_notify, then FIN)
        conn = TlsConn(socket.create_connection(("127.0.0.1", port)), client_context(ca_file=gateway["ca_file"]),
                       server_side=False, server_hostname="echo.example.com")
        try:
            with trio.fail_after(20):
                await conn.handshake(10)
                await conn.send_all(payload)
                conn.shutdown_write()
                while await conn.fill():
                    pass
                return bytes(conn.take_buffered())
        finally:
            conn.close()

    assert trio.run(exchange) == b"echo " + payload
    # counted when the proxy's side of the connection ends, which may be just after the client's
    key = (("action", "tcp"), ("listener", f"127.0.0.1_{port}"))
    proxy = gateway["proxy"]
    proxy.wait_for(lambda: proxy.stats("triomesh_gateway_tcp_cx_total").get(key) == 1, "the connection counted",
                   timeout_s=5)


def test_authorization_on_tls_servers(gateway):
    """AuthorizationPolicy decides connections to PASSTHROUGH and terminating TLS servers too (by the
    ClientHello's SNI here): a denied one is closed before any upstream connection, counted and
    logged with the policy; the same servers still serve the names the policy does not refuse."""
    proxy = gateway["proxy"]
    # --insecure: the backend's certificate names pass.example.com only; let through, curl would get its page
    refused = _https(gateway, "refused.example.com", "PASSTHROUGH_PORT", "--insecure")
    assert refused.returncode != 0 and "passthrough-backend" not in refused.stdout, refused
    assert _https(gateway, "pass.example.com", "PASSTHROUGH_PORT").stdout == "passthrough-backend"
    port = gateway["ports"]["TCP_TLS_PORT"]

    async def echo(name: str) -> bytes:
        conn = TlsConn(socket.create_connection(("127.0.0.1", port)), client_context(ca_file=gateway["ca_file"]),
                       server_side=False, server_hostname=name)
        try:
            with trio.fail_after(20):
                await conn.handshake(10)
                await conn.send_all(b"ping")
                conn.shutdown_write()
                while await conn.fill():
                    pass
                return bytes(conn.take_buffered())
        except ConnectionError:
            return b""
        finally:
            conn.close()

    assert trio.run(echo, "refused.example.com") == b""
    assert trio.run(echo, "echo.example.com") == b"echo ping"
    denied = proxy.stats("triomesh_rbac_denied_total")
    for name in ("PASSTHROUGH_PORT", "TCP_TLS_PORT"):
        listener = f"127.0.0.1_{gateway['ports'][name]}"
        assert denied[(("listener", listener),)] == 1, (name, denied)
        proxy.wait_for(lambda listener=listener: proxy.stats("triomesh_gateway_tcp_cx_total").get(
            (("action", "denied"), ("listener", listener))) == 1, "the denial counted", timeout_s=5)
    logged = [r for r in proxy.log_records() if r.get("event") == "connection denied by authorization policy"]
    assert {r["listener"] for r in logged} >= {f"127.0.0.1_{port}", f"127.0.0.1_{gateway['ports']['PASSTHROUGH_PORT']}"}
    assert all(r["policy"] == "ns[istio-system]-policy[refuse-by-sni]-rule[0]" for r in logged), logged


def test_https_redirect(gateway):
    port = gateway["ports"]["HTTP_PORT"]
    redirected = _curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", "host: a.example.com",
                       f"http://127.0.0.1:{port}/path?q=1")
    assert redirected.stdout == "301 https://a.example.com/path?q=1", redirected


def test_passthrough_routes_by_sni(gateway):
    through = _https(gateway, "pass.example.com", "PASSTHROUGH_PORT")
    assert through.returncode == 0, through.stderr
    assert through.stdout == "passthrough-backend"  # the backend's own certificate, verified by curl
    other = _https(gateway, "other.example.com", "PASSTHROUGH_PORT")
    assert other.returncode != 0
    actions = gateway["proxy"].stats("triomesh_gateway_tcp_cx_total")
    listener = f"127.0.0.1_{gateway['ports']['PASSTHROUGH_PORT']}"
    assert actions[(("action", "no_route"), ("listener", listener))] >= 1


def test_certificate_reload_keeps_open_connections(gateway):
    proxy, ca, port = gateway["proxy"], gateway["ca"], gateway["ports"]["ROTATE_PORT"]
    directory = gateway["credentials"] / "rotating"
    context = ssl.create_default_context(cafile=gateway["ca_file"])

    def serial(tls: ssl.SSLSocket) -> int:
        return x509_serial(tls.getpeercert(binary_form=True))

    def fresh_serial() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="rotate.example.com") as tls:
                return serial(tls)

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="rotate.example.com") as kept:
        first = serial(kept)
        assert _request(kept) == b"backend-a /one"
        # a new certificate written as a secret volume would: new files renamed over the old ones
        replacement = write_cert(ca, gateway["tmp"], "rotated", "rotate.example.com")
        shutil.copy(replacement.key, directory / "tls.key.new")
        shutil.copy(replacement.cert, directory / "tls.crt.new")
        (directory / "tls.key.new").rename(directory / "tls.key")
        (directory / "tls.crt.new").rename(directory / "tls.crt")
        second = proxy.wait_for(lambda: (s := fresh_serial()) != first and s, "the new certificate on new handshakes")
        assert second == x509_serial_of_file(replacement.cert)
        assert _request(kept) == b"backend-a /one"  # the open connection goes on, on its old session

        # a bad replacement (a key that does not match) is refused; the last good certificate stays
        (gateway["tmp"] / "wrong").mkdir()
        wrong = write_cert(ca, gateway["tmp"] / "wrong", "wrong", "rotate.example.com")
        shutil.copy(wrong.key, directory / "tls.key")
        reloads = proxy.wait_for(lambda: proxy.stats("triomesh_tls_certificate_reload_total").get(
            (("certificate", str(directory / "tls.crt")), ("result", "failure"))), "the failed reload counted")
        assert reloads >= 1
        assert fresh_serial() == second
        assert _request(kept) == b"backend-a /one"
    certs = json.loads(proxy.admin("/certs")[1])["certificates"]
    rotating = next(c for c in certs if c["origin"] == "credentialName rotating")
    assert "does not match" in rotating["error"]
    assert rotating["cert_chain"][0]["subject_alt_names"] == ["DNS:rotate.example.com"]
    a = next(c for c in certs if c["server_names"] == ["a.example.com"])
    assert a["error"] == "" and a["cert_chain"][0]["days_until_expiration"] > 300


def _request(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET /one HTTP/1.1\r\nhost: rotate.example.com\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += tls.recv(65536)
    return body


def x509_serial(der: bytes) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def x509_serial_of_file(path: str) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificates(Path(path).read_bytes())[0].serial_number


def test_server_info_and_the_log_name_the_tls_library(gateway):
    """The data path's TLS runs on our BoringSSL build (native/build_boringssl.py, which make install
    runs), and the proxy says so: in /server_info and in each worker's log when it loads the library."""
    proxy = gateway["proxy"]
    code, text = proxy.admin("/server_info")
    assert code == 200, text
    info = json.loads(text)
    assert info["state"] == "LIVE"
    assert info["tls"] == {"library": "BoringSSL", "binding": "triomesh's own (native/build_boringssl.py)"}, info
    loaded = [r for r in proxy.log_records() if r.get("event") == "tls library loaded"]
    assert loaded and loaded[0]["library"] == info["tls"]["library"]
