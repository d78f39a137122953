"""What a transparent sidecar does with one captured connection, decided from the snapshot. Pure.

The capture rules send every TCP connection the app opens to virtualOutbound (:15001) and every
connection arriving for the app to virtualInbound (:15006); the kernel keeps where each was going
(SO_ORIGINAL_DST). This module turns that address (and, when it matters, what the first bytes look
like) into one `Decision`, the way Envoy's original_dst listener picks a filter chain in Istio:

Only the services the capturing Sidecar's egress `hosts` name are known (Snapshot.captured_hosts).
outbound, by original destination (a ServiceEntry `addresses` VIP and port, else a service
endpoint's address and port, else a service known by name only (no VIP, no IP endpoint) on that
port):
  known service, HTTP port, HTTP/1 or h2c -> L7: the virtual listener `outbound|<port>|<host>`
                                             (that service's routes: splits, header matches...)
  known service, anything else            -> Tcp: the TCP proxy to one endpoint of its cluster
                                             (resolution NONE: to the original destination)
  not known by address, TLS whose SNI     -> Tcp to that service (TLS passthrough routed by SNI,
    matches a TLS/HTTPS ServiceEntry host    as Envoy's server_names filter chain match does;
    on that port                             `*.example.com` hosts match any subdomain)
  a Tcp decision for a service with mesh VirtualService `tls` routes (sniHosts, port,
  destinationSubnets) or `tcp` routes (port, destinationSubnets): the first matching route's
  weighted destination cluster instead of the service's own
  unknown, outboundTrafficPolicy ALLOW_ANY -> Passthrough to the original destination
                                             (Istio's PassthroughCluster)
  unknown, REGISTRY_ONLY                   -> Refuse: 502 for HTTP, a reset for TCP (BlackHoleCluster)
inbound, by original destination port:
  a captured Sidecar ingress port, HTTP/1 -> L7: the virtual listener `inbound|<port>` (to its
    or h2c                                   defaultEndpoint)
  that port, other bytes                  -> Tcp to the same defaultEndpoint
  any other port                          -> Passthrough to the original destination from
                                             127.0.0.6 (InboundPassthroughCluster; the capture
                                             rules let that source through to the app)

`needs_sniff` says whether the first bytes can change the decision; when they cannot (a TCP
service, ALLOW_ANY passthrough, an undeclared inbound port) the connection is proxied at once,
so server-first protocols never wait for the sniffing timeout.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping

from proxy.config.compile import captured_inbound_listener, captured_outbound_listener
from proxy.config.snapshot import L4Route, Snapshot, cluster_name
from proxy.l4.addrs import OrigDstAddr, UpstreamAddr
from proxy.l4.outbound import OutboundTrafficPolicyMode
from proxy.l4.sniff import Protocol

PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
# the source Istio's sidecar uses to hand inbound passthrough connections to the app
INBOUND_PASSTHROUGH_SOURCE_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_SOURCE_V6 = "::6"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """A captured service port: what the original destination was found to be."""

    host: str
    port: int  # the service port (the cluster's), not necessarily the endpoint's
    cluster: str
    listener: str | None  # the virtual L7 listener, for HTTP ports


TLS_PROTOCOLS = frozenset({"TLS", "HTTPS"})
# what the L7 server takes on a captured HTTP port: HTTP/1.x, and HTTP/2 with prior knowledge (h2c)
HTTP_PROTOCOLS = frozenset({Protocol.HTTP1, Protocol.HTTP2})


@dataclass(frozen=True, slots=True)
class InboundPort:
    port: int
    cluster: str  # inbound|<port>||, its one endpoint is the Sidecar's defaultEndpoint
    listener: str | None


# --- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class L7:
    """Serve the connection's HTTP/1 requests on this virtual listener."""

    listener: str


@dataclass(frozen=True, slots=True)
class Tcp:
    """TCP-proxy to one endpoint of this cluster."""

    cluster: str


@dataclass(frozen=True, slots=True)
class Passthrough:
    """TCP-proxy to the original destination as it is (from `bind_ip` when set)."""

    upstream: UpstreamAddr
    cluster: str
    bind_ip: str | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """REGISTRY_ONLY and an unknown destination: 502 to HTTP, reset to anything else."""

    reason: str


Decision = L7 | Tcp | Passthrough | Refuse


@dataclass(frozen=True, slots=True)
class CaptureTable:
    """The snapshot's answers for captured traffic, computed once per snapshot."""

    by_address: Mapping[tuple[str, int], ServicePort]  # VIPs, then endpoint addresses
    by_port: Mapping[int, ServicePort]  # services with neither VIP nor IP endpoints, first one per port
    inbound: Mapping[int, InboundPort]
    mode: OutboundTrafficPolicyMode
    # TLS/HTTPS services with neither VIP nor IP endpoints, told apart by SNI: port -> exact names,
    # and (".suffix", service) for "*.suffix" hosts, longest first
    sni_exact: Mapping[int, Mapping[str, ServicePort]] = field(default_factory=dict)
    sni_suffixes: Mapping[int, tuple[tuple[str, ServicePort], ...]] = field(default_factory=dict)
    l4_routes: Mapping[str, tuple[L4Route, ...]] = field(default_factory=dict)  # by service host
    tls_routed: frozenset[str] = frozenset()  # service hosts with tls routes: their SNI matters

    def route_l4(self, svc: ServicePort, sni: str | None, dst: OrigDstAddr, rand_below: Callable[[int], int]) -> str:
        """The cluster of the first tls/tcp route of `svc` matching the connection, else its own."""
        for route in self.l4_routes.get(svc.host, ()):
            if route.matches_connection(sni, dst.ip, dst.port):
                return route.pick_cluster(rand_below)
        return svc.cluster

    def lookup(self, dst: OrigDstAddr) -> ServicePort | None:
        svc = self.by_address.get((dst.ip, dst.port))
        if svc is None:
            svc = self.by_port.get(dst.port)
        return svc

    def lookup_sni(self, port: int, sni: str | None) -> ServicePort | None:
        if not sni:
            return None
        exact = self.sni_exact.get(port)
        if exact is not None and sni in exact:
            return exact[sni]
        for suffix, svc in self.sni_suffixes.get(port, ()):
            if sni.endswith(suffix):
                return svc
        return None

    def routes_by_sni(self, port: int) -> bool:
        return port in self.sni_exact or port in self.sni_suffixes


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def capture_table(snapshot: Snapshot) -> CaptureTable:
    listeners = {listener.name for listener in snapshot.listeners}

    def service_port(host: str, port: int) -> ServicePort:
        name = captured_outbound_listener(port, host)
        return ServicePort(host, port, cluster_name(host, port), name if name in listeners else None)

    visible = snapshot.captured_hosts  # None: every service
    by_address: dict[tuple[str, int], ServicePort] = {}
    by_port: dict[int, ServicePort] = {}
    sni_exact: dict[int, dict[str, ServicePort]] = {}
    sni_suffixes: dict[int, list[tuple[str, ServicePort]]] = {}
    vip_services: set[str] = set()
    for (ip, port), host in snapshot.service_addresses.items():
        if visible is not None and host not in visible:
            continue
        if ip != "*":
            by_address.setdefault((ip, port), service_port(host, port))
            vip_services.add(host)
    for cluster in snapshot.clusters.values():
        if cluster.subset or not cluster.service_host or not cluster.name.startswith("outbound|"):
            continue
        if visible is not None and cluster.service_host not in visible:
            continue  # outside the Sidecar's egress hosts: unknown to captured traffic
        ips = [ep for ep in cluster.endpoints if _is_ip(ep.address)]
        # a client that resolved a name to an endpoint (no VIP) dials the endpoint itself
        for ep in ips:
            key = (str(ipaddress.ip_address(ep.address)), ep.port)
            by_address.setdefault(key, service_port(cluster.service_host, cluster.port))
        if ips or cluster.service_host in vip_services:
            continue
        svc = service_port(cluster.service_host, cluster.port)
        host = cluster.service_host.lower()
        if cluster.protocol in TLS_PROTOCOLS:
            # no address to recognise it by, but TLS names itself: the SNI picks the service
            if host.startswith("*."):
                sni_suffixes.setdefault(cluster.port, []).append((host[1:], svc))
            else:
                sni_exact.setdefault(cluster.port, {}).setdefault(host, svc)
        else:
            # no address to recognise it by (DNS names, resolution NONE): it owns its port, like a
            # TCP service without VIP in Istio; the first such service per port wins
            by_port.setdefault(cluster.port, svc)
    inbound: dict[int, InboundPort] = {}
    for listener in snapshot.listeners:
        if listener.traffic_direction == "INBOUND" and not listener.bind_to_port and not listener.use_original_dst:
            if listener.name == captured_inbound_listener(listener.port):
                inbound[listener.port] = InboundPort(listener.port, f"inbound|{listener.port}||", listener.name)
    try:
        mode = OutboundTrafficPolicyMode(snapshot.outbound_traffic_policy)
    except ValueError:
        mode = OutboundTrafficPolicyMode.ALLOW_ANY
    suffixes = {port: tuple(sorted(items, key=lambda item: -len(item[0]))) for port, items in sni_suffixes.items()}
    tls_routed = frozenset(h for h, routes in snapshot.l4_routes.items() if any(r.kind == "tls" for r in routes))
    return CaptureTable(by_address, by_port, inbound, mode, sni_exact, suffixes, snapshot.l4_routes, tls_routed)


def outbound_needs_sniff(table: CaptureTable, dst: OrigDstAddr) -> bool:
    svc = table.lookup(dst)
    if svc is not None:
        return svc.listener is not None or svc.host in table.tls_routed
    if table.routes_by_sni(dst.port):
        return True
    return table.mode is OutboundTrafficPolicyMode.REGISTRY_ONLY  # 502 or reset: HTTP decides


def decide_outbound(table: CaptureTable, dst: OrigDstAddr, protocol: Protocol | None, sni: str | None = None,
                    rand_below: Callable[[int], int] = random.randrange) -> Decision:
    """`protocol` (and the TLS `sni`): what sniffing found, None when outbound_needs_sniff said no.
    `rand_below(n)`: uniform in [0, n), for weighted tls/tcp routes (injected by tests)."""
    svc = table.lookup(dst)
    if svc is not None:
        if svc.listener is not None and protocol in HTTP_PROTOCOLS:
            return L7(svc.listener)
        return Tcp(table.route_l4(svc, sni if protocol is Protocol.TLS else None, dst, rand_below))
    if protocol is Protocol.TLS:
        svc = table.lookup_sni(dst.port, sni)
        if svc is not None:
            return Tcp(table.route_l4(svc, sni, dst, rand_below))
    if table.mode is OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return Refuse(f"{dst} is not a service address (outboundTrafficPolicy REGISTRY_ONLY)")
    return Passthrough(UpstreamAddr(dst.ip, dst.port), PASSTHROUGH_CLUSTER)


def inbound_needs_sniff(table: CaptureTable, dst: OrigDstAddr) -> bool:
    port = table.inbound.get(dst.port)
    return port is not None and port.listener is not None


def decide_inbound(table: CaptureTable, dst: OrigDstAddr, protocol: Protocol | None) -> Decision:
    port = table.inbound.get(dst.port)
    if port is not None:
        if port.listener is not None and protocol in HTTP_PROTOCOLS:
            return L7(port.listener)
        return Tcp(port.cluster)
    source = INBOUND_PASSTHROUGH_SOURCE_V6 if ":" in dst.ip else INBOUND_PASSTHROUGH_SOURCE_V4
    return Passthrough(UpstreamAddr(dst.ip, dst.port), INBOUND_PASSTHROUGH_CLUSTER, bind_ip=source)
