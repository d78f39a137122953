"""A MUTUAL Gateway server in the real `triomesh proxy` process hands the client certificate's SPIFFE
identity to AuthorizationPolicy: `principals` and `namespaces` rules decide on it (curl with client
certificates from our own CA), and `connection.sni` sees the name the client asked for."""

from __future__ import annotations

from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca import CertificateAuthority, server_names
from tests.integration.l7_harness import curl
from tests.runner.harness import Backend, Proxy, free_port

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  servers:
  - port: {number: MTLS_PORT, name: https-mtls, protocol: HTTPS}
    hosts: ["api.example.com"]
    tls: {mode: MUTUAL, serverCertificate: SERVER_CERT, privateKey: SERVER_KEY, caCertificates: ROOT}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend, namespace: shop}
spec:
  hosts: [backend]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: BACKEND_PORT}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: backend}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: buyers-only, namespace: istio-system}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/buyer"]}}]
  - from: [{source: {namespaces: ["audit"]}}]
    to: [{operation: {methods: [GET]}}]
    when: [{key: connection.sni, values: ["api.example.com"]}]
"""


def _leaf(authority: CertificateAuthority, directory: Path, name: str, names) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue_for_key(key.public_key(), names, 3600)
    cert, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.chain_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert), str(key_file)


def _workload(authority: CertificateAuthority, directory: Path, namespace: str, account: str) -> tuple[str, str]:
    uri = x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/{namespace}/sa/{account}")
    return _leaf(authority, directory, f"{namespace}-{account}", [uri])


async def test_client_certificate_identity_decides(tmp_path):
    authority = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    root = tmp_path / "root.pem"
    root.write_bytes(authority.trust_bundle_pem)
    server_cert, server_key = _leaf(authority, tmp_path, "server", server_names(["api.example.com"]))
    backend = Backend("backend")
    port = free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(CONFIG.replace("MTLS_PORT", str(port)).replace("SERVER_CERT", server_cert)
                      .replace("SERVER_KEY", server_key).replace("ROOT", str(root))
                      .replace("BACKEND_PORT", str(backend.port)))
    proxy = Proxy(config=config, workdir=tmp_path, concurrency=1)
    await trio.to_thread.run_sync(proxy.start)
    url = f"https://api.example.com:{port}/orders"
    base = ("-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(root), "--resolve", f"api.example.com:{port}:127.0.0.1")

    async def status(namespace: str, account: str, *extra: str) -> str:
        cert, key = _workload(authority, tmp_path, namespace, account)
        code, out, err = await curl(*base, "--cert", cert, "--key", key, *extra, url)
        assert code == 0, err
        return out

    try:
        for flags in (("--http1.1",), ("--http2",)):
            assert await status("shop", "buyer", *flags) == "200"  # the principal rule
            assert await status("shop", "seller", *flags) == "403"  # same namespace, another account
            assert await status("audit", "reader", *flags) == "200"  # namespace + method + SNI
            assert await status("audit", "reader", "-X", "POST", *flags) == "403"
        denied = await trio.to_thread.run_sync(proxy.stats, "triomesh_rbac_denied_total")
        assert sum(denied.values()) == 4
    finally:
        await trio.to_thread.run_sync(proxy.stop)
        backend.close()
