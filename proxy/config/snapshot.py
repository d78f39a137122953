"""The compiled, immutable config a proxy serves from: listeners, route tables, clusters.

Theory of operation: `proxy.config.compile.compile_resources()` turns validated Istio resources into
one `Snapshot`. Everything a request needs is precomputed here (matchers compiled, weights turned into
cumulative tables, cluster names resolved), so the per-request path only reads. A running proxy holds
exactly one Snapshot reference; a reload builds a new one and rebinds that reference. A request reads
the reference once, when its head arrives, and keeps that snapshot until it ends.

Cluster names follow Istio's `outbound|<port>|<subset>|<host>` (subset empty when none).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from proxy.l7.events import RequestHead


def cluster_name(host: str, port: int, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    service_host: str
    port: int
    subset: str
    endpoints: tuple[Endpoint, ...]
    lb_policy: str = "ROUND_ROBIN"  # DestinationRule trafficPolicy.loadBalancer.simple
    connect_timeout_s: float = 10.0
    # ServiceEntry resolution: STATIC (IP endpoints), DNS / DNS_ROUND_ROBIN (endpoint addresses may be
    # host names, resolved when connecting), NONE (no endpoints: original destination)
    resolution: str = "STATIC"
    protocol: str = "HTTP"  # the service port's protocol


@dataclass(frozen=True, slots=True)
class RouteDestination:
    cluster: str  # a key of Snapshot.clusters
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """One VirtualService http route, compiled. `matches` is OR over Istio match blocks."""

    name: str
    virtual_service: str  # "namespace/name"
    matches: Callable[[RequestHead], bool]
    destinations: tuple[RouteDestination, ...]
    # cumulative weights, same order as destinations; last element is the total
    cumulative_weights: tuple[int, ...]
    timeout_s: float | None = None

    def pick_cluster(self, rand_below: Callable[[int], int]) -> str:
        """Weighted pick. `rand_below(n)` returns a uniform int in [0, n) (injected for tests)."""
        dests = self.destinations
        if len(dests) == 1:
            return dests[0].cluster
        r = rand_below(self.cumulative_weights[-1])
        return dests[bisect.bisect_right(self.cumulative_weights, r)].cluster


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]

    def route_for(self, head: RequestHead) -> Route | None:
        for route in self.routes:
            if route.matches(head):
                return route
        return None


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Virtual hosts of one listener, looked up by authority like Envoy: exact domain, then the
    longest `*.suffix` wildcard, then `*`. Port in the authority is ignored when the domain has none."""

    exact: Mapping[bytes, VirtualHost]
    suffixes: tuple[tuple[bytes, VirtualHost], ...]  # (".example.com", vh), longest first
    catch_all: VirtualHost | None

    def virtual_host_for(self, authority: bytes) -> VirtualHost | None:
        host = authority.lower()
        vh = self.exact.get(host)
        if vh is not None:
            return vh
        colon = host.rfind(b":")
        if colon != -1 and b"]" not in host[colon:]:
            host = host[:colon]
            vh = self.exact.get(host)
            if vh is not None:
                return vh
        for suffix, vh in self.suffixes:
            if host.endswith(suffix):
                return vh
        return self.catch_all


@dataclass(frozen=True, slots=True)
class Listener:
    name: str  # e.g. "0.0.0.0_8080"
    address: str
    port: int
    protocol: str  # Gateway server port.protocol: HTTP, TCP, ...
    route_table: RouteTable
    # OUTBOUND: gateway and Sidecar egress listeners; INBOUND: Sidecar ingress (to the local app)
    traffic_direction: str = "OUTBOUND"


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    listeners: tuple[Listener, ...]
    clusters: Mapping[str, Cluster]
    # JSON-able view of the active config and compiled state, served by /config_dump
    dump: Mapping[str, Any] = field(default_factory=dict)
    # captured (transparent) outbound traffic: (ip, port) of a service address -> service host (its
    # clusters are `outbound|port||host`); ip "*" for services without `addresses` (first one per port)
    service_addresses: Mapping[tuple[str, int], str] = field(default_factory=dict)
    # Sidecar outboundTrafficPolicy.mode for traffic to unknown destinations (Istio's default ALLOW_ANY)
    outbound_traffic_policy: str = "ALLOW_ANY"


EMPTY_SNAPSHOT = Snapshot(version="", listeners=(), clusters={})
