"""Gateway `servers[].tls` compiled from real YAML and real certificate files: what each mode becomes,
and a precise error (file, resource, field path, reason) for every way the settings can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from proxy.config.errors import ConfigError
from tests.config.helpers import compile_docs, doc
from tests.tls.certs import write_cert


def _gateway(*servers: dict) -> dict:
    return doc("Gateway", "edge", {"servers": list(servers)}, namespace="shop")


def _https(files, port: int = 8443, hosts=("a.example.com",), **tls) -> dict:
    settings = {"mode": "SIMPLE", "serverCertificate": files.cert, "privateKey": files.key, **tls}
    return {"port": {"number": port, "name": f"https-{port}", "protocol": "HTTPS"}, "hosts": list(hosts), "tls": settings}


def _error(*docs, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_docs(*docs, **kw)
    assert info.value.kind == "Gateway" and info.value.name == "shop/edge"
    assert str(info.value.file).endswith("test.yaml")
    return info.value


def test_simple_servers_share_a_port_each_with_its_routes(server_files):
    snap = compile_docs(_gateway(_https(server_files), _https(server_files, hosts=("b.example.com", "*.b.example.com"))))
    (bound,) = [l for l in snap.listeners if l.bind_to_port]
    assert (bound.protocol, bound.port) == ("HTTPS", 8443)
    assert [s.server_names for s in bound.tls_servers] == [("a.example.com",), ("b.example.com", "*.b.example.com")]
    assert [s.listener for s in bound.tls_servers] == ["https.8443.https-8443.edge.shop", "https.8443.https-8443.edge.shop.1"]
    assert {l.name for l in snap.listeners if not l.bind_to_port} == {s.listener for s in bound.tls_servers}
    dumped = json.loads(json.dumps(snap.dump))["listeners"][0]["tls_servers"][0]
    assert dumped["certificate"]["cert_file"] == server_files.cert and dumped["mode"] == "SIMPLE"


def test_credential_name_resolves_in_the_credentials_dir(ca, tmp_path):
    secret = tmp_path / "creds" / "edge-cert"
    secret.mkdir(parents=True)
    files = write_cert(ca, secret, "x", "a.example.com")
    Path(files.cert).rename(secret / "cert")  # Istio's generic-secret key names work too
    Path(files.key).rename(secret / "key")
    server = _https(files, credentialName="edge-cert", serverCertificate="", privateKey="", mode="MUTUAL")
    snap = compile_docs(_gateway(server), credentials_dir=str(tmp_path / "creds"))
    (tls,) = snap.listeners[0].tls_servers
    assert (tls.certificate.cert_file, tls.certificate.key_file, tls.certificate.ca_file) == (
        str(secret / "cert"), str(secret / "key"), str(secret / "ca.crt"))
    assert tls.certificate.origin == "credentialName edge-cert"


def test_tls_termination_then_tcp_route(server_files):
    snap = compile_docs(
        _gateway({"port": {"number": 9000, "name": "tls-db", "protocol": "TLS"}, "hosts": ["db.example.com"],
                  "tls": {"mode": "SIMPLE", "serverCertificate": server_files.cert, "privateKey": server_files.key}}),
        doc("ServiceEntry", "db", {"hosts": ["db.shop.svc.cluster.local"], "resolution": "STATIC",
                                   "location": "MESH_INTERNAL", "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
                                   "endpoints": [{"address": "127.0.0.2"}]}, namespace="shop"),
        doc("VirtualService", "db", {"hosts": ["db.example.com"], "gateways": ["edge"], "tcp": [
            {"route": [{"destination": {"host": "db.shop.svc.cluster.local", "port": {"number": 5432}}}]}]},
            namespace="shop"),
    )
    bound = next(l for l in snap.listeners if l.bind_to_port)
    assert (bound.protocol, bound.tls_routes) == ("TLS", ())
    (server,) = bound.tls_servers
    virtual = next(l for l in snap.listeners if l.name == server.listener)
    assert (virtual.protocol, virtual.bind_to_port) == ("TCP", False)
    assert virtual.tcp_route.destinations[0].cluster == "outbound|5432||db.shop.svc.cluster.local"


def test_passthrough_and_https_redirect(server_files):
    snap = compile_docs(
        _gateway({"port": {"number": 9443, "name": "tls", "protocol": "TLS"}, "hosts": ["*.example.com"],
                  "tls": {"mode": "PASSTHROUGH"}},
                 {"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["a.example.com"],
                  "tls": {"httpsRedirect": True}}),
        doc("ServiceEntry", "db", {"hosts": ["db.example.com"], "resolution": "STATIC", "location": "MESH_EXTERNAL",
                                   "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                                   "endpoints": [{"address": "127.0.0.2"}]}, namespace="shop"),
        doc("VirtualService", "db", {"hosts": ["db.example.com"], "gateways": ["edge"], "tls": [
            {"match": [{"sniHosts": ["db.example.com", "elsewhere.test"]}],
             "route": [{"destination": {"host": "db.example.com", "port": {"number": 443}}}]}]}, namespace="shop"),
        doc("VirtualService", "a", {"hosts": ["a.example.com"], "gateways": ["edge"], "http": [
            {"route": [{"destination": {"host": "db.example.com", "port": {"number": 443}}}]}]}, namespace="shop"),
    )
    passthrough = next(l for l in snap.listeners if l.port == 9443)
    assert passthrough.protocol == "TLS"
    (route,) = passthrough.tls_routes
    assert route.matches == ((("db.example.com",), None, ()),)  # sniHosts outside the server's hosts are dropped
    plain = next(l for l in snap.listeners if l.port == 8080)
    (redirect,) = plain.route_table.exact[b"a.example.com"].routes
    assert (redirect.redirect.scheme, redirect.redirect.code) == (b"https", 301)


@pytest.mark.parametrize("tls, field, words", [
    ({"privateKey": "/nonexistent/key.pem"}, "privateKey", "cannot read /nonexistent/key.pem"),
    ({"serverCertificate": "/nonexistent/cert.pem"}, "serverCertificate", "cannot read /nonexistent/cert.pem"),
    ({"cipherSuites": ["ECDHE-RSA-AES128-GCM-SHA256", "TLS_FANCY"]}, "cipherSuites[1]", "unknown cipher suite 'TLS_FANCY'"),
    ({"cipherSuites": ["[ECDHE-RSA-AES128-GCM-SHA256|TLS_FANCY]"]}, "cipherSuites[0]", "unknown cipher suite 'TLS_FANCY'"),
    ({"cipherSuites": ["NULL-SHA256"]}, "cipherSuites[0]", "'NULL-SHA256' is refused: no encryption"),
    ({"cipherSuites": ["ECDHE-RSA-AES128-GCM-SHA256", "ADH-AES128-GCM-SHA256"]}, "cipherSuites[1]",
     "refused: no authentication"),
    ({"cipherSuites": ["ECDHE-PSK-CHACHA20-POLY1305"]}, "cipherSuites[0]", "needs a pre-shared key"),
    ({"minProtocolVersion": "TLSV1_1"}, "minProtocolVersion", "TLSV1_1 is refused"),
    ({"maxProtocolVersion": "TLSV1_0"}, "maxProtocolVersion", "TLSV1_0 is refused"),
    ({"minProtocolVersion": "TLSV1_3", "maxProtocolVersion": "TLSV1_2"}, "maxProtocolVersion", "is below"),
    ({"mode": "MUTUAL"}, "caCertificates", "MUTUAL needs caCertificates"),
    ({"mode": "ISTIO_MUTUAL"}, "serverCertificate", "mode ISTIO_MUTUAL uses the workload certificate"),
    ({"serverCertificate": ""}, "serverCertificate", "needs serverCertificate and privateKey"),
    ({"credentialName": "x", "serverCertificate": "", "privateKey": ""}, "credentialName", "needs the proxy's --credentials-dir"),
])
def test_bad_settings_name_their_field(server_files, tls, field, words):
    e = _error(_gateway(_https(server_files, **tls)))
    assert e.field_path == f"$.spec.servers[0].tls.{field}"
    assert words in e.message, e.message


def test_key_not_matching_the_certificate(ca, server_files, tmp_path):
    (tmp_path / "other").mkdir()
    other = write_cert(ca, tmp_path / "other", "other", "a.example.com")
    e = _error(_gateway(_https(server_files, privateKey=other.key)))
    assert e.field_path == "$.spec.servers[0].tls.privateKey"
    assert e.message == f"private key {other.key} does not match certificate {server_files.cert}"


def test_unreadable_key_and_credential_without_files(server_files, tmp_path):
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    e = _error(_gateway(_https(server_files, privateKey=str(garbage))))
    assert e.field_path == "$.spec.servers[0].tls.privateKey" and f"cannot load private key {garbage}" in e.message
    e = _error(_gateway(_https(server_files, serverCertificate=server_files.key)))
    assert e.field_path == "$.spec.servers[0].tls.serverCertificate" and "not a PEM certificate chain" in e.message
    (tmp_path / "creds" / "empty").mkdir(parents=True)
    e = _error(_gateway(_https(server_files, credentialName="empty", serverCertificate="", privateKey="")),
               credentials_dir=str(tmp_path / "creds"))
    assert e.field_path == "$.spec.servers[0].tls.credentialName" and "has no tls.crt or cert" in e.message
    secret = tmp_path / "creds" / "half"
    secret.mkdir()
    shutil.copy(server_files.cert, secret / "tls.crt")
    shutil.copy(server_files.cert, secret / "tls.key")  # a certificate where the key should be
    e = _error(_gateway(_https(server_files, credentialName="half", serverCertificate="", privateKey="")),
               credentials_dir=str(tmp_path / "creds"))
    assert e.field_path == "$.spec.servers[0].tls.credentialName" and str(secret / "tls.key") in e.message


def test_istio_rules_on_protocols_and_tls(server_files):
    e = _error(_gateway({"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"]}))
    assert (e.field_path, e.message) == ("$.spec.servers[0].tls", "a HTTPS server needs tls settings (mode SIMPLE, MUTUAL or PASSTHROUGH)")
    plain = {"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"],
             "tls": {"mode": "SIMPLE", "serverCertificate": server_files.cert, "privateKey": server_files.key}}
    e = _error(_gateway(plain))
    assert e.field_path == "$.spec.servers[0].tls" and "may only set httpsRedirect" in e.message
    terminated_tcp = {"port": {"number": 9000, "name": "tls", "protocol": "TLS"}, "hosts": ["*"],
                      "tls": {"mode": "SIMPLE", "serverCertificate": server_files.cert, "privateKey": server_files.key}}
    passthrough = {"port": {"number": 9000, "name": "tls-pass", "protocol": "TLS"}, "hosts": ["db.example.com"],
                   "tls": {"mode": "PASSTHROUGH"}}
    e = _error(_gateway(terminated_tcp, passthrough))
    assert e.field_path == "$.spec.servers[1].tls.mode" and "PASSTHROUGH servers on one port are not supported" in e.message
    e = _error(_gateway(_https(server_files), _https(server_files)))
    assert e.field_path == "$.spec.servers[1].hosts" and "already served by Gateway shop/edge $.spec.servers[0]" in e.message
    mixed = {"port": {"number": 8443, "name": "http", "protocol": "HTTP"}, "hosts": ["b.example.com"]}
    e = _error(_gateway(_https(server_files), mixed))
    assert e.field_path == "$.spec.servers[1].port.number" and "cannot share its port" in e.message


def test_unsupported_server_tls_fields_are_named(server_files):
    from tests.config.helpers import dump
    from proxy.config.load import load_bytes

    with pytest.raises(ConfigError) as info:
        load_bytes(dump(_gateway(_https(server_files, verifyCertificateHash=["ab"]))), "test.yaml")
    assert info.value.field_path == "$.spec.servers[0].tls.verifyCertificateHash"
    assert "does not support yet" in info.value.message


def test_a_control_plane_checks_settings_but_not_files(server_files):
    """read_certificates False (controlplane/store.py): paths and credentialNames only the proxies
    can see pass; the settings themselves are still checked."""
    remote = _https(server_files, serverCertificate="/on/the/proxy/cert.pem", privateKey="/on/the/proxy/key.pem")
    by_name = _https(server_files, port=9443, credentialName="edge-cert", serverCertificate="", privateKey="")
    snap = compile_docs(_gateway(remote, by_name), read_certificates=False)
    assert [s.certificate.origin for l in snap.listeners for s in l.tls_servers] == ["files", "credentialName edge-cert"]
    e = _error(_gateway(_https(server_files, cipherSuites=["NOPE"])), read_certificates=False)
    assert e.field_path == "$.spec.servers[0].tls.cipherSuites[0]"
