"""Outbound policy: what to do with a captured connection, given where it was going.

Pure. The sidecar's outbound listener (port 15001) sees every TCP connection the app opens. If the
original destination is a known service address (a service VIP or an endpoint, with port) we route
it through that service's cluster; otherwise Istio's `meshConfig.outboundTrafficPolicy.mode`
decides: ALLOW_ANY forwards it untouched to the original destination (PassthroughCluster),
REGISTRY_ONLY refuses it (BlackHoleCluster). The config compiler fills the table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from proxy.l4.addrs import OrigDstAddr


class OutboundTrafficPolicyMode(enum.Enum):
    """Istio MeshConfig.OutboundTrafficPolicy.Mode (the default is ALLOW_ANY)."""

    ALLOW_ANY = "ALLOW_ANY"
    REGISTRY_ONLY = "REGISTRY_ONLY"


@dataclass(frozen=True, slots=True)
class ServiceTable:
    """(ip, port) -> service host name (e.g. "reviews.default.svc.cluster.local").

    Keys are plain (ip, port) pairs of *service* addresses; an ip of "*" matches any address on that
    port (Istio's catch-all for services without a VIP, e.g. headless ones on a dedicated port).
    """

    by_address: Mapping[tuple[str, int], str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, entries: Mapping[tuple[str, int], str]) -> "ServiceTable":
        return cls(MappingProxyType(dict(entries)))

    def lookup(self, dst: OrigDstAddr) -> str | None:
        service = self.by_address.get((dst.ip, dst.port))
        if service is None:
            service = self.by_address.get(("*", dst.port))
        return service


@dataclass(frozen=True, slots=True)
class Route:
    """Send through the named service's cluster (load balancing, policies, telemetry)."""

    service: str


class _Verdict(enum.Enum):
    PASSTHROUGH = "PassthroughCluster"  # ALLOW_ANY: dial the original destination as is
    REFUSE = "BlackHoleCluster"  # REGISTRY_ONLY: close the connection


PASSTHROUGH = _Verdict.PASSTHROUGH
REFUSE = _Verdict.REFUSE

OutboundDecision = Route | _Verdict


def decide_outbound(
    dst: OrigDstAddr, table: ServiceTable, mode: OutboundTrafficPolicyMode = OutboundTrafficPolicyMode.ALLOW_ANY
) -> OutboundDecision:
    """Route to a known service, else pass through (ALLOW_ANY) or refuse (REGISTRY_ONLY)."""
    service = table.lookup(dst)
    if service is not None:
        return Route(service)
    if mode is OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return REFUSE
    return PASSTHROUGH
