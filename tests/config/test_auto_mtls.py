"""When a client sidecar originates Istio mutual TLS without a DestinationRule `tls` (auto mTLS), and
which server identities it accepts, as Istio's cluster builder decides (cluster_builder.go
buildAutoMtlsSettings with PushContext.BestEffortInferServiceMTLSMode and ServiceAccounts): never to
a MESH_EXTERNAL service, not when the mesh- or namespace-wide PeerAuthentication of the service's
namespace says DISABLE, for a passthrough service only when all its endpoints have a sidecar; the
server must be one of the service's accounts (its endpoints' `serviceAccount` and the ServiceEntry's
`subjectAltNames`), in auto mTLS and in an explicit ISTIO_MUTUAL alike."""

from __future__ import annotations

import pytest

from proxy.tls.conn import TlsHandshakeError
from proxy.tls.mesh import check_peer_identity
from tests.config.helpers import compile_docs, doc

SIDECAR = {"security.istio.io/tlsMode": "istio"}
CLUSTER = "outbound|8080||web.shop"


def _service(**spec) -> dict:
    """web.shop in namespace shop: one endpoint with a sidecar, unless `endpoints` says otherwise."""
    body = {"hosts": ["web.shop"], "location": "MESH_INTERNAL", "resolution": "STATIC",
            "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
            "endpoints": [{"address": "10.0.0.1", "labels": {"app": "web", **SIDECAR}}]}
    body.update(spec)
    return doc("ServiceEntry", "web", body, "shop")


def _peer_authentication(name: str, namespace: str, mode: str | None, **spec) -> dict:
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    return {**doc("PeerAuthentication", name, spec, namespace), "apiVersion": "security.istio.io/v1"}


def _tls(*docs: dict, cluster: str = CLUSTER, proxy_namespace: str | None = "front"):
    return compile_docs(*docs, proxy_namespace=proxy_namespace).clusters[cluster].tls


def _mode(*docs: dict) -> str | None:
    tls = _tls(*docs)
    return None if tls is None else tls.mode


def test_disable_in_the_service_namespace_or_the_mesh_turns_auto_mtls_off():
    assert _mode(_service()) == "ISTIO_MUTUAL"
    assert _mode(_service(), _peer_authentication("default", "shop", "DISABLE")) is None
    assert _mode(_service(), _peer_authentication("default", "istio-system", "DISABLE")) is None
    # the namespace's policy overrides the mesh's; UNSET (or no mtls) inherits it
    assert _mode(_service(), _peer_authentication("default", "istio-system", "DISABLE"),
                 _peer_authentication("default", "shop", "PERMISSIVE")) == "ISTIO_MUTUAL"
    assert _mode(_service(), _peer_authentication("default", "istio-system", "DISABLE"),
                 _peer_authentication("default", "shop", "UNSET")) is None
    assert _mode(_service(), _peer_authentication("default", "istio-system", "STRICT"),
                 _peer_authentication("default", "shop", "DISABLE")) is None
    # the first namespace-wide policy in config order decides (Istio: the oldest)
    assert _mode(_service(), _peer_authentication("a", "shop", "DISABLE"),
                 _peer_authentication("b", "shop", "STRICT")) is None


def test_only_the_service_namespace_and_mesh_policies_count():
    # the client's own namespace says nothing about the server
    assert _mode(_service(), _peer_authentication("default", "front", "DISABLE")) == "ISTIO_MUTUAL"
    # workload and port-level policies are left out, as Istio's inference leaves them out
    workload = _peer_authentication("web", "shop", "DISABLE", selector={"matchLabels": {"app": "web"}},
                                    portLevelMtls={8080: {"mode": "DISABLE"}})
    assert _mode(_service(), workload) == "ISTIO_MUTUAL"
    # a proxy whose namespace is not known decides the same
    disable = _peer_authentication("default", "shop", "DISABLE")
    assert _tls(_service(), disable, proxy_namespace=None) is None


def test_an_explicit_rule_still_wins_over_a_disabled_namespace():
    rule = doc("DestinationRule", "web", {"host": "web.shop", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}, "shop")
    tls = _tls(_service(), _peer_authentication("default", "shop", "DISABLE"), rule)
    assert (tls.mode, tls.origin, tls.mesh_endpoints) == ("ISTIO_MUTUAL", "DestinationRule shop/web", None)


def test_no_auto_mtls_to_a_mesh_external_service():
    assert _mode(_service(location="MESH_EXTERNAL")) is None
    body = {k: v for k, v in _service()["spec"].items() if k != "location"}
    assert _mode(doc("ServiceEntry", "web", body, "shop")) is None  # Istio's default location
    rule = doc("DestinationRule", "web", {"host": "web.shop", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}, "shop")
    assert _mode(_service(location="MESH_EXTERNAL"), rule) == "ISTIO_MUTUAL"  # asked for: given


def _workload_entry(name: str, address: str, labels: dict) -> dict:
    return doc("WorkloadEntry", name, {"address": address, "labels": {"app": "web", **labels}}, "shop")


def test_a_passthrough_service_gets_auto_mtls_only_when_every_endpoint_has_a_sidecar():
    passthrough = _service(resolution="NONE", endpoints=[], workloadSelector={"labels": {"app": "web"}})
    all_sidecars = [_workload_entry("a", "10.0.0.1", SIDECAR), _workload_entry("b", "10.0.0.2", SIDECAR)]
    assert _mode(passthrough, *all_sidecars) == "ISTIO_MUTUAL"
    mixed = [all_sidecars[0], _workload_entry("b", "10.0.0.2", {})]
    assert _mode(passthrough, *mixed) is None
    assert _mode(passthrough) is None  # no endpoints
    # a DestinationRule's loadBalancer PASSTHROUGH makes any service passthrough
    selected = _service(endpoints=[], workloadSelector={"labels": {"app": "web"}})
    assert _tls(selected, *mixed).mesh_endpoints == frozenset({("10.0.0.1", 8080)})  # per endpoint
    lb = doc("DestinationRule", "web", {"host": "web.shop", "trafficPolicy": {"loadBalancer": {"simple": "PASSTHROUGH"}}},
             "shop")
    assert _mode(selected, lb, *mixed) is None


OWN = "spiffe://example.org/ns/front/sa/client"  # the client's certificate: its trust domain is the mesh's


def _peer(spiffe_id: str) -> dict:
    return {"subjectAltName": (("URI", spiffe_id),)}


def _accepts(tls, spiffe_id: str) -> bool:
    try:
        check_peer_identity(_peer(spiffe_id), tls.subject_alt_names, OWN)
    except TlsHandshakeError as e:
        assert e.reason == "fail_verify_san"
        return False
    return True


def _with_accounts(**spec) -> dict:
    """web.shop with an inline endpoint of account web, and a WorkloadEntry of account web-canary."""
    return _service(endpoints=[], workloadSelector={"labels": {"app": "web"}}, **spec)


ACCOUNTS = (doc("WorkloadEntry", "web-1", {"address": "10.0.0.1", "serviceAccount": "web",
                                           "labels": {"app": "web", **SIDECAR}}, "shop"),
            doc("WorkloadEntry", "web-2", {"address": "10.0.0.2", "serviceAccount": "web-canary",
                                           "labels": {"app": "web", **SIDECAR}}, "shop"),
            doc("WorkloadEntry", "web-3", {"address": "10.0.0.3", "labels": {"app": "web", **SIDECAR}}, "shop"))


@pytest.mark.parametrize("rule_tls", [None, {"mode": "ISTIO_MUTUAL"}], ids=["auto mTLS", "ISTIO_MUTUAL"])
def test_the_server_must_be_one_of_the_service_accounts(rule_tls):
    docs = [_with_accounts(subjectAltNames=["spiffe://example.org/ns/ops/sa/legacy"]), *ACCOUNTS]
    if rule_tls is not None:
        docs.append(doc("DestinationRule", "web", {"host": "web.shop", "trafficPolicy": {"tls": rule_tls}}, "shop"))
    tls = _tls(*docs)
    assert tls.mode == "ISTIO_MUTUAL"
    # the endpoints' accounts in the service's namespace, in the proxy's own trust domain; the
    # ServiceEntry's subjectAltNames as written; an endpoint without an account adds none
    for accepted in ("spiffe://example.org/ns/shop/sa/web", "spiffe://example.org/ns/shop/sa/web-canary",
                     "spiffe://example.org/ns/ops/sa/legacy"):
        assert _accepts(tls, accepted), accepted
    for refused in ("spiffe://example.org/ns/shop/sa/default", "spiffe://example.org/ns/front/sa/web",
                    "spiffe://cluster.local/ns/shop/sa/web", "spiffe://example.org/ns/front/sa/client"):
        assert not _accepts(tls, refused), refused


def test_a_rule_naming_its_own_subject_alt_names_replaces_the_service_accounts():
    rule = doc("DestinationRule", "web", {"host": "web.shop", "trafficPolicy": {"tls": {
        "mode": "ISTIO_MUTUAL", "subjectAltNames": ["spiffe://example.org/ns/shop/sa/other"]}}}, "shop")
    tls = _tls(_with_accounts(), *ACCOUNTS, rule)
    assert tls.subject_alt_names == ("spiffe://example.org/ns/shop/sa/other",)
    assert not _accepts(tls, "spiffe://example.org/ns/shop/sa/web")


def test_without_known_accounts_the_chain_decides():
    tls = _tls(_service())
    assert tls.subject_alt_names == ()
    assert _accepts(tls, "spiffe://example.org/ns/shop/sa/anything")
