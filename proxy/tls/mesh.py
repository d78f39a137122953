"""The TLS contexts of Istio mutual TLS between sidecars, made from the workload identity.

One server context and one client context per certificate (per `WorkloadIdentity` object), built when
a connection first needs it after the identity was swapped, then shared by every connection: renewal
makes new handshakes use the new certificate, connections already open keep theirs. Never per
connection.

Conventions (Istio's): the server offers ALPN `istio-h2`, `istio-http/1.1` and `istio` (what a
sidecar offers to tell mesh mTLS from the app's own TLS) besides `h2`/`http/1.1`, and first our TCP
peer exchange's id; a client
certificate is required and verified against the trust bundle; the peer's identity is the SPIFFE ID
of its certificate's URI SAN.
"""

from __future__ import annotations

from proxy.identity.workload import WorkloadIdentity
from proxy.telemetry.peer_exchange import PEER_EXCHANGE_ALPN
from proxy.tls.conn import SPIFFE_PREFIX, TlsHandshakeError
from proxy.tls.context import ProtocolVersions, TlsContext, base_context

# the ALPN ids Istio's sidecars offer for mesh mTLS: HTTP/2, HTTP/1.1, opaque TCP
ISTIO_H2 = "istio-h2"
ISTIO_HTTP1 = "istio-http/1.1"
ISTIO_TCP = "istio"
MESH_ALPN = (ISTIO_H2, ISTIO_HTTP1, ISTIO_TCP)
# the TCP peer exchange first: a client offering it gets it (proxy/telemetry/peer_exchange.py)
SERVER_ALPN = (PEER_EXCHANGE_ALPN, ISTIO_H2, ISTIO_HTTP1, ISTIO_TCP, "h2", "http/1.1")


def offers_mesh_alpn(alpn: tuple[str, ...]) -> bool:
    """A ClientHello from a sidecar originating mesh mTLS (Istio's PERMISSIVE filter chain match)."""
    return any(a.startswith(ISTIO_TCP) for a in alpn)


def client_alpn(http2: bool | None) -> tuple[str, ...]:
    """What a sidecar offers upstream: by the cluster's protocol (None: TCP, with the peer exchange
    first and plain `istio` for a server that does not speak it)."""
    if http2 is None:
        return (PEER_EXCHANGE_ALPN, ISTIO_TCP)
    return (ISTIO_H2,) if http2 else (ISTIO_HTTP1,)


def trust_domain(spiffe_id: str) -> str:
    return spiffe_id[len(SPIFFE_PREFIX):].split("/", 1)[0] if spiffe_id.startswith(SPIFFE_PREFIX) else ""


def service_account_san(namespace: str, service_account: str) -> str:
    """The SPIFFE ID of a service account of this mesh, as a subjectAltName compiled before the trust
    domain is known (config is compiled without it): the trust domain is left empty, and
    check_peer_identity fills in its own certificate's, the one the mesh CA issues in (Istio's
    meshConfig.trustDomain). No certificate carries an empty trust domain, so it never matches as is."""
    return f"{SPIFFE_PREFIX}/ns/{namespace}/sa/{service_account}"


def _in_trust_domain(san: str, domain: str) -> str:
    """`san` with `domain` filled in when it is a service_account_san."""
    return SPIFFE_PREFIX + domain + san[len(SPIFFE_PREFIX):] if san.startswith(SPIFFE_PREFIX + "/") else san


def server_context(identity: WorkloadIdentity, alpn: tuple[str, ...] = SERVER_ALPN,
                   versions: ProtocolVersions = ProtocolVersions(), cipher_suites: tuple[str, ...] = (),
                   session_tickets: bool = True) -> TlsContext:
    """Terminating mesh mTLS (a sidecar's inbound, a Gateway server in ISTIO_MUTUAL).
    `session_tickets`: OpenSSL's two stateless tickets per full handshake (one per resumption), as
    Envoy's sidecars send, so that a client sidecar, ours or Envoy's, resumes next time instead of
    exchanging certificates (proxy/tls/sessions.py); each costs the server about 0.35M instructions.
    Without, two small stateful tickets that resume nothing."""
    context = base_context(True, alpn, versions, cipher_suites)
    identity.load_into(context)
    context.require_peer_certificate()
    context.bind_sessions(b"mesh", identity.certificate_chain_pem, identity.trust_bundle_pem)
    if not session_tickets:
        context.without_session_tickets()
    return context


def client_context(identity: WorkloadIdentity, alpn: tuple[str, ...]) -> TlsContext:
    context = base_context(False, alpn)
    identity.load_into(context)
    # the server is checked by its SPIFFE ID after the handshake (check_peer_identity), not by host
    # name: mesh certificates carry no DNS names
    context.check_hostname = False
    context.require_peer_certificate()
    return context


class MeshContexts:
    """The contexts of the current identity, remade when the identity object changes."""

    __slots__ = ("_identity", "_server", "_clients", "session_tickets")

    def __init__(self, session_tickets: bool = True) -> None:
        self.session_tickets = session_tickets  # the server context's (server_context)
        self._identity: WorkloadIdentity | None = None
        self._server: TlsContext | None = None
        self._clients: dict[tuple[str, ...], TlsContext] = {}

    def _follow(self, identity: WorkloadIdentity) -> None:
        if identity is not self._identity:
            self._identity, self._server, self._clients = identity, None, {}

    def server(self, identity: WorkloadIdentity) -> TlsContext:
        self._follow(identity)
        if self._server is None:
            self._server = server_context(identity, session_tickets=self.session_tickets)
        return self._server

    def client(self, identity: WorkloadIdentity, alpn: tuple[str, ...]) -> TlsContext:
        self._follow(identity)
        context = self._clients.get(alpn)
        if context is None:
            context = self._clients[alpn] = client_context(identity, alpn)
        return context


def check_peer_identity(peer: dict | None, subject_alt_names: tuple[str, ...], own_spiffe_id: str) -> str:
    """After an originating handshake: the server's SPIFFE ID must be one of `subject_alt_names` (the
    service's accounts, proxy/config/upstream_tls.py; service_account_san ones in our trust domain),
    or, when none are known, any identity of our own trust domain (Istio checks only the chain then;
    the mesh CA issues in no other trust domain). Returns the server's SPIFFE ID; TlsHandshakeError
    reason `fail_verify_san` otherwise."""
    uris = [value for kind, value in (peer or {}).get("subjectAltName", ()) if kind == "URI"]
    spiffe = next((u for u in uris if u.startswith(SPIFFE_PREFIX)), None)
    if spiffe is None:
        raise TlsHandshakeError(f"upstream certificate has no SPIFFE ID (URI SANs {uris})", "fail_verify_san")
    if subject_alt_names:
        wanted = [_in_trust_domain(san, trust_domain(own_spiffe_id)) for san in subject_alt_names]
        if spiffe not in wanted:
            raise TlsHandshakeError(f"upstream identity {spiffe} is none of subjectAltNames {wanted}",
                                    "fail_verify_san")
    elif trust_domain(spiffe) != trust_domain(own_spiffe_id):
        raise TlsHandshakeError(f"upstream identity {spiffe} is outside trust domain "
                                f"{trust_domain(own_spiffe_id)}", "fail_verify_san")
    return spiffe
