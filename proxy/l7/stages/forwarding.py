"""Forwarding headers, as Envoy sets them: x-forwarded-for, x-forwarded-proto, x-request-id, and
x-forwarded-client-cert (XFCC) as Istio configures Envoy for each kind of listener:

| listener | XFCC (Envoy's forward_client_cert_details) |
|---|---|
| a sidecar's inbound | APPEND_FORWARD: over mutual TLS the client sidecar's element (subject, URI and DNS SANs) is appended to what came; otherwise removed |
| a Gateway's TLS server | SANITIZE_SET (Istio's gatewayTopology default): over mutual TLS replaced by the client's element (with the certificate); otherwise removed |
| any other (a sidecar's outbound, a Gateway's plaintext server) | SANITIZE: removed |

So an app, or a client outside the mesh, can never write the identity a server's app reads: only a
proxy that verified the client's certificate adds an element. The element's text is
proxy/tls/client_cert.py's. (The proxy's own peer metadata toward a mesh-internal cluster is added by
the upstream encoders: chain.Chain.peer_header.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.l7.request_ids import new_request_id

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext

XFCC = b"x-forwarded-client-cert"


class ForwardingStage:
    """x-forwarded-for, x-forwarded-proto, x-request-id; any x-forwarded-client-cert removed."""

    has_response_step = False
    writes_client_cert = False  # ClientCertForwardingStage: XFCC written over mutual TLS
    __slots__ = ()

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.request
        headers = head.headers
        for pair in headers:
            if pair[0] in _FORWARDING_NAMES:  # a client or an earlier proxy set some: merge
                came = self._merge(ctx, headers)
                break
        else:
            request_id = new_request_id()
            headers += ((b"x-forwarded-for", ctx.downstream_ip), (b"x-forwarded-proto", head.scheme),
                        (b"x-request-id", request_id))
            ctx.request_id = request_id
            came = None
        if self.writes_client_cert:
            self._write_client_cert(ctx, came)
        return None

    def _write_client_cert(self, ctx: RequestContext, came: bytes | None) -> None:
        raise NotImplementedError  # called only where writes_client_cert is set

    @staticmethod
    def _merge(ctx: RequestContext, headers: list) -> bytes | None:
        """x-forwarded-for gets the client appended; x-forwarded-proto and x-request-id are kept;
        x-forwarded-client-cert is taken out (its values returned)."""
        xff_index = -1
        request_id = b""
        has_proto = False
        client_certs = None
        for i, (name, value) in enumerate(headers):
            if name == b"x-forwarded-for":
                xff_index = i
            elif name == b"x-request-id":
                request_id = value
            elif name == b"x-forwarded-proto":
                has_proto = True
            elif name == XFCC:
                client_certs = value if client_certs is None else client_certs + b"," + value
        client_ip = ctx.downstream_ip
        if xff_index == -1:
            headers.append((b"x-forwarded-for", client_ip))
        else:
            headers[xff_index] = (b"x-forwarded-for", headers[xff_index][1] + b"," + client_ip)
        if client_certs is not None:
            headers[:] = [pair for pair in headers if pair[0] != XFCC]
        if not has_proto:
            headers.append((b"x-forwarded-proto", ctx.request.scheme))
        if not request_id:
            request_id = new_request_id()
            headers.append((b"x-request-id", request_id))
        ctx.request_id = request_id
        return client_certs


class ClientCertForwardingStage(ForwardingStage):
    """ForwardingStage on a listener that writes x-forwarded-client-cert over mutual TLS: appending
    to what came (`append`, a sidecar's inbound) or replacing it (a Gateway's TLS server, whose
    element carries the certificate: `with_cert`)."""

    writes_client_cert = True
    __slots__ = ("append", "with_cert")

    def __init__(self, *, append: bool, with_cert: bool) -> None:
        self.append = append
        self.with_cert = with_cert

    def _write_client_cert(self, ctx: RequestContext, came: bytes | None) -> None:
        """`came`: the x-forwarded-client-cert values the request arrived with (already removed)."""
        element = ctx.peer.client_cert(self.with_cert)
        if element is not None:
            if self.append and came:
                element = came + b"," + element
            ctx.request.headers.append((XFCC, element))


_FORWARDING_NAMES = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id", XFCC})
