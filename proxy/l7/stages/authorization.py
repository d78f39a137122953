"""Authorization stage: the workload's AuthorizationPolicies decide each request before routing.
A denial is Envoy's RBAC reply, 403 `RBAC: access denied`, with the matched policy in the access
log's response_code_details (`rbac_access_denied_matched_policy[ns[..]-policy[..]-rule[..]]`).

The chain has this stage only on a listener that enforces policies (a Gateway server, a Sidecar
inbound listener) when some policy applies to the workload, so a request nothing governs pays
nothing for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from proxy.authz.evaluate import Attributes, evaluate, parse_ip, remote_address
from proxy.authz.paths import normalize_path
from proxy.authz.stats import RbacCounters
from proxy.l7.chain import LocalResponse

if TYPE_CHECKING:
    from proxy.authz.policy import WorkloadAuthorization
    from proxy.l7.context import RequestContext
    from proxy.stats import Stats

log = structlog.get_logger("triomesh.authz")

DENIED_BODY = b"RBAC: access denied"  # Envoy's RBAC filter reply body
# Istio's numTrustedProxies default: remote.ip / remoteIpBlocks see the direct peer, not
# x-forwarded-for (which any client can write)
NUM_TRUSTED_PROXIES = 0


def request_attributes(ctx: RequestContext, num_trusted_proxies: int = NUM_TRUSTED_PROXIES) -> Attributes:
    head = ctx.request
    peer = ctx.peer
    source_ip = parse_ip(ctx.downstream_ip)
    destination = ctx.original_destination or peer.local_address()
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    return Attributes(
        source_ip=source_ip,
        remote_ip=remote_address(source_ip, headers.get("x-forwarded-for"), num_trusted_proxies),
        principal=peer.peer_principal,
        destination_ip=parse_ip(destination[0]) if destination is not None else None,
        destination_port=destination[1] if destination is not None else (ctx.listener.port if ctx.listener else None),
        sni=peer.sni,
        http=True,
        method=head.method.decode("latin-1"),
        host=head.authority.decode("latin-1"),
        path=normalize_path(head.target),
        headers=headers,
    )


class AuthorizationStage:
    has_response_step = False
    __slots__ = ("authorization", "counters", "listener")

    def __init__(self, authorization: WorkloadAuthorization, stats: Stats, listener: str) -> None:
        self.authorization = authorization
        self.counters = RbacCounters(stats, listener)
        self.listener = listener

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        verdict = evaluate(self.authorization, request_attributes(ctx))
        self.counters.count(verdict.allowed, bool(verdict.audit))
        if verdict.audit:  # AUDIT policies only mark the request, for the access log
            ctx.scratch()["access_log_hint"] = True
        if verdict.allowed:
            return None
        ctx.scratch()["response_code_details"] = verdict.details
        log.info("request denied by authorization policy", listener=self.listener, client=ctx.downstream_addr,
                 method=ctx.request.method.decode("latin-1"), path=ctx.request.path.decode("latin-1"),
                 policy=verdict.policy)
        return LocalResponse(403, DENIED_BODY)
