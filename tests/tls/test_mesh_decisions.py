"""The pure parts of mesh mTLS: what PeerAuthentication's mode makes of a connection's first bytes,
what runs inside by ALPN, and the check of an upstream's SPIFFE ID (subjectAltNames or trust domain)."""

from __future__ import annotations

import pytest

from proxy.l4.sniff import Protocol
from proxy.tls.conn import TlsHandshakeError
from proxy.tls.mesh import check_peer_identity
from proxy.tls.mesh_inbound import Action, decide, inner_protocol, needs_first_bytes

TLS, PLAIN = Protocol.TLS, Protocol.HTTP1


@pytest.mark.parametrize("mode, protocol, alpn, has_identity, action", [
    ("STRICT", TLS, ("istio-http/1.1",), True, Action.TERMINATE),
    ("STRICT", TLS, ("h2",), True, Action.TERMINATE),  # non-mesh TLS: its handshake fails without a mesh certificate
    ("STRICT", PLAIN, (), True, Action.REFUSE),
    ("STRICT", TLS, ("triomesh-peer-exchange", "istio"), False, Action.REFUSE),  # no workload certificate yet
    ("PERMISSIVE", TLS, ("istio-peer-exchange", "istio"), True, Action.TERMINATE),
    ("PERMISSIVE", TLS, ("h2", "http/1.1"), True, Action.AS_IS),
    ("PERMISSIVE", PLAIN, (), True, Action.AS_IS),
    ("PERMISSIVE", TLS, ("triomesh-peer-exchange", "istio"), False, Action.AS_IS),
    ("DISABLE", TLS, ("triomesh-peer-exchange", "istio"), True, Action.AS_IS),
])
def test_decide(mode, protocol, alpn, has_identity, action):
    assert decide(mode, protocol, alpn, has_identity) is action


def test_first_bytes_are_read_only_when_they_can_change_the_answer():
    assert needs_first_bytes("STRICT", False) and needs_first_bytes("PERMISSIVE", True)
    assert not needs_first_bytes("PERMISSIVE", False) and not needs_first_bytes("DISABLE", True)


def test_inner_protocol_by_alpn():
    assert [inner_protocol(a) for a in ("istio-h2", "h2", "istio-http/1.1", "http/1.1", "istio", None)] == [
        Protocol.HTTP2, Protocol.HTTP2, Protocol.HTTP1, Protocol.HTTP1, Protocol.OPAQUE, Protocol.OPAQUE]


def _peer(*uris: str) -> dict:
    return {"subjectAltName": tuple(("URI", u) for u in uris)}


OWN = "spiffe://cluster.local/ns/a/sa/client"


def test_upstream_identity_checks():
    server = "spiffe://cluster.local/ns/b/sa/server"
    assert check_peer_identity(_peer(server), (), OWN) == server  # any identity of our trust domain
    assert check_peer_identity(_peer(server), (server,), OWN) == server
    for peer, sans, words in [
        (_peer("spiffe://other.domain/ns/b/sa/server"), (), "outside trust domain cluster.local"),
        (_peer(server), ("spiffe://cluster.local/ns/b/sa/other",), "is none of subjectAltNames"),
        (_peer(), (), "has no SPIFFE ID"),
    ]:
        with pytest.raises(TlsHandshakeError, match=words) as info:
            check_peer_identity(peer, sans, OWN)
        assert info.value.reason == "fail_verify_san"


AUTO = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 3306, name: db, protocol: TCP}]
  endpoints:
  - {address: 10.0.0.1, labels: {app: ratings, security.istio.io/tlsMode: istio}}
  - {address: 10.0.0.2, labels: {app: ratings}}
"""


def test_auto_mtls_and_istio_mutual_compile():
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes

    snapshot = compile_resources(load_bytes(AUTO, "m.yaml"), version="1")
    tls = snapshot.clusters["outbound|9080||ratings"].tls
    assert (tls.mode, tls.sni, tls.alpn) == ("ISTIO_MUTUAL", "outbound_.9080_._.ratings", ("istio-http/1.1",))
    assert tls.mesh_endpoints == frozenset({("10.0.0.1", 9080)})  # 10.0.0.2 has no sidecar: plaintext
    tcp = snapshot.clusters["outbound|3306||ratings"].tls  # TCP too, with Istio's ALPN for opaque bytes
    assert (tcp.sni, tcp.alpn, tcp.mesh_endpoints) == ("outbound_.3306_._.ratings", ("triomesh-peer-exchange", "istio"),
                                                       frozenset({("10.0.0.1", 3306)}))

    rule = """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy: {tls: {mode: DISABLE}, portLevelSettings: [{port: {number: 9080}, tls: {mode: ISTIO_MUTUAL}}]}
  subsets: [{name: v1, labels: {app: ratings}}]
"""
    snapshot = compile_resources(load_bytes(AUTO + rule, "m.yaml"), version="1")
    tls = snapshot.clusters["outbound|9080|v1|ratings"].tls
    assert (tls.mode, tls.sni, tls.mesh_endpoints) == ("ISTIO_MUTUAL", "outbound_.9080_.v1_.ratings", None)
    # ISTIO_MUTUAL on the TCP port: the TCP proxy originates it, with ALPN istio
    snapshot = compile_resources(load_bytes(AUTO + rule.replace("number: 9080", "number: 3306"), "m.yaml"), version="1")
    tls = snapshot.clusters["outbound|3306|v1|ratings"].tls
    assert (tls.mode, tls.sni, tls.alpn) == ("ISTIO_MUTUAL", "outbound_.3306_.v1_.ratings", ("triomesh-peer-exchange", "istio"))
