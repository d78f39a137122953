"""AuthorizationPolicies on TCP connections (Gateway TCP servers, a sidecar's captured inbound TCP):
decided once, when the connection is accepted, before any upstream connection; a denial closes the
connection at once (Envoy's network RBAC filter), counted and logged with the policy that matched."""

from __future__ import annotations

import structlog

from proxy.authz.evaluate import Attributes, evaluate, parse_ip
from proxy.authz.policy import WorkloadAuthorization
from proxy.authz.stats import RbacCounters
from proxy.stats import Stats

log = structlog.get_logger("triomesh.authz")


def connection_attributes(client_ip: str, destination: tuple[str, int] | None, peer_principal: str | None = None,
                          sni: str | None = None) -> Attributes:
    source = parse_ip(client_ip)
    return Attributes(
        source_ip=source,
        remote_ip=source,  # no x-forwarded-for on TCP: the original client is the peer
        principal=peer_principal,
        destination_ip=parse_ip(destination[0]) if destination is not None else None,
        destination_port=destination[1] if destination is not None else None,
        sni=sni,
    )


class ConnectionAuthorizer:
    """One per TCP server of a worker; counters per listener."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._counters: dict[str, RbacCounters] = {}

    def allows(self, authorization: WorkloadAuthorization, listener: str, client_ip: str,
               destination: tuple[str, int] | None, peer_principal: str | None = None, sni: str | None = None) -> bool:
        verdict = evaluate(authorization, connection_attributes(client_ip, destination, peer_principal, sni))
        counters = self._counters.get(listener)
        if counters is None:
            counters = self._counters[listener] = RbacCounters(self.stats, listener)
        counters.count(verdict.allowed, bool(verdict.audit))
        if verdict.audit:
            log.info("connection matched an audit policy", listener=listener, client=client_ip, policy=verdict.audit)
        if not verdict.allowed:
            log.info("connection denied by authorization policy", listener=listener, client=client_ip,
                     destination=f"{destination[0]}:{destination[1]}" if destination is not None else "-",
                     policy=verdict.policy, details=verdict.details)
        return verdict.allowed
