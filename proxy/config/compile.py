"""Compile validated Istio resources into one immutable Snapshot (listeners, route tables, clusters).

Theory of operation. Pure apart from reading the certificate files Gateway servers name (loaded once
to check them, gateway_tls.py): same input -> same Snapshot.
1. registry: ServiceEntry hosts + endpoints (inline or selected WorkloadEntries), DestinationRules ->
   clusters `outbound|port|subset|host` (registry.py).
2. every VirtualService http route is checked once: destinations resolve to a service, port and
   subset (a dangling reference is a ConfigError at its field path), weights become cumulative.
3. listeners: one per Gateway server port (routes from VirtualServices naming that Gateway, host
   sets intersected with the server's hosts), one per Sidecar egress listener with a port (the "mesh"
   VirtualServices plus a default route per service host no VirtualService covers), one per Sidecar
   ingress listener (everything to its defaultEndpoint). Matchers are compiled per listener, because
   `port`, `gateways` and `sourceLabels` in a match block are fixed per listener.
4. capture (a transparent sidecar): when a Sidecar that applies sets `captureMode: IPTABLES` on an
   egress or ingress listener, the proxy's traffic is captured by iptables (`triomesh capture`), so
   the compiler adds Istio's two capture listeners, virtualOutbound :15001 and virtualInbound :15006
   (use_original_dst), and virtual listeners they hand HTTP connections to (bind_to_port False):
   `outbound|<port>|<host>` per HTTP-family service port (HTTP, HTTP2, GRPC, GRPC-WEB), with the
   mesh VirtualService routes of that host (or a default route to its cluster) as the catch-all
   virtual host, since the original destination already chose the service; and `inbound|<port>`
   per ingress listener captured (DEFAULT follows the Sidecar's capture, NONE keeps a bound listener).
5. mesh VirtualService `tls` (sniHosts) and `tcp` routes, checked like http destinations, by the
   service host they cover (Snapshot.l4_routes): a sidecar routes captured TLS/TCP with them.
6. Gateway servers of an opaque TCP protocol (TCP, MONGO, MYSQL, REDIS: Istio proxies them all as
   TCP at a gateway) get a TCP listener and the first `tcp` route, in VirtualService order, of a
   VirtualService bound to the Gateway whose hosts meet the server's and whose match blocks accept
   the server's port and Gateway (Istio decides only on those two at a gateway).
7. Gateway servers over TLS (gateway_tls.py): HTTPS servers in mode SIMPLE or MUTUAL share an HTTPS
   listener per port whose handshake picks a server by SNI, each server's routes in a virtual
   listener of its own (TLS servers in those modes likewise, with a tcp route each); PASSTHROUGH servers (TLS or HTTPS) get a TLS listener with the tls routes
   bound to the Gateway, chosen by SNI; an HTTP server with tls.httpsRedirect answers 301 to https.
Virtual-host domains follow Istio: short names resolve in the resource's namespace, and a client may
use "name", "name.ns", "name.ns.svc" or the FQDN; a ServiceEntry host is also matched literally.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgspec

from proxy.authz import compile as authz_compile
from proxy.authz import peer_authentication
from proxy.config import telemetry
from proxy.config import gateway_tls, hosts, policies
from proxy.config.errors import ConfigError
from proxy.config.istio import (
    HTTP_PROTOCOLS,
    Destination,
    GatewaySpec,
    HTTPRoute,
    IstioObject,
    SidecarSpec,
    VirtualServiceSpec,
    is_http_protocol,
)
from proxy.config.load import Resource, check_duplicates
from proxy.config.locality import describe as describe_locality_lb
from proxy.config.locality import proxy_locality
from proxy.config.matchers import MatchContext, always, compile_matches, merge_matches
from proxy.config.registry import (
    ROOT_NAMESPACE,
    FrozenLabels,
    Registry,
    Service,
    build_clusters,
    build_registry,
    mesh_addresses,
    service_addresses,
)
from proxy.config.sidecars import select_sidecar
from proxy.config.snapshot import (
    Cluster,
    Endpoint,
    L4Route,
    Listener,
    Redirect,
    Route,
    RouteDestination,
    RouteTable,
    ServerTls,
    Snapshot,
    VirtualHost,
    cluster_name,
)

MESH = "mesh"
DEFAULT_EGRESS_BIND = "127.0.0.1"
# listener protocols the data plane serves today (Gateway servers, Sidecar ingress): the HTTP family,
# served by one kind of listener, HTTP/1.1 and h2c alike; its Listener.protocol is "HTTP"
LISTENER_PROTOCOLS = HTTP_PROTOCOLS
# opaque TCP protocols a Gateway server proxies through VirtualService `tcp` routes (Istio's gateway
# builds a tcp_proxy for every non-HTTP server without tls; MONGO/MYSQL/REDIS filters are off by default)
GATEWAY_TCP_PROTOCOLS = frozenset({"TCP", "MONGO", "MYSQL", "REDIS"})
# Gateway server protocols over TLS: HTTPS terminated (SIMPLE, MUTUAL) or passed through by SNI
# (PASSTHROUGH), TLS passed through by SNI
GATEWAY_TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})
EGRESS_PROTOCOLS = HTTP_PROTOCOLS | {"HTTP_PROXY"}  # HTTP_PROXY: Istio's explicit-proxy egress port
# Istio's capture ports (istio-iptables -p / -z) and listener names
VIRTUAL_OUTBOUND_PORT = 15001
VIRTUAL_INBOUND_PORT = 15006
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"


def captured_outbound_listener(port: int, host: str) -> str:
    """Name of the virtual listener serving captured HTTP traffic to one service port."""
    return f"outbound|{port}|{host}"


def captured_inbound_listener(port: int) -> str:
    """Name of the virtual listener serving captured inbound HTTP traffic to one local port."""
    return f"inbound|{port}"


def _https_redirect_route() -> tuple[Route, dict]:
    route = Route(name="https_redirect", virtual_service="", matches=always(), destinations=(),
                  cumulative_weights=(), redirect=Redirect(scheme=b"https", code=301))
    return route, _route_dump(route, [])


def _as_resource(item: Resource | IstioObject) -> Resource:
    return item if isinstance(item, Resource) else Resource(item)


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    """A selector applies when the proxy's labels are unknown (None) or include every selector label."""
    if labels is None:
        return True
    return all(labels.get(k) == v for k, v in selector.items())


def _builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj, enc_hook=str)


# --------------------------------------------------------------------------------------------------
# VirtualService routes, checked once


@dataclass(slots=True)
class _CheckedRoute:
    index: int
    spec: HTTPRoute
    destinations: tuple[RouteDestination, ...]
    cumulative: tuple[int, ...]
    policies: dict
    resource: Resource
    path: str


@dataclass(slots=True)
class _CheckedTcpRoute:
    index: int
    matches: tuple[tuple[int | None, tuple[str, ...]], ...]  # (port, resolved gateways) per match block
    destinations: tuple[RouteDestination, ...]
    cumulative: tuple[int, ...]

    def applies_to_gateway_server(self, gateway: str, port: int) -> bool:
        """Istio's l4MultiMatch at a gateway: no match block, or one whose port and gateways allow
        the server (destinationSubnets and sourceLabels are not consulted there)."""
        if not self.matches:
            return True
        return any((want is None or want == port) and (not gateways or gateway in gateways)
                   for want, gateways in self.matches)


@dataclass(slots=True)
class _CheckedTlsRoute:
    index: int
    matches: tuple[tuple[tuple[str, ...], int | None, tuple[str, ...]], ...]  # (sniHosts, port, gateways)
    destinations: tuple[RouteDestination, ...]
    cumulative: tuple[int, ...]


@dataclass(slots=True)
class _CheckedVS:
    resource: Resource
    spec: VirtualServiceSpec
    gateways: tuple[str, ...]  # resolved "ns/name" or "mesh"
    routes: list[_CheckedRoute]
    l4_routes: list[L4Route] = field(default_factory=list)  # tls/tcp routes applying to sidecars
    # every tcp route, checked, with its match blocks: Gateway TCP servers choose among them
    tcp_routes: list[_CheckedTcpRoute] = field(default_factory=list)
    # every tls route, checked, with its match blocks: Gateway PASSTHROUGH servers choose among them
    tls_routes: list[_CheckedTlsRoute] = field(default_factory=list)

    @property
    def in_mesh(self) -> bool:
        return MESH in self.gateways

    @property
    def label(self) -> str:
        return f"{self.resource.namespace}/{self.resource.name}"


def _gateway_ref(name: str, namespace: str) -> str:
    if name == MESH:
        return MESH
    return name if "/" in name else f"{namespace}/{name}"


class _Compiler:
    def __init__(self, items: list[Resource], bind_address: str, proxy_labels: Mapping[str, str] | None,
                 proxy_namespace: str | None = None, credentials_dir: str | None = None,
                 read_certificates: bool = True) -> None:
        self.bind_address = bind_address
        self.credentials_dir = credentials_dir
        self.read_certificates = read_certificates
        self.proxy_labels = proxy_labels
        self.proxy_namespace = proxy_namespace
        self.by_kind: dict[str, list[Resource]] = defaultdict(list)
        for r in items:
            self.by_kind[r.kind].append(r)
        self.registry: Registry = build_registry(
            self.by_kind["ServiceEntry"], self.by_kind["WorkloadEntry"], self.by_kind["DestinationRule"], proxy_namespace
        )
        self.clusters: dict[str, Cluster] = build_clusters(self.registry, proxy_locality(proxy_labels), credentials_dir,
                                                           self.by_kind["PeerAuthentication"])
        self.gateways: dict[str, Resource] = {f"{r.namespace}/{r.name}": r for r in self.by_kind["Gateway"]}
        # host-less VirtualServices are delegates: their routes are used only where a route delegates
        self.delegates = {(r.namespace, r.name): r for r in self.by_kind["VirtualService"] if not r.obj.spec.hosts}
        referenced = {(h.delegate.namespace or r.namespace, h.delegate.name)
                      for r in self.by_kind["VirtualService"] for h in r.obj.spec.http if h.delegate is not None}
        for key, r in self.delegates.items():
            if key not in referenced:
                raise r.error("$.spec.hosts", "a VirtualService needs at least one host (a host-less one is a delegate, "
                                              "but no route delegates to this one)")
        self.virtual_services = [self._check_vs(r) for r in self.by_kind["VirtualService"] if r.obj.spec.hosts]
        self.listeners: dict[tuple[str, int], _ListenerDraft] = {}
        self.outbound_policy = "ALLOW_ANY"  # Istio's mesh default
        self.outbound_policy_from: Resource | None = None
        self.capture = False  # an applying Sidecar says its traffic is captured by iptables
        # (sidecar namespace, "ns", "dnsName") of the port-less or captured egress listeners: the
        # services captured traffic may reach; None when no such listener scopes them (all visible)
        self.capture_scopes: list[tuple[str, str, str]] | None = None
        self.virtual: dict[str, _ListenerDraft] = {}  # bind_to_port False listeners, by name

    # ---- references

    def _resolve_destination(self, r: Resource, path: str, dest: Destination) -> str:
        svc = self.registry.lookup(dest.host, r.namespace)
        if svc is None:
            hidden = self.registry.first_declaring(dest.host)
            if hidden is not None:
                raise r.error(f"{path}.host", f"host {dest.host!r} is declared by ServiceEntry {hidden.namespace}/"
                                              f"{hidden.resource.name}, which is not exported to namespace {r.namespace!r}")
            raise r.error(f"{path}.host", f"host {dest.host!r} matches no ServiceEntry host")
        if dest.port is not None:
            port = svc.port(dest.port.number)
            if port is None:
                have = ", ".join(str(p.number) for p in svc.ports)
                raise r.error(f"{path}.port.number", f"service {svc.host!r} has no port {dest.port.number} (ports: {have})")
        elif len(svc.ports) == 1:
            port = svc.ports[0]
        else:
            have = ", ".join(str(p.number) for p in svc.ports)
            raise r.error(f"{path}.port", f"service {svc.host!r} has several ports ({have}); set port.number")
        if dest.subset and dest.subset not in svc.subset_names():
            known = ", ".join(svc.subset_names()) or "none"
            raise r.error(
                f"{path}.subset",
                f"subset {dest.subset!r} is not defined by a DestinationRule for host {svc.host!r} (subsets: {known})",
            )
        return cluster_name(svc.cluster_host, port.number, dest.subset)

    def _check_gateway_name(self, r: Resource, path: str, name: str) -> str:
        ref = _gateway_ref(name, r.namespace)
        if ref != MESH and ref not in self.gateways:
            raise r.error(path, f"gateway {ref!r} is not defined (no Gateway {ref})")
        return ref

    def _check_vs(self, r: Resource) -> _CheckedVS:
        spec: VirtualServiceSpec = r.obj.spec
        if not spec.hosts:
            raise r.error("$.spec.hosts", "a VirtualService needs at least one host")
        gateways = tuple(self._check_gateway_name(r, f"$.spec.gateways[{i}]", g) for i, g in enumerate(spec.gateways))
        if not gateways:
            gateways = (MESH,)
        for i, h in enumerate(spec.hosts):
            if not h or "/" in h or (h.startswith("*") and not (h == "*" or h.startswith("*."))):
                raise r.error(f"$.spec.hosts[{i}]", f"invalid host {h!r}")
            if h == "*" and MESH in gateways:
                raise r.error(f"$.spec.hosts[{i}]", "wildcard host '*' is not allowed for VirtualServices bound to the mesh")
        if not spec.http and not spec.tls and not spec.tcp:
            raise r.error("$.spec.http", "a VirtualService needs at least one http, tls or tcp route")
        routes: list[_CheckedRoute] = []
        for i, http in enumerate(spec.http):
            path = f"$.spec.http[{i}]"
            if http.delegate is not None:
                routes.extend(self._delegated_routes(r, path, i, http))
            else:
                routes.append(self._check_http_route(r, path, i, http))
        tcp_routes: list[_CheckedTcpRoute] = []
        tls_routes: list[_CheckedTlsRoute] = []
        l4_routes = self._check_l4_routes(r, spec, gateways, tcp_routes, tls_routes)
        return _CheckedVS(r, spec, gateways, routes, l4_routes, tcp_routes, tls_routes)

    def _check_l4_routes(self, r: Resource, spec: VirtualServiceSpec, gateways: tuple[str, ...],
                         tcp_routes: list[_CheckedTcpRoute], tls_routes: list[_CheckedTlsRoute]) -> list[L4Route]:
        """tls (by SNI) and tcp routes, checked; kept only where a match block applies to a sidecar
        (bound to "mesh", sourceLabels matching this proxy). Every tcp route also goes to
        `tcp_routes`, for the Gateway TCP servers, and every tls route to `tls_routes`, for the Gateway
        PASSTHROUGH servers."""
        out: list[L4Route] = []
        for kind, items in (("tls", spec.tls), ("tcp", spec.tcp)):
            for i, item in enumerate(items):
                path = f"$.spec.{kind}[{i}]"
                if kind == "tls" and not item.match:
                    raise r.error(f"{path}.match", "a tls route needs a match with sniHosts")
                if not item.route:
                    raise r.error(f"{path}.route", f"a {kind} route needs at least one destination")
                blocks = []
                gateway_blocks = []
                for k, m in enumerate(item.match):
                    mpath = f"{path}.match[{k}]"
                    if kind == "tls" and not m.sni_hosts:
                        raise r.error(f"{mpath}.sniHosts", "a tls match needs at least one sniHosts entry")
                    match_gateways = tuple(
                        self._check_gateway_name(r, f"{mpath}.gateways[{j}]", g) for j, g in enumerate(m.gateways)
                    ) or gateways
                    nets = []
                    for j, cidr in enumerate(m.destination_subnets):
                        try:
                            nets.append(ipaddress.ip_network(cidr, strict=False))
                        except ValueError:
                            raise r.error(f"{mpath}.destinationSubnets[{j}]", f"{cidr!r} is not an IP address or CIDR block") from None
                    gateway_blocks.append((m.port, match_gateways))
                    if MESH not in match_gateways:
                        continue
                    if m.source_labels and (self.proxy_labels is None or not _labels_match(m.source_labels, self.proxy_labels)):
                        continue
                    sni = tuple(h.lower() for h in getattr(m, "sni_hosts", ()))
                    blocks.append((sni, m.port, tuple(nets)))
                dests = [
                    RouteDestination(self._resolve_destination(r, f"{path}.route[{j}].destination", rd.destination), rd.weight)
                    for j, rd in enumerate(item.route)
                ]
                for j, d in enumerate(dests):
                    upstream = self.clusters.get(d.cluster)
                    if upstream is not None and upstream.tls is not None and upstream.protocol in HTTP_PROTOCOLS:
                        # TLS to a TCP port is originated by the TCP proxy (ALPN `istio` for mesh mTLS);
                        # an HTTP port's TLS offers HTTP ALPN, which would make the server parse the bytes
                        raise r.error(f"{path}.route[{j}].destination",
                                      f"cluster {d.cluster} originates TLS for HTTP ({upstream.tls.origin} tls mode "
                                      f"{upstream.tls.mode}), which {kind} routes do not support: route to a TCP port")
                if len(dests) == 1:
                    dests = [RouteDestination(dests[0].cluster, 100)]
                elif sum(d.weight for d in dests) != 100:
                    raise r.error(f"{path}.route", f"total destination weight {sum(d.weight for d in dests)} != 100")
                cumulative, acc = [], 0
                for d in dests:
                    acc += d.weight
                    cumulative.append(acc)
                if kind == "tcp":
                    tcp_routes.append(_CheckedTcpRoute(i, tuple(gateway_blocks), tuple(dests), tuple(cumulative)))
                else:
                    tls_routes.append(_CheckedTlsRoute(
                        i, tuple((tuple(h.lower() for h in m.sni_hosts), port, gws)
                                 for m, (port, gws) in zip(item.match, gateway_blocks)),
                        tuple(dests), tuple(cumulative)))
                if (item.match and not blocks) or (not item.match and MESH not in gateways):
                    continue  # no match block applies to a sidecar
                out.append(L4Route(f"{r.namespace}/{r.name}", kind, tuple(blocks), tuple(dests), tuple(cumulative)))
        return out

    def _mesh_virtual_services(self, svc: Service, among: list[_CheckedVS]) -> list[_CheckedVS]:
        """Mesh VirtualServices of `among` (in config order) whose hosts cover a service, visible to its
        namespace."""
        return [
            vs
            for vs in among
            if vs.in_mesh
            and hosts.exported_to(vs.spec.export_to, vs.resource.namespace, svc.namespace)
            and any(self._covers(h, vs.resource.namespace, svc) for h in vs.spec.hosts)
        ]

    def _covers(self, host: str, namespace: str, svc: Service) -> bool:
        """Does a VirtualService host written in `namespace` cover `svc`? A name means the service it
        resolves to there (the namespace's own service first); a wildcard covers what it matches."""
        if hosts.is_wildcard(host):
            return hosts.matches(host, svc.key) or hosts.matches(host, svc.host)
        return self.registry.lookup(host, namespace) is svc or hosts.fqdn(host, namespace) == svc.key

    def _first_mesh_virtual_service(self, svc: Service) -> list[_CheckedVS]:
        """Istio does not merge mesh VirtualServices: for one host the first in config order serves
        (an exact host before a wildcard, the longest wildcard before a shorter one)."""
        def specificity(vs: _CheckedVS) -> int:
            best = 0
            for h in vs.spec.hosts:
                if self._covers(h, vs.resource.namespace, svc):
                    best = max(best, 1 << 16 if not hosts.is_wildcard(h) else len(h))
            return best
        candidates = self._mesh_virtual_services(svc, [vs for vs in self.virtual_services if vs.routes])
        if not candidates:
            return []
        top = max(specificity(vs) for vs in candidates)
        return [next(vs for vs in candidates if specificity(vs) == top)]

    def l4_routes(self) -> dict[str, tuple[L4Route, ...]]:
        out: dict[str, tuple[L4Route, ...]] = {}
        # services x VirtualServices with TCP/TLS routes only: in a mesh of HTTP routes, nothing per service
        with_l4 = [vs for vs in self.virtual_services if vs.l4_routes]
        if not with_l4:
            return out
        for svc in self.registry.services.values():
            routes = [route for vs in self._mesh_virtual_services(svc, with_l4) for route in vs.l4_routes]
            if routes:
                # Istio's order: every tls route before the tcp ones
                out[svc.cluster_host] = tuple(sorted(routes, key=lambda route: route.kind != "tls"))
        return out

    def _check_http_route(self, r: Resource, path: str, i, http: HTTPRoute) -> _CheckedRoute:
        for k, m in enumerate(http.match):
            for j, g in enumerate(m.gateways):
                self._check_gateway_name(r, f"{path}.match[{k}].gateways[{j}]", g)
        redirect = policies.redirect_for(r, path, http)
        direct = policies.direct_response_for(r, path, http)
        if not http.route and redirect is None and direct is None:
            raise r.error(f"{path}.route", "an http route needs at least one destination (or a redirect or directResponse)")
        dests: list[RouteDestination] = []
        for j, rd in enumerate(http.route):
            cluster = self._resolve_destination(r, f"{path}.route[{j}].destination", rd.destination)
            req_ops, resp_ops = policies.headers_pair(r, f"{path}.route[{j}].headers", rd.headers)
            dests.append(RouteDestination(cluster, rd.weight, req_ops, resp_ops))
        if len(dests) == 1:
            d = dests[0]
            dests = [RouteDestination(d.cluster, 100, d.request_headers, d.response_headers)]  # takes everything
        elif dests:
            total = sum(d.weight for d in dests)
            if total != 100:  # Istio's validation rule
                raise r.error(f"{path}.route", f"total destination weight {total} != 100")
        if http.timeout is not None and http.timeout < 0.001 and http.timeout != 0:
            raise r.error(f"{path}.timeout", "timeout must be at least 1ms (or 0s to disable it)")
        cumulative: list[int] = []
        acc = 0
        for d in dests:
            acc += d.weight
            cumulative.append(acc)
        req_ops, resp_ops = policies.headers_pair(r, f"{path}.headers", http.headers)
        policies.rewrite_for(r, path, http, None)  # validated once here; built per match block later
        extra = dict(
            redirect=redirect,
            direct_response=direct,
            request_headers=req_ops,
            response_headers=resp_ops,
            retry=policies.retry_policy(r, path, http) if dests else None,
            fault=policies.fault_policy(r, path, http),
            cors=policies.cors_policy(r, path, http),
            mirrors=policies.mirror_policies(r, path, http, lambda p, d: self._resolve_destination(r, p, d)),
            destination_headers=any(d.request_headers or d.response_headers for d in dests),
        )
        return _CheckedRoute(i, http, tuple(dests), tuple(cumulative), extra, r, path)

    def _delegated_routes(self, r: Resource, path: str, i: int, http: HTTPRoute) -> list[_CheckedRoute]:
        """Istio delegation: the routes of a host-less VirtualService, each match ANDed with this
        route's (a combination whose fields contradict is dropped, as Istio drops conflicting routes)."""
        if http.route or http.redirect is not None or http.direct_response is not None:
            raise r.error(f"{path}.delegate", "a route with delegate cannot also have route, redirect or directResponse")
        ns = http.delegate.namespace or r.namespace
        target = self.delegates.get((ns, http.delegate.name))
        if target is None:
            raise r.error(f"{path}.delegate", f"no host-less VirtualService {ns}/{http.delegate.name} to delegate to")
        out: list[_CheckedRoute] = []
        dspec: VirtualServiceSpec = target.obj.spec
        for j, dhttp in enumerate(dspec.http):
            dpath = f"$.spec.http[{j}]"
            if dhttp.delegate is not None:
                raise target.error(f"{dpath}.delegate", "a delegate VirtualService cannot delegate again")
            merged = merge_matches(http.match, dhttp.match)
            if merged is None:
                continue
            combined = msgspec.structs.replace(dhttp, match=merged)
            out.append(self._check_http_route(target, dpath, f"{i}.{j}", combined))
        return out

    # ---- routes per listener context

    def _routes(self, vs: _CheckedVS, ctx: MatchContext) -> list[tuple[Route, dict]]:
        out: list[tuple[Route, dict]] = []
        r = vs.resource

        def resolve(g: str) -> str:
            return _gateway_ref(g, r.namespace)

        for cr in vs.routes:
            name = cr.spec.name or f"{r.namespace}.{r.name}.{cr.index}"
            rewrite = cr.spec.rewrite
            if rewrite is not None and rewrite.uri and len(cr.spec.match) > 1:
                # Istio's prefix rewrite depends on which block matched: one route per block, as Istio
                # generates one Envoy route per match block
                groups = [(m,) for m in cr.spec.match]
            else:
                groups = [cr.spec.match]
            for blocks in groups:
                matcher = compile_matches(blocks, ctx, resolve)
                if matcher is None:
                    continue  # no match block applies on this listener
                # what Istio's prefix rewrite replaces: the matched prefix; "/" when the block has no
                # uri match (Istio gives such routes a "/" prefix match); None (the whole path) for
                # exact and regex matches
                prefix = b"/"
                if len(blocks) == 1 and blocks[0].uri is not None:
                    uri = blocks[0].uri
                    prefix = uri.prefix.encode() if uri.prefix is not None else (b"/" if uri.exact is None and uri.regex is None else None)
                elif len(blocks) > 1:
                    prefix = None
                rw = policies.rewrite_for(cr.resource, cr.path, cr.spec, prefix)
                route = Route(
                    name=name,
                    virtual_service=vs.label,
                    matches=matcher,
                    destinations=cr.destinations,
                    cumulative_weights=cr.cumulative,
                    timeout_s=float(cr.spec.timeout) if cr.spec.timeout is not None else None,
                    rewrite=rw,
                    **cr.policies,
                )
                out.append((route, _route_dump(route, [_builtins(m) for m in blocks])))
        return out

    # ---- listeners

    def _claim(self, r: Resource, path: str, address: str, port: int, protocol: str, direction: str, owner: str):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise r.error(path, f"bind address {address!r} is not an IP address") from None
        key = (address, port)
        draft = self.listeners.get(key)
        if draft is not None:
            if draft.owner_kind == owner == "Gateway" and draft.protocol != protocol:
                # Istio merges Gateway servers on one port only when their protocols can share a listener
                raise r.error(path, f"{address}:{port} is already a {draft.protocol} listener of {draft.owner}; "
                                    f"a {protocol} server cannot share its port")
            if draft.owner_kind != owner or owner != "Gateway":
                raise r.error(path, f"{address}:{port} is already a listener of {draft.owner}")
            return draft
        for (addr, p), other in self.listeners.items():
            if p == port and _overlaps(addr, address):
                raise r.error(path, f"{address}:{port} overlaps listener {addr}:{p} of {other.owner}")
        draft = _ListenerDraft(address, port, protocol, direction, owner, f"{r.kind} {r.namespace}/{r.name}")
        self.listeners[key] = draft
        return draft

    def add_gateways(self) -> None:
        for gw_key, r in self.gateways.items():
            spec: GatewaySpec = r.obj.spec
            if not spec.servers:
                raise r.error("$.spec.servers", "a Gateway needs at least one server")
            if not _labels_match(spec.selector, self.proxy_labels):
                continue
            bound = [vs for vs in self.virtual_services if gw_key in vs.gateways]
            for i, server in enumerate(spec.servers):
                path = f"$.spec.servers[{i}]"
                protocol = str(server.port.protocol)
                if (protocol not in LISTENER_PROTOCOLS and protocol not in GATEWAY_TCP_PROTOCOLS
                        and protocol not in GATEWAY_TLS_PROTOCOLS):
                    raise r.error(f"{path}.port.protocol", f"protocol {protocol} on a Gateway server is not supported by triomesh yet")
                if not server.hosts:
                    raise r.error(f"{path}.hosts", "a Gateway server needs at least one host")
                scoped = [hosts.split_scoped(h, r.namespace) for h in server.hosts]
                for j, (_, h) in enumerate(scoped):
                    if not h:
                        raise r.error(f"{path}.hosts[{j}]", f"invalid host {server.hosts[j]!r}")
                address = server.bind or self.bind_address
                port = server.port.target_port or server.port.number
                kind = gateway_tls.server_kind(r, path, server)
                if kind == gateway_tls.PASSTHROUGH:
                    self._add_gateway_passthrough_server(r, path, gw_key, server.port.number, address, port, scoped, bound)
                    continue
                if kind in (gateway_tls.TERMINATE, gateway_tls.TERMINATE_TCP):
                    self._add_gateway_terminating_server(r, path, i, gw_key, server, address, port, scoped, bound,
                                                         tcp=kind == gateway_tls.TERMINATE_TCP)
                    continue
                if protocol in GATEWAY_TCP_PROTOCOLS:
                    if server.tls is not None:
                        raise r.error(f"{path}.tls", f"a {protocol} server is plaintext: it takes no tls settings")
                    self._add_gateway_tcp_server(r, path, gw_key, server.port.number, address, port, scoped, bound)
                    continue
                # HTTP-family servers share one HTTP listener per port (Istio merges them likewise)
                draft = self._claim(r, f"{path}.port.number", address, port, "HTTP", "OUTBOUND", "Gateway")
                https_redirect = server.tls is not None and server.tls.https_redirect
                self._add_gateway_routes(draft, r, gw_key, server.port.number, scoped, bound, https_redirect=https_redirect)

    def _add_gateway_routes(self, draft: "_ListenerDraft", r: Resource, gw_key: str, server_port: int,
                            scoped: list[tuple[str, str]], bound: list[_CheckedVS], *, https_redirect: bool = False) -> None:
        """Virtual hosts of the VirtualServices bound to the Gateway, host sets intersected with the
        server's. `https_redirect`: each answers 301 to https instead (tls.httpsRedirect, Envoy's
        require_tls)."""
        ctx = MatchContext(gw_key, server_port, self.proxy_labels)
        for vs in bound:
            vns = vs.resource.namespace
            if not hosts.exported_to(vs.spec.export_to, vns, r.namespace):
                continue
            routes = None
            for h in vs.spec.hosts:
                for sns, shost in scoped:
                    if sns not in ("*", vns):
                        continue
                    eff = hosts.intersect(shost, h)
                    if eff is None:
                        continue
                    if routes is None:
                        routes = self._routes(vs, ctx) if not https_redirect else [_https_redirect_route()]
                    domains = hosts.aliases(eff, vns, None)
                    draft.vhost(hosts.fqdn(eff, vns), domains).add(vs.label, routes)

    def _add_gateway_terminating_server(self, r: Resource, path: str, index: int, gw_key: str, server, address: str,
                                        port: int, scoped: list[tuple[str, str]], bound: list[_CheckedVS], *,
                                        tcp: bool) -> None:
        """A terminating server (mode SIMPLE or MUTUAL): HTTPS, or TLS with TCP after it (`tcp`).
        Servers sharing a port share one bound listener whose handshake picks a server by SNI; each
        server's routes are its own virtual listener (Istio's route configuration per HTTPS server,
        its filter chain per TLS server), so a connection to one server never reaches another
        server's routes, whatever its Host header says. A TLS server's virtual listener holds the
        first tcp route that applies to it, as a TCP server's does."""
        draft = self._claim(r, f"{path}.port.number", address, port, "TLS" if tcp else "HTTPS", "OUTBOUND", "Gateway")
        if draft.tls_passthrough:
            raise r.error(f"{path}.tls.mode", f"{address}:{port} already has PASSTHROUGH servers; terminating and "
                                              "PASSTHROUGH servers on one port are not supported by triomesh yet")
        names = gateway_tls.server_names(scoped)
        for name in names:
            taken = next((s for s in draft.tls_servers if name in s.server_names), None)
            if taken is not None:
                raise r.error(f"{path}.hosts", f"host {name!r} on {address}:{port} is already served by {taken.owner} "
                                               "(one certificate per name and port)")
        prefix = "tls" if tcp else "https"
        listener_name = f"{prefix}.{server.port.number}.{server.port.name or index}.{r.name}.{r.namespace}"
        while listener_name in self.virtual:
            listener_name += f".{index}"
        virtual = self.virtual[listener_name] = _ListenerDraft(
            address, port, "TCP" if tcp else "HTTP", "OUTBOUND", "Gateway", f"{r.kind} {r.namespace}/{r.name}",
            name=listener_name, bind_to_port=False)
        if tcp:
            virtual.tcp_server = f"{r.kind} {r.namespace}/{r.name}"
            self._pick_tcp_route(virtual, gw_key, server.port.number, r.namespace, scoped, bound)
        else:
            self._add_gateway_routes(virtual, r, gw_key, server.port.number, scoped, bound)
        draft.tls_servers.append(gateway_tls.compile_server_tls(r, path, server.tls, names, self.credentials_dir,
                                                                listener_name, read_certificates=self.read_certificates))

    def _add_gateway_passthrough_server(self, r: Resource, path: str, gw_key: str, server_port: int, address: str,
                                        port: int, scoped: list[tuple[str, str]], bound: list[_CheckedVS]) -> None:
        """A PASSTHROUGH server: the VirtualService `tls` routes bound to the Gateway whose hosts
        meet the server's and whose match blocks accept its port, each match keeping the sniHosts
        within the server's hosts (Istio's gateway filter chains per SNI). The TLS bytes pass
        untouched; a connection whose SNI no route takes is closed."""
        draft = self._claim(r, f"{path}.port.number", address, port, "TLS", "OUTBOUND", "Gateway")
        if draft.tls_servers:
            raise r.error(f"{path}.tls.mode", f"{address}:{port} already has terminating servers; terminating and "
                                              "PASSTHROUGH servers on one port are not supported by triomesh yet")
        draft.tls_passthrough = True
        for vs in bound:
            vns = vs.resource.namespace
            if not vs.tls_routes or not hosts.exported_to(vs.spec.export_to, vns, r.namespace):
                continue
            if not any(sns in ("*", vns) and hosts.intersect(shost, h) is not None
                       for h in vs.spec.hosts for sns, shost in scoped):
                continue
            for tls_route in vs.tls_routes:
                blocks = []
                for sni_hosts, want_port, gateways in tls_route.matches:
                    if (want_port is not None and want_port != server_port) or (gateways and gw_key not in gateways):
                        continue
                    within = tuple(sni for sni in sni_hosts
                                   if any(hosts.intersect(shost, sni) is not None for _, shost in scoped))
                    if within:
                        blocks.append((within, None, ()))
                if blocks:
                    draft.tls_routes.append(L4Route(vs.label, "tls", tuple(blocks), tls_route.destinations,
                                                    tls_route.cumulative))
                    draft.tls_route_paths.append(f"$.spec.tls[{tls_route.index}]")

    def _add_gateway_tcp_server(self, r: Resource, path: str, gw_key: str, server_port: int, address: str, port: int,
                                scoped: list[tuple[str, str]], bound: list[_CheckedVS]) -> None:
        """A TCP listener proxying to the first tcp route that applies (Istio's
        buildGatewayNetworkFiltersFromTCPRoutes). None applying leaves the listener without a route:
        it closes each connection, as Envoy closes one that finds no filter chain."""
        draft = self._claim(r, f"{path}.port.number", address, port, "TCP", "OUTBOUND", "Gateway")
        if draft.tcp_server:
            raise r.error(f"{path}.port.number", f"{address}:{port} is already the TCP server of {draft.tcp_server} "
                                                 "(one TCP server per port: connections carry no host to tell them apart)")
        draft.tcp_server = f"{r.kind} {r.namespace}/{r.name}"
        self._pick_tcp_route(draft, gw_key, server_port, r.namespace, scoped, bound)

    def _pick_tcp_route(self, draft: "_ListenerDraft", gw_key: str, server_port: int, gateway_namespace: str,
                        scoped: list[tuple[str, str]], bound: list[_CheckedVS]) -> None:
        """The first tcp route, in VirtualService order, of a VirtualService whose hosts meet the
        server's and whose match allows its port and Gateway, on `draft` (none: no route)."""
        for vs in bound:
            vns = vs.resource.namespace
            if not vs.tcp_routes or not hosts.exported_to(vs.spec.export_to, vns, gateway_namespace):
                continue
            if not any(sns in ("*", vns) and hosts.intersect(shost, h) is not None
                       for h in vs.spec.hosts for sns, shost in scoped):
                continue  # the VirtualService's hosts are not this server's
            for tcp in vs.tcp_routes:
                if tcp.applies_to_gateway_server(gw_key, server_port):
                    draft.tcp_route = L4Route(vs.label, "tcp", (), tcp.destinations, tcp.cumulative)
                    draft.tcp_route_path = f"$.spec.tcp[{tcp.index}]"
                    return

    def _applying_sidecars(self) -> list[Resource]:
        if self.proxy_namespace is not None:  # a workload: the one Sidecar Istio would pick for it
            chosen = select_sidecar(self.by_kind["Sidecar"], self.proxy_namespace,
                                    lambda selector: _labels_match(selector, self.proxy_labels))
            return [chosen] if chosen is not None else []
        # a standalone edge (no namespace of its own): every Sidecar its labels do not rule out
        out = []
        for r in self.by_kind["Sidecar"]:
            spec: SidecarSpec = r.obj.spec
            if spec.workload_selector is None or _labels_match(spec.workload_selector.labels, self.proxy_labels):
                out.append(r)
        return out

    def _captured(self, mode: str) -> bool:
        """Whether a listener with this captureMode receives iptables-captured traffic."""
        return mode == "IPTABLES" or (mode == "DEFAULT" and self.capture)

    def add_sidecars(self) -> None:
        sidecars = self._applying_sidecars()
        self.capture = any(
            listener.capture_mode == "IPTABLES"
            for r in sidecars
            for listener in (*r.obj.spec.egress, *r.obj.spec.ingress)
        )
        for r in sidecars:
            spec: SidecarSpec = r.obj.spec
            if spec.outbound_traffic_policy is not None and self.outbound_policy_from is None:
                self.outbound_policy = spec.outbound_traffic_policy.mode
                self.outbound_policy_from = r
            for i, eg in enumerate(spec.egress):
                self._add_egress(r, f"$.spec.egress[{i}]", eg)
            for i, ing in enumerate(spec.ingress):
                self._add_ingress(r, f"$.spec.ingress[{i}]", ing)

    def _add_egress(self, r: Resource, path: str, eg) -> None:
        if not eg.hosts:
            raise r.error(f"{path}.hosts", "an egress listener needs at least one host (\"namespace/dnsName\")")
        scopes: list[tuple[str, str]] = []
        for j, h in enumerate(eg.hosts):
            ns, sep, dns = h.partition("/")
            if not sep or not ns or not dns:
                raise r.error(f"{path}.hosts[{j}]", f"host {h!r} must be \"namespace/dnsName\" (e.g. \"./*\", \"*/reviews.prod.svc.cluster.local\")")
            scopes.append((r.namespace if ns == "." else ns, dns))
        if eg.port is None or self._captured(eg.capture_mode):
            # a port-less or captured egress listener opens no listener of its own: captured traffic
            # reaches the services through virtualOutbound, and only the services its hosts name
            if self.capture_scopes is None:
                self.capture_scopes = []
            self.capture_scopes.extend((r.namespace, ns, dns) for ns, dns in scopes)
            return
        if eg.port.number == 0:
            raise r.error(f"{path}.port.number", "Unix domain socket listeners (port 0) are not supported by triomesh yet")
        if eg.port.protocol is None:
            raise r.error(f"{path}.port.protocol", "an egress listener port needs a protocol")
        protocol = str(eg.port.protocol)
        if protocol not in EGRESS_PROTOCOLS:
            raise r.error(f"{path}.port.protocol", f"protocol {protocol} on a Sidecar egress listener is not supported by triomesh yet")
        if eg.bind.startswith("unix://"):
            raise r.error(f"{path}.bind", "Unix domain socket listeners are not supported by triomesh yet")
        address = eg.bind or DEFAULT_EGRESS_BIND
        draft = self._claim(r, f"{path}.port.number", address, eg.port.number, "HTTP", "OUTBOUND", "Sidecar")
        local_ns = r.namespace

        def visible(owner_ns: str, host: str) -> bool:
            full = hosts.fqdn(host, owner_ns)
            for ns, dns in scopes:
                if ns != "*" and ns != owner_ns:
                    continue
                if hosts.matches(dns, host) or hosts.matches(dns, full):
                    return True
            return False

        ctx = MatchContext(MESH, None, self.proxy_labels)
        covered: list[str] = []  # FQDN host patterns of the VirtualServices on this listener
        for vs in self.virtual_services:
            vns = vs.resource.namespace
            if not vs.in_mesh or not vs.routes or not hosts.exported_to(vs.spec.export_to, vns, local_ns):
                continue
            shown = [h for h in vs.spec.hosts if visible(vns, h)]
            if not shown:
                continue
            routes = self._routes(vs, ctx)
            for h in shown:
                full = hosts.fqdn(h, vns)
                covered.append(full)
                vhost = draft.vhost(full, hosts.aliases(h, vns, local_ns), local=vns == local_ns)
                if not vhost.sources:  # Istio merges mesh VirtualServices never: the first one serves
                    vhost.add(vs.label, routes)
        for svc in self.registry.services.values():
            sns = svc.namespace
            if not visible(sns, svc.host) or not hosts.exported_to(svc.spec.export_to, sns, local_ns):
                continue
            full = hosts.fqdn(svc.host, sns)
            if any(hosts.matches(c, full) or hosts.matches(c, svc.host) for c in covered):
                continue
            self._default_routes(draft, svc, local_ns)

    def _default_routes(self, draft: "_ListenerDraft", svc: Service, local_ns: str) -> None:
        names = hosts.aliases(svc.host, svc.namespace, local_ns)
        full = svc.key
        ports = [p.number for p in svc.ports]
        bare = 80 if 80 in ports else ports[0]  # a request without a port addresses :80
        for number in ports:
            cluster = cluster_name(svc.cluster_host, number)
            domains = [f"{n}:{number}" for n in names]
            if number == bare:
                domains = names + domains
            route = Route(
                name="default",
                virtual_service="",
                matches=always(),
                destinations=(RouteDestination(cluster, 100),),
                cumulative_weights=(100,),
                retry=policies.DEFAULT_RETRY,  # Istio's default route carries its default retry policy
            )
            dump = _route_dump(route, [])
            draft.vhost(f"{full}:{number}", domains, local=svc.namespace == local_ns).add("", [(route, dump)])

    def _add_ingress(self, r: Resource, path: str, ing) -> None:
        protocol = str(ing.port.protocol) if ing.port.protocol is not None else ""
        if protocol not in LISTENER_PROTOCOLS:
            raise r.error(f"{path}.port.protocol", f"protocol {protocol or '(none)'} on a Sidecar ingress listener is not supported by triomesh yet")
        if ing.port.number == 0:
            raise r.error(f"{path}.port.number", "an ingress listener needs a port number")
        target = _parse_default_endpoint(r, f"{path}.defaultEndpoint", ing.default_endpoint)
        if self._captured(ing.capture_mode):
            name = captured_inbound_listener(ing.port.number)
            if name in self.virtual:
                raise r.error(f"{path}.port.number", f"inbound port {ing.port.number} is already captured by {self.virtual[name].owner}")
            draft = self.virtual[name] = _ListenerDraft(
                "0.0.0.0", ing.port.number, "HTTP", "INBOUND", "Sidecar", f"{r.kind} {r.namespace}/{r.name}",
                name=name, bind_to_port=False,
            )
        else:
            address = ing.bind or self.bind_address
            draft = self._claim(r, f"{path}.port.number", address, ing.port.number, "HTTP", "INBOUND", "Sidecar")
        cluster = f"inbound|{ing.port.number}||"
        # the local app is spoken to as its port's protocol says (Istio: no DestinationRule, no upgrade)
        self.clusters[cluster] = Cluster(
            name=cluster, service_host="", port=ing.port.number, subset="", endpoints=(Endpoint(*target, labels=FrozenLabels()),),
            protocol=protocol, http2=policies.upstream_http2(protocol, None),
        )
        route = Route(
            name="inbound",
            virtual_service="",
            matches=always(),
            destinations=(RouteDestination(cluster, 100),),
            cumulative_weights=(100,),
        )
        dump = _route_dump(route, [])
        draft.vhost(f"inbound|{ing.port.number}", ["*"]).add("", [(route, dump)])


    def captured_visible(self, svc: Service) -> bool:
        """Whether captured traffic may reach `svc` (Sidecar egress `hosts` and the service's exportTo)."""
        if self.capture_scopes is None:
            return True
        full = hosts.fqdn(svc.host, svc.namespace)
        for local_ns, ns, dns in self.capture_scopes:
            if ns != "*" and ns != svc.namespace:
                continue
            if not hosts.exported_to(svc.spec.export_to, svc.namespace, local_ns):
                continue
            if hosts.matches(dns, svc.host) or hosts.matches(dns, full):
                return True
        return False

    def captured_hosts(self) -> frozenset[str] | None:
        if not self.capture or self.capture_scopes is None:
            return None
        return frozenset(svc.cluster_host for svc in self.registry.services.values() if self.captured_visible(svc))

    def add_capture(self) -> None:
        """The capture listeners and one virtual listener per captured HTTP service port."""
        if not self.capture:
            return
        owner = "Sidecar capture"
        for name, port, direction in (
            (VIRTUAL_OUTBOUND, VIRTUAL_OUTBOUND_PORT, "OUTBOUND"),
            (VIRTUAL_INBOUND, VIRTUAL_INBOUND_PORT, "INBOUND"),
        ):
            for (addr, p), other in self.listeners.items():
                if p == port:
                    raise ConfigError(f"capture port {port} is already a listener of {other.owner}")
            self.virtual[name] = _ListenerDraft(
                "0.0.0.0", port, "TCP", direction, owner, owner, name=name, use_original_dst=True
            )
        for svc in self.registry.services.values():
            if not self.captured_visible(svc):
                continue  # out of this Sidecar's egress hosts: captured traffic cannot reach it
            full = svc.key
            mesh_vs = self._first_mesh_virtual_service(svc)
            for port in svc.ports:
                if not is_http_protocol(str(port.protocol)):
                    continue  # TCP, TLS, HTTPS...: captured connections go to the TCP proxy
                name = captured_outbound_listener(port.number, svc.cluster_host)
                draft = self.virtual[name] = _ListenerDraft(
                    "0.0.0.0", port.number, "HTTP", "OUTBOUND", owner, f"ServiceEntry {svc.namespace}/{svc.resource.name}",
                    name=name, bind_to_port=False,
                )
                # the original destination chose the service: its routes answer whatever the Host
                vhost = draft.vhost(f"{full}:{port.number}", ["*"])
                ctx = MatchContext(MESH, port.number, self.proxy_labels)
                for vs in mesh_vs:
                    vhost.add(vs.label, self._routes(vs, ctx))
                if not vhost.routes:
                    route = Route(
                        name="default",
                        virtual_service="",
                        matches=always(),
                        destinations=(RouteDestination(cluster_name(svc.cluster_host, port.number), 100),),
                        cumulative_weights=(100,),
                        retry=policies.DEFAULT_RETRY,
                    )
                    vhost.add("", [(route, _route_dump(route, []))])


def _parse_default_endpoint(r: Resource, path: str, value: str) -> tuple[str, int]:
    """Istio's defaultEndpoint: 127.0.0.1:PORT, [::1]:PORT, 0.0.0.0:PORT, [::]:PORT (the local app)."""
    if not value:
        raise r.error(path, "an ingress listener needs a defaultEndpoint such as 127.0.0.1:8080")
    if value.startswith("unix://"):
        raise r.error(path, "Unix domain socket endpoints are not supported by triomesh yet")
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    local = {"127.0.0.1": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::1": "::1", "::": "::1"}
    if not sep or host not in local or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise r.error(path, f"{value!r} is not one of 127.0.0.1:PORT, [::1]:PORT, 0.0.0.0:PORT, [::]:PORT")
    return local[host], int(port_s)


def _overlaps(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::")
    return a == b or a in wildcard or b in wildcard


# --------------------------------------------------------------------------------------------------
# listener drafts -> Listener


@dataclass(slots=True)
class _VhostDraft:
    name: str
    domains: list[str]
    routes: list[tuple[Route, dict]] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    local: bool = True  # declared in the client's namespace: claims its names before other namespaces

    def add(self, source: str, routes: list[tuple[Route, dict]]) -> None:
        if source and source in self.sources:
            return
        self.sources.add(source)
        self.routes.extend(routes)


@dataclass(slots=True)
class _ListenerDraft:
    address: str
    port: int
    protocol: str
    direction: str
    owner_kind: str
    owner: str
    name: str = ""  # default: "<address>_<port>"
    bind_to_port: bool = True
    use_original_dst: bool = False
    vhosts: dict[str, _VhostDraft] = field(default_factory=dict)
    tcp_server: str = ""  # a Gateway TCP server's owner ("Gateway ns/name"), when this is one
    tcp_route: L4Route | None = None
    tcp_route_path: str = ""  # its field path in its VirtualService
    tls_servers: list[ServerTls] = field(default_factory=list)  # an HTTPS listener's terminating servers
    tls_routes: list[L4Route] = field(default_factory=list)  # a PASSTHROUGH listener's tls routes
    tls_route_paths: list[str] = field(default_factory=list)  # their field paths in their VirtualServices
    tls_passthrough: bool = False  # a PASSTHROUGH server claimed this port

    def vhost(self, name: str, domains: list[str], *, local: bool = True) -> _VhostDraft:
        vh = self.vhosts.get(name)
        if vh is None:
            vh = self.vhosts[name] = _VhostDraft(name, domains, local=local)
        return vh

    def build(self) -> tuple[Listener, dict]:
        # first claim wins for each domain, the client namespace's names first (Istio resolves a name
        # in the caller's namespace first); a virtual host keeps only the domains it owns
        owner: dict[str, str] = {}
        for vh in sorted(self.vhosts.values(), key=lambda vh: not vh.local):
            for d in vh.domains:
                owner.setdefault(d.lower(), vh.name)
        exact: dict[bytes, VirtualHost] = {}
        suffixes: list[tuple[bytes, VirtualHost]] = []
        catch_all: VirtualHost | None = None
        dumps = []
        for vh in self.vhosts.values():
            domains = tuple(d.lower() for d in vh.domains if owner.get(d.lower()) == vh.name)
            if not domains or not vh.routes:
                continue
            owner.update({d: "" for d in domains})  # a domain listed twice in one vhost counts once
            built = VirtualHost(vh.name, domains, tuple(r for r, _ in vh.routes))
            for d in domains:
                if d == "*":
                    catch_all = built
                elif d.startswith("*."):
                    suffixes.append((d[1:].encode(), built))
                else:
                    exact[d.encode()] = built
            dumps.append({"name": vh.name, "domains": list(domains), "routes": [d for _, d in vh.routes]})
        suffixes.sort(key=lambda s: -len(s[0]))
        name = self.name or f"{self.address}_{self.port}"
        listener = Listener(
            name=name,
            address=self.address,
            port=self.port,
            protocol=self.protocol,
            route_table=RouteTable(exact=exact, suffixes=tuple(suffixes), catch_all=catch_all),
            traffic_direction=self.direction,
            bind_to_port=self.bind_to_port,
            use_original_dst=self.use_original_dst,
            tcp_route=self.tcp_route,
            tls_servers=tuple(self.tls_servers),
            tls_routes=tuple(self.tls_routes),
        )
        dump = {
            "name": name,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "traffic_direction": self.direction,
            "bind_to_port": self.bind_to_port,
            "use_original_dst": self.use_original_dst,
            "owner": self.owner,
            "virtual_hosts": dumps,
        }
        if self.tls_servers:
            dump["tls_servers"] = [{
                "server_names": list(t.server_names), "mode": t.mode, "listener": t.listener, "owner": t.owner,
                "certificate": _plain(t.certificate), "min_protocol_version": t.min_protocol_version,
                "max_protocol_version": t.max_protocol_version, "cipher_suites": list(t.cipher_suites),
            } for t in self.tls_servers]
        if self.protocol == "TLS":
            dump["tls_routes"] = [{
                "virtual_service": route.virtual_service, "path": path,
                "sni_hosts": sorted({sni for block in route.matches for sni in block[0]}),
                "destinations": [_plain(d) for d in route.destinations],
            } for route, path in zip(self.tls_routes, self.tls_route_paths)]
        if self.tcp_server:
            route = self.tcp_route
            dump["tcp_route"] = None if route is None else {
                "virtual_service": route.virtual_service,
                "path": self.tcp_route_path,
                "destinations": [_plain(d) for d in route.destinations],
            }
        return listener, dump


def _plain(obj: Any) -> Any:
    """A JSON-able view of a compiled policy dataclass (bytes as text, patterns as their source)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, bytes):
        return obj.decode("latin-1")
    if isinstance(obj, (frozenset, set)):
        return sorted(_plain(x) for x in obj)
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if hasattr(obj, "pattern"):
        return _plain(obj.pattern)
    if hasattr(obj, "__dataclass_fields__"):
        return {f: _plain(getattr(obj, f)) for f in obj.__dataclass_fields__ if f != "drop"}
    return str(obj)


def _route_dump(route: Route, match: list) -> dict:
    return {
        "name": route.name,
        "virtual_service": route.virtual_service,
        "match": match,
        "destinations": [_plain(d) for d in route.destinations],
        "timeout_s": route.timeout_s,
        "rewrite": _plain(route.rewrite),
        "redirect": _plain(route.redirect),
        "direct_response": _plain(route.direct_response),
        "request_headers": _plain(route.request_headers),
        "response_headers": _plain(route.response_headers),
        "retry": _plain(route.retry),
        "fault": _plain(route.fault),
        "mirrors": _plain(route.mirrors),
        "cors": None if route.cors is None else {
            "preflight_headers": _plain(route.cors.preflight_headers),
            "response_headers": _plain(route.cors.response_headers),
            "forward_unmatched_preflights": route.cors.forward_unmatched_preflights,
        },
    }


def _cluster_dump(c: Cluster) -> dict:
    return {
        "name": c.name,
        "service_host": c.service_host,
        "port": c.port,
        "subset": c.subset,
        "lb_policy": c.lb_policy,
        "resolution": c.resolution,
        "protocol": c.protocol,
        "http2": c.http2,
        "connect_timeout_s": c.connect_timeout_s,
        "consistent_hash": _plain(c.consistent_hash),
        "connection_pool": _plain(c.connection_pool),
        "outlier_detection": _plain(c.outlier),
        "endpoints": [{"address": e.address, "port": e.port, "labels": dict(e.labels), "weight": e.weight,
                       "locality": e.locality} for e in c.endpoints],
        "locality_lb": describe_locality_lb(c.locality_lb),
        "tls": _plain(c.tls),
    }


def compile_resources(
    resources: Iterable[Resource | IstioObject],
    *,
    version: str,
    bind_address: str = "0.0.0.0",
    proxy_labels: Mapping[str, str] | None = None,
    proxy_namespace: str | None = None,
    credentials_dir: str | None = None,
    read_certificates: bool = True,
) -> Snapshot:
    """One Snapshot from loaded resources, or a ConfigError naming the resource and field at fault.

    `bind_address` is where Gateway servers and Sidecar ingress listeners listen unless they set
    `bind`. `proxy_labels` are this proxy's workload labels: when given, only Gateways whose
    `selector` and Sidecars whose `workloadSelector` match apply, and `sourceLabels` matches
    are decided against them; None applies every Gateway and Sidecar (and no sourceLabels match).
    `proxy_namespace` is this proxy's namespace: which namespace's DestinationRule applies to a service
    is looked up from it as Istio does (registry.py); None when it is not known.
    `credentials_dir` is where Gateway `credentialName`s resolve (proxy/tls/certificates.py).
    `read_certificates` False skips reading the certificate files Gateways name (a control plane
    validating config for proxies whose files only they can see); the proxies read them.
    """
    items = [_as_resource(r) for r in resources]
    check_duplicates(items)
    c = _Compiler(items, bind_address, proxy_labels, proxy_namespace, credentials_dir, read_certificates)
    c.add_gateways()
    c.add_sidecars()
    c.add_capture()
    listeners: list[Listener] = []
    listener_dumps: list[dict] = []
    authorized: set[str] = set()
    for draft in [*c.listeners.values(), *c.virtual.values()]:
        listener, dump = draft.build()
        listeners.append(listener)
        listener_dumps.append(dump)
        if draft.owner_kind == "Gateway" or (draft.direction == "INBOUND" and draft.protocol == "HTTP"):
            authorized.add(listener.name)
    authorization = authz_compile.compile_authorization(
        c.by_kind["AuthorizationPolicy"], ROOT_NAMESPACE, proxy_namespace, proxy_labels)
    mtls = peer_authentication.resolve(c.by_kind["PeerAuthentication"], ROOT_NAMESPACE, proxy_namespace, proxy_labels)
    tracing = telemetry.resolve(c.by_kind["Telemetry"], ROOT_NAMESPACE, proxy_namespace, proxy_labels)
    access_logging = telemetry.resolve_access_logging(c.by_kind["Telemetry"], ROOT_NAMESPACE, proxy_namespace,
                                                      proxy_labels)
    metrics = telemetry.resolve_metrics(c.by_kind["Telemetry"], ROOT_NAMESPACE, proxy_namespace, proxy_labels)
    kinds: dict[str, int] = defaultdict(int)
    for r in items:
        kinds[r.kind] += 1
    addresses = service_addresses(c.registry)
    l4 = c.l4_routes()
    dump = {
        "version": version,
        "resources": dict(kinds),
        "listeners": listener_dumps,
        "clusters": [_cluster_dump(cl) for cl in c.clusters.values()],
        "service_addresses": [{"address": ip, "port": port, "host": h} for (ip, port), h in addresses.items()],
        "outbound_traffic_policy": c.outbound_policy,
        "l4_routes": {
            host: [
                {
                    "virtual_service": route.virtual_service,
                    "kind": route.kind,
                    "match": [{"sni_hosts": list(sni), "port": port, "destination_subnets": [str(n) for n in nets]}
                              for sni, port, nets in route.matches],
                    "destinations": [_plain(d) for d in route.destinations],
                }
                for route in routes
            ]
            for host, routes in l4.items()
        },
        "authorization": {**authz_compile.describe(authorization),
                          "listeners": sorted(authorized) if authorization is not None else []},
        "peer_authentication": peer_authentication.describe(mtls),
        "tracing": telemetry.describe(tracing),
        "access_logging": telemetry.describe_access_logging(access_logging),
        "metrics": telemetry.describe_metrics(metrics),
    }
    return Snapshot(
        version=version,
        listeners=tuple(listeners),
        clusters=dict(c.clusters),
        dump=dump,
        service_addresses=addresses,
        outbound_traffic_policy=c.outbound_policy,
        l4_routes=l4,
        captured_hosts=c.captured_hosts(),
        authorization=authorization,
        authorized_listeners=frozenset(authorized) if authorization is not None else frozenset(),
        mtls=mtls,
        tracing=tracing,
        access_logging=access_logging,
        metrics=metrics,
        mesh_addresses=mesh_addresses(c.registry),
    )


__all__ = ["compile_resources", "ConfigError"]
