"""Forwarding headers at the edge, as Envoy sets them: x-forwarded-for, x-forwarded-proto, x-request-id.
(The proxy's own peer metadata toward a mesh-internal cluster is added by the upstream encoders:
chain.Chain.peer_header.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.l7.request_ids import new_request_id

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext


class ForwardingStage:
    has_response_step = False
    __slots__ = ()

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.request
        headers = head.headers
        for pair in headers:
            if pair[0] in _FORWARDING_NAMES:  # a client or an earlier proxy set some: merge
                self._merge(ctx, headers)
                break
        else:
            request_id = new_request_id()
            headers += ((b"x-forwarded-for", ctx.downstream_ip), (b"x-forwarded-proto", head.scheme),
                        (b"x-request-id", request_id))
            ctx.request_id = request_id
        return None

    @staticmethod
    def _merge(ctx: RequestContext, headers: list) -> None:
        """x-forwarded-for gets the client appended; x-forwarded-proto and x-request-id are kept."""
        xff_index = -1
        request_id = b""
        has_proto = False
        for i, (name, value) in enumerate(headers):
            if name == b"x-forwarded-for":
                xff_index = i
            elif name == b"x-request-id":
                request_id = value
            elif name == b"x-forwarded-proto":
                has_proto = True
        client_ip = ctx.downstream_ip
        if xff_index == -1:
            headers.append((b"x-forwarded-for", client_ip))
        else:
            headers[xff_index] = (b"x-forwarded-for", headers[xff_index][1] + b"," + client_ip)
        if not has_proto:
            headers.append((b"x-forwarded-proto", ctx.request.scheme))
        if not request_id:
            request_id = new_request_id()
            headers.append((b"x-request-id", request_id))
        ctx.request_id = request_id


_FORWARDING_NAMES = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"})
