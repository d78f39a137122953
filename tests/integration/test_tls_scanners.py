"""The gateway's TLS defaults, judged by real scanners: testssl.sh (protocols, cipher categories,
renegotiation, compression) and sslscan (every protocol and cipher suite offered), against a SIMPLE
HTTPS server in the real `triomesh proxy` on 127.0.0.1, asserted on their machine-readable output.
No setting in the Gateway but the certificate: these are the defaults a user gets."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET

import pytest
import trustme

from tests.runner.harness import Backend, Proxy, free_port
from tests.tls.certs import write_cert

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  servers:
  - port: {number: PORT, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: CERT, privateKey: KEY}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: BACKEND}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{route: [{destination: {host: web, port: {number: 8080}}}]}]
"""


@pytest.fixture(scope="module")
def gateway_port(tmp_path_factory):
    """A gateway with an RSA certificate, the common case (the tests in tests/tls use ECDSA ones)."""
    tmp = tmp_path_factory.mktemp("scan")
    files = write_cert(trustme.CA(key_type=trustme.KeyType.RSA), tmp, "gateway", "gateway.example.com")
    backend = Backend("web")
    port = free_port()
    config = tmp / "gateway.yaml"
    config.write_text(CONFIG.replace("PORT", str(port)).replace("CERT", files.cert).replace("KEY", files.key)
                      .replace("BACKEND", str(backend.port)))
    proxy = Proxy(config=config, workdir=tmp, concurrency=1, access_log="off").start()
    try:
        yield port, tmp
    finally:
        proxy.stop()
        backend.close()


def test_testssl(gateway_port):
    port, tmp = gateway_port
    report = tmp / "testssl.json"
    run = subprocess.run(
        ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--sneaky", "--fast", "--connect-timeout", "5",
         "--openssl-timeout", "5", "--jsonfile", str(report), "-p", "-s", "-R", "-C", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120)
    assert report.exists(), run.stdout + run.stderr
    findings = {item["id"]: item for item in json.loads(report.read_text())}
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[old]["finding"] == "not offered", findings[old]
    assert findings["TLS1_2"]["finding"] == "offered"
    assert findings["TLS1_3"]["finding"].startswith("offered")
    assert findings["ALPN_HTTP2"]["finding"] == "h2"
    for weak in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA",
                 "cipherlist_AVERAGE"):  # AVERAGE: CBC suites without AEAD
        assert findings[weak]["finding"] == "not offered", findings[weak]
    assert findings["cipherlist_STRONG"]["finding"] == "offered"
    assert findings["secure_client_renego"]["finding"] == "not vulnerable"
    assert findings["CRIME_TLS"]["finding"] == "not vulnerable"  # no TLS compression
    assert findings["service"]["finding"] == "HTTP"  # HTTP answered over the TLS connection
    assert not [item for item in findings.values() if item["severity"] in ("LOW", "MEDIUM", "HIGH", "CRITICAL")]


def test_sslscan(gateway_port):
    port, tmp = gateway_port
    report = tmp / "sslscan.xml"
    run = subprocess.run(["sslscan", "--no-colour", f"--xml={report}", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    test = ET.parse(report).getroot().find("ssltest")
    offered = {(p.get("type"), p.get("version")) for p in test.iter("protocol") if p.get("enabled") == "1"}
    assert offered == {("tls", "1.2"), ("tls", "1.3")}
    assert test.find("renegotiation").get("supported") == "0"
    assert all(h.get("vulnerable") == "0" for h in test.iter("heartbleed"))
    ciphers = list(test.iter("cipher"))
    assert ciphers
    for cipher in ciphers:
        assert cipher.get("strength") in ("strong", "acceptable"), cipher.attrib
        assert int(cipher.get("bits")) >= 128, cipher.attrib
        name = cipher.get("cipher")
        assert ("GCM" in name or "CHACHA20" in name) and not any(bad in name for bad in ("CBC", "RC4", "DES", "NULL", "SHA1"))
        if cipher.get("sslversion") == "TLSv1.2":
            assert name.startswith("ECDHE-"), cipher.attrib  # forward secrecy
