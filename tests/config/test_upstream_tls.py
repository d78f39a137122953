"""DestinationRule tls (ClientTLSSettings) compiled into Cluster.tls: every field, Istio's precedence
(subset port-level > subset > port-level > top level, each replacing tls as a whole), and the errors."""

from __future__ import annotations

import pytest
import trustme

from proxy.config.errors import ConfigError
from tests.config.helpers import compile_docs, doc, service, workload
from tests.tls.certs import write_cert


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_cert(trustme.CA(), tmp_path_factory.mktemp("upstream-tls"), "client", "client.test")


def _rule(traffic_policy: dict | None = None, subsets: list | None = None) -> dict:
    spec: dict = {"host": "r"}
    if traffic_policy is not None:
        spec["trafficPolicy"] = traffic_policy
    if subsets is not None:
        spec["subsets"] = subsets
    return doc("DestinationRule", "r", spec)


def _clusters(*docs: dict, **kw):
    return compile_docs(service("r", ports=[{"number": 8080, "name": "http", "protocol": "HTTP"},
                                            {"number": 9090, "name": "grpc", "protocol": "GRPC"}]),
                        workload("w", "r", 8080), *docs, **kw).clusters


def _error(*docs: dict, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _clusters(*docs, **kw)
    return info.value


def test_simple_defaults_sni_to_the_host_and_offers_alpn_by_protocol(files):
    clusters = _clusters(_rule({"tls": {"mode": "SIMPLE", "caCertificates": files.ca}}))
    http, grpc = clusters["outbound|8080||r"].tls, clusters["outbound|9090||r"].tls
    assert (http.mode, http.sni, http.ca_file, http.alpn) == ("SIMPLE", "r", files.ca, ("http/1.1",))
    assert grpc.alpn == ("h2",)
    assert not http.subject_alt_names and not http.insecure_skip_verify and not http.cert_file


def test_every_field(files):
    tls = _clusters(_rule({"tls": {
        "mode": "MUTUAL", "sni": "api.example", "subjectAltNames": ["spiffe://td/ns/a/sa/b"],
        "caCertificates": files.ca, "clientCertificate": files.cert, "privateKey": files.key,
        "insecureSkipVerify": True}}))["outbound|8080||r"].tls
    assert (tls.mode, tls.sni, tls.subject_alt_names, tls.cert_file, tls.key_file, tls.insecure_skip_verify) == (
        "MUTUAL", "api.example", ("spiffe://td/ns/a/sa/b",), files.cert, files.key, True)
    assert tls.origin == "DestinationRule default/r"


def test_disable_and_no_tls_are_plaintext():
    assert _clusters(_rule({"tls": {"mode": "DISABLE", "sni": "ignored"}}))["outbound|8080||r"].tls is None
    assert _clusters()["outbound|8080||r"].tls is None


def test_service_entry_subject_alt_names_apply_unless_the_rule_names_its_own(files):
    def compiled(rule_sans: list[str]):
        tls = {"mode": "SIMPLE", "caCertificates": files.ca, **({"subjectAltNames": rule_sans} if rule_sans else {})}
        return compile_docs(service("r", subjectAltNames=["se.example"]), workload("w", "r", 8080),
                            _rule({"tls": tls})).clusters["outbound|8080||r"].tls.subject_alt_names
    assert compiled([]) == ("se.example",)
    assert compiled(["dr.example"]) == ("dr.example",)


def test_precedence_subset_port_level_over_subset_over_port_level_over_top_level(files):
    def tls(sni: str) -> dict:
        return {"mode": "SIMPLE", "sni": sni, "caCertificates": files.ca}
    rule = _rule({"tls": tls("top"), "portLevelSettings": [{"port": {"number": 9090}, "tls": tls("port")}]},
                 subsets=[{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"tls": tls("subset")}},
                          {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {
                              "portLevelSettings": [{"port": {"number": 8080}, "tls": tls("subset-port")}]}},
                          {"name": "v3", "labels": {"version": "v3"}}])
    clusters = _clusters(rule)
    sni = {name: (c.tls.sni if c.tls else None) for name, c in clusters.items()}
    assert sni["outbound|8080||r"] == "top"
    assert sni["outbound|9090||r"] == "port"
    assert sni["outbound|8080|v1|r"] == sni["outbound|9090|v1|r"] == "subset"
    assert sni["outbound|8080|v2|r"] == "subset-port"
    assert sni["outbound|9090|v2|r"] == "port"  # no subset tls for this port: the host's port-level
    assert sni["outbound|9090|v3|r"] == "port" and sni["outbound|8080|v3|r"] == "top"


def test_a_port_level_entry_without_tls_does_not_inherit_the_top_level_tls(files):
    clusters = _clusters(_rule({"tls": {"mode": "SIMPLE", "caCertificates": files.ca},
                                "portLevelSettings": [{"port": {"number": 9090}, "connectionPool": {}}]}))
    assert clusters["outbound|8080||r"].tls is not None
    assert clusters["outbound|9090||r"].tls is None  # as Istio documents: port-level settings do not inherit


@pytest.mark.parametrize(("tls", "field", "message"), [
    ({"mode": "MUTUAL"}, "clientCertificate", "mode MUTUAL needs clientCertificate and privateKey"),
    ({"mode": "MUTUAL", "clientCertificate": "{cert}"}, "privateKey", "mode MUTUAL needs privateKey"),
    ({"mode": "SIMPLE", "clientCertificate": "{cert}"}, "clientCertificate", "mode SIMPLE sends no client certificate"),
    ({"mode": "SIMPLE", "caCertificates": "/nonexistent/ca.pem"}, "caCertificates", "cannot read /nonexistent/ca.pem"),
    ({"mode": "SIMPLE", "caCertificates": "{key}"}, "caCertificates", "no PEM certificate in"),
    ({"mode": "MUTUAL", "clientCertificate": "{cert}", "privateKey": "/nonexistent/k.pem"}, "privateKey",
     "cannot read /nonexistent/k.pem"),
    ({"mode": "MUTUAL", "clientCertificate": "{ca}", "privateKey": "{key}"}, "privateKey", "does not match"),
    ({"mode": "SIMPLE", "credentialName": "c"}, "credentialName", "needs the proxy's --credentials-dir"),
    ({"mode": "SIMPLE", "credentialName": "c", "caCertificates": "{ca}"}, "credentialName", "exclude each other"),
    ({"mode": "SIMPLE", "sni": "*.example.com"}, "sni", "sni '*.example.com' is not a DNS name or IP address"),
    ({"mode": "SIMPLE", "sni": "a b"}, "sni", "is not a DNS name"),
])
def test_errors_name_the_field(files, tls, field, message):
    tls = {k: v.format(cert=files.cert, key=files.key, ca=files.ca) for k, v in tls.items()}
    for rule, path in ((_rule({"tls": tls}), "$.spec.trafficPolicy.tls"),
                       (_rule(subsets=[{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {
                           "portLevelSettings": [{"port": {"number": 8080}, "tls": tls}]}}]),
                        "$.spec.subsets[0].trafficPolicy.portLevelSettings[0].tls")):
        e = _error(rule)
        assert (e.kind, e.name, e.field_path) == ("DestinationRule", "default/r", f"{path}.{field}")
        assert message in e.message, e.message


def test_credential_name_resolves_in_the_credentials_dir(files, tmp_path):
    secret = tmp_path / "upstream-client"
    secret.mkdir()
    for name, source in (("tls.crt", files.cert), ("tls.key", files.key), ("ca.crt", files.ca)):
        (secret / name).write_bytes(open(source, "rb").read())
    tls = _clusters(_rule({"tls": {"mode": "MUTUAL", "credentialName": "upstream-client"}}),
                    credentials_dir=str(tmp_path))["outbound|8080||r"].tls
    assert (tls.cert_file, tls.key_file, tls.ca_file) == (str(secret / "tls.crt"), str(secret / "tls.key"),
                                                          str(secret / "ca.crt"))
    simple = _clusters(_rule({"tls": {"mode": "SIMPLE", "credentialName": "upstream-client"}}),
                       credentials_dir=str(tmp_path))["outbound|8080||r"].tls
    assert (simple.cert_file, simple.ca_file) == ("", str(secret / "ca.crt"))  # SIMPLE takes only the CA


def test_tls_to_a_tcp_port_is_originated_by_the_tcp_proxy(files):
    """A TCP port's cluster takes a DestinationRule tls: no ALPN for SIMPLE/MUTUAL (Envoy's tcp_proxy
    sets none), Istio's `istio` for ISTIO_MUTUAL, and auto mTLS to endpoints with a sidecar."""
    tcp = service("r", ports=[{"number": 5432, "name": "pg", "protocol": "TCP"}])
    simple = compile_docs(tcp, workload("w", "r", 5432), _rule({"tls": {"mode": "SIMPLE", "caCertificates": files.ca}})
                          ).clusters["outbound|5432||r"].tls
    assert (simple.mode, simple.sni, simple.alpn) == ("SIMPLE", "r", ())
    mutual = compile_docs(tcp, workload("w", "r", 5432), _rule({"tls": {"mode": "ISTIO_MUTUAL"}})
                          ).clusters["outbound|5432||r"].tls
    assert (mutual.mode, mutual.sni, mutual.alpn, mutual.mesh_endpoints) == (
        "ISTIO_MUTUAL", "outbound_.5432_._.r", ("triomesh-peer-exchange", "istio"), None)
    sidecar = doc("WorkloadEntry", "w", {"address": "127.0.0.1", "ports": {"pg": 5432},
                                         "labels": {"app": "r", "security.istio.io/tlsMode": "istio"}})
    auto = compile_docs(tcp, sidecar).clusters["outbound|5432||r"].tls
    assert (auto.origin, auto.alpn, auto.mesh_endpoints) == ("auto mTLS", ("triomesh-peer-exchange", "istio"), frozenset({("127.0.0.1", 5432)}))
    assert compile_docs(tcp, workload("w", "r", 5432)).clusters["outbound|5432||r"].tls is None  # no sidecar there


def test_a_tcp_route_to_a_cluster_with_tls_is_refused(files):
    vs = doc("VirtualService", "v", {"hosts": ["r"], "tcp": [{"route": [{"destination": {"host": "r", "port": {"number": 8080}}}]}]})
    e = _error(_rule({"tls": {"mode": "SIMPLE", "caCertificates": files.ca}}), vs)
    assert (e.kind, e.field_path) == ("VirtualService", "$.spec.tcp[0].route[0].destination")
    assert "cluster outbound|8080||r originates TLS for HTTP (DestinationRule default/r tls mode SIMPLE)" in e.message


def test_a_wildcard_host_needs_an_explicit_sni(files):
    def compiled(tls: dict):
        return compile_docs(service("*.example.com", name="wild", resolution="NONE"),
                            doc("DestinationRule", "r", {"host": "*.example.com", "trafficPolicy": {"tls": tls}}))
    with pytest.raises(ConfigError) as info:
        compiled({"mode": "SIMPLE"})
    assert info.value.field_path == "$.spec.trafficPolicy.tls.sni" and "set sni" in info.value.message
    tls = compiled({"mode": "SIMPLE", "sni": "api.example.com"}).clusters["outbound|8080||*.example.com"].tls
    assert tls.sni == "api.example.com"
