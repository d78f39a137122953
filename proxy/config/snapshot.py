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
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from proxy.authz.peer_authentication import MtlsPolicy
from proxy.authz.policy import WorkloadAuthorization
from proxy.config.telemetry import AccessLoggingPolicy, MetricsPolicy, TracingPolicy
from proxy.l7.events import RequestHead, split_authority


def cluster_name(host: str, port: int, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def weighted_pick(destinations: tuple[RouteDestination, ...], cumulative_weights: tuple[int, ...],
                  rand_below: Callable[[int], int]) -> RouteDestination:
    """Weighted pick over compiled cumulative weights. `rand_below(n)` returns a uniform int in
    [0, n) (injected for tests)."""
    if len(destinations) == 1:
        return destinations[0]
    return destinations[bisect.bisect_right(cumulative_weights, rand_below(cumulative_weights[-1]))]


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)  # hashable with plain dict labels
    weight: int = 1
    locality: str = ""  # Istio's "region/zone/subzone" (ServiceEntry endpoints[].locality, WorkloadEntry locality)
    # derived once here rather than on every request that goes to this endpoint
    key: tuple[str, int] = field(init=False, compare=False, hash=False, repr=False)  # (address, port)
    host_port: str = field(init=False, compare=False, hash=False, repr=False)  # "address:port", as logged

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.address, self.port))
        object.__setattr__(self, "host_port", f"{self.address}:{self.port}")


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """DestinationRule loadBalancer.consistentHash: what to hash and the ring it picks on."""

    source: str  # "header", "cookie", "source_ip", "query"
    name: bytes = b""  # header name (lowercase), cookie name or query parameter
    cookie_path: bytes = b""
    cookie_ttl_s: float | None = None  # None: never generate the cookie; 0: a session cookie
    cookie_attributes: bytes = b""  # "; name=value" pairs appended to a generated Set-Cookie
    ring: str = "ring_hash"  # or "maglev"
    ring_size: int = 1024  # ringHash.minimumRingSize, or maglev.tableSize


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """DestinationRule trafficPolicy.connectionPool (Envoy's circuit breakers), per worker process.
    None means Istio's default (2^32-1, i.e. no limit)."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout_s: float | None = None
    max_requests: int | None = None  # http.http2MaxRequests: Envoy's max_requests, for every protocol
    max_connection_duration_s: float | None = None  # tcp.maxConnectionDuration
    keepalive: tuple[int | None, float | None, float | None] | None = None  # tcp.tcpKeepalive probes, time, interval
    # trafficPolicy.retryBudget (Envoy's retry_budget, replacing maxRetries): retries in flight may be
    # up to budget_percent of the requests in flight, and at least min_retry_concurrency
    retry_budget_percent: float | None = None
    min_retry_concurrency: int = 3
    # http.maxConcurrentStreams: streams at once on one HTTP/2 upstream connection (used only when the
    # cluster is http2); None: Envoy's default, no limit beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """DestinationRule trafficPolicy.outlierDetection with Envoy's defaults (0 disables a detector)."""

    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0
    max_ejection_time_s: float = 300.0
    # splitExternalLocalOriginErrors: connect failures, resets and timeouts count on their own
    # (consecutiveLocalOriginFailures) instead of as 5xx
    split_local_origin: bool = False
    consecutive_local_origin: int = 5


@dataclass(frozen=True, slots=True)
class LocalityGroup:
    """The endpoints of one locality under locality load balancing: the priority the proxy's own
    locality gives them (0 is tried first) and, with `distribute`, the locality's weight."""

    locality: str
    priority: int
    weight: int
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class LocalityLb:
    """DestinationRule loadBalancer.localityLbSetting as it applies to this proxy (config/locality.py)."""

    mode: str  # "failover" (priorities by locality) or "distribute" (localities by weight)
    groups: tuple[LocalityGroup, ...]


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS a cluster originates to its endpoints (DestinationRule tls mode SIMPLE or MUTUAL), compiled.
    Two clusters with equal settings share one `ssl.SSLContext` (proxy/tls/upstream.py)."""

    mode: str  # SIMPLE | MUTUAL | OPTIONAL_MUTUAL | ISTIO_MUTUAL (the workload certificate, proxy/tls/mesh.py)
    sni: str  # the server name sent, and checked when subject_alt_names is empty
    subject_alt_names: tuple[str, ...] = ()  # when set: the upstream certificate must carry one of them
    ca_file: str = ""  # "": the system trust store
    cert_file: str = ""  # MUTUAL: the client certificate chain and its key
    key_file: str = ""
    insecure_skip_verify: bool = False
    alpn: tuple[str, ...] = ("http/1.1",)  # offered: h2 for an HTTP/2 cluster
    origin: str = ""  # "DestinationRule ns/name", for errors at connect time
    # ISTIO_MUTUAL by auto mTLS: only these endpoints (address, port) have a sidecar; the others, and
    # every endpoint while this proxy has no workload certificate, get plaintext. None: all endpoints
    mesh_endpoints: frozenset[tuple[str, int]] | None = None


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
    consistent_hash: ConsistentHash | None = None
    connection_pool: ConnectionPool = ConnectionPool()
    outlier: OutlierPolicy | None = None
    # the endpoints are spoken to in cleartext HTTP/2 with prior knowledge (h2c), not HTTP/1.1: port
    # protocol HTTP2/GRPC/GRPC-WEB, or HTTP with h2UpgradePolicy UPGRADE (policies.upstream_http2)
    http2: bool = False
    locality_lb: LocalityLb | None = None  # None: endpoints are balanced with no regard to locality
    # the namespace of the ServiceEntry behind the cluster ("" for inbound and built-in clusters), for
    # Istio's destination_service_namespace label
    service_namespace: str = ""
    # ServiceEntry location MESH_INTERNAL: the endpoints run sidecars, so requests to them carry this
    # proxy's peer metadata (proxy/telemetry/peer.py); never sent to MESH_EXTERNAL endpoints
    mesh_internal: bool = False
    tls: UpstreamTls | None = None  # None: plaintext to the endpoints (no tls, or mode DISABLE)


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Istio HeaderOperations compiled: names lowercase bytes; `remove` first, then `set`
    (replacing every value of the name), then `add` (appending), as Envoy applies them."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()
    drop: frozenset[bytes] = frozenset()  # remove | names of set
    authority: bytes | None = None  # `set: {host: ...}` / `:authority` rewrites the authority

    def apply(self, headers: list) -> list:
        drop = self.drop
        out = [h for h in headers if h[0] not in drop] if drop else headers
        if self.set:
            out.extend(self.set)
        if self.add:
            out.extend(self.add)
        return out


@dataclass(frozen=True, slots=True)
class RouteDestination:
    cluster: str  # a key of Snapshot.clusters
    weight: int
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None


@dataclass(frozen=True, slots=True)
class Rewrite:
    """HTTPRewrite. `prefix` is the matched uri prefix of this route entry (Istio's prefix rewrite);
    None means the whole path is replaced by `uri`. `regex`/`substitution`: uriRegexRewrite."""

    uri: bytes | None = None
    prefix: bytes | None = None
    regex: Any = None  # compiled bytes pattern
    substitution: bytes = b""
    authority: bytes | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: bytes | None = None  # replaces the whole path (a query in it replaces the request's)
    authority: bytes | None = None
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: bytes | None = None
    code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """HTTPRetry compiled (Envoy's RetryPolicy)."""

    num_retries: int
    retry_on: frozenset[str]
    retriable_status_codes: frozenset[int] = frozenset()
    per_try_timeout_s: float | None = None
    ignore_previous_hosts: bool = True
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """HTTPFaultInjection compiled; percentages as parts per million."""

    delay_s: float = 0.0
    delay_ppm: int = 0
    abort_status: int = 0
    abort_ppm: int = 0
    abort_grpc_status: int | None = None  # abort as a gRPC error (HTTP 200, grpc-status) instead


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """corsPolicy compiled (Envoy's CORS filter): `origin_allowed(origin)`; the preflight answer's
    headers and the headers added to an allowed origin's actual responses are precomputed, the
    request's origin being echoed in access-control-allow-origin."""

    origin_allowed: Callable[[bytes], bool]
    preflight_headers: tuple[tuple[bytes, bytes], ...]
    response_headers: tuple[tuple[bytes, bytes], ...]
    forward_unmatched_preflights: bool = True


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    ppm: int  # parts per million of requests mirrored


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
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    cors: CorsPolicy | None = None
    # per-destination header operations exist somewhere in `destinations`
    destination_headers: bool = False
    # forwards as is: one or more destinations and no cors, rewrite or header operation to apply
    # (derived; the route stage then skips those checks)
    plain: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", bool(self.destinations) and self.cors is None and self.rewrite is None
                           and self.request_headers is None and not self.destination_headers)

    def pick_destination(self, rand_below: Callable[[int], int]) -> RouteDestination:
        return weighted_pick(self.destinations, self.cumulative_weights, rand_below)


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


LOOKUP_CACHE_MAX = 1024


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Virtual hosts of one listener, looked up by authority like Envoy: exact domain, then the
    longest `*.suffix` wildcard, then `*`. Port in the authority is ignored when the domain has none."""

    exact: Mapping[bytes, VirtualHost]
    suffixes: tuple[tuple[bytes, VirtualHost], ...]  # (".example.com", vh), longest first
    catch_all: VirtualHost | None
    # authority as received → its virtual host (or None), filled as requests come; the table is
    # immutable, so an entry never goes stale, and it is emptied when it reaches LOOKUP_CACHE_MAX
    _lookups: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def virtual_host_for(self, authority: bytes) -> VirtualHost | None:
        lookups = self._lookups
        try:
            return lookups[authority]
        except KeyError:
            pass
        vh = self._find(authority)
        if len(authority) <= 255:  # a DNS name's limit: no client can make the cache hold huge keys
            if len(lookups) >= LOOKUP_CACHE_MAX:
                lookups.clear()  # many distinct authorities (a scan, or random Host values): start over
            lookups[authority] = vh
        return vh

    def _find(self, authority: bytes) -> VirtualHost | None:
        host = authority.lower()
        vh = self.exact.get(host)
        if vh is not None:
            return vh
        host, port = split_authority(host)
        if port is not None:
            vh = self.exact.get(host)
            if vh is not None:
                return vh
        for suffix, vh in self.suffixes:
            if host.endswith(suffix):
                return vh
        return self.catch_all


@dataclass(frozen=True, slots=True)
class L4Route:
    """One VirtualService `tls` or `tcp` route for captured connections, compiled. A connection
    matches when any match block does (none: always): SNI among `sni_hosts` (exact or "*.suffix";
    tls only), its destination port, its destination address within `destination_subnets`."""

    virtual_service: str  # "namespace/name"
    kind: str  # "tls" | "tcp"
    matches: tuple[tuple[tuple[str, ...], int | None, tuple[Any, ...]], ...]  # (sni_hosts, port, subnets)
    destinations: tuple[RouteDestination, ...]
    cumulative_weights: tuple[int, ...]

    def matches_connection(self, sni: str | None, ip: str, port: int) -> bool:
        if not self.matches:
            return True
        for sni_hosts, want_port, subnets in self.matches:
            if want_port is not None and want_port != port:
                continue
            if subnets and not any(ipaddress.ip_address(ip) in net for net in subnets):
                continue
            if self.kind == "tls" and not _sni_matches(sni_hosts, sni):
                continue
            return True
        return False

    def pick_cluster(self, rand_below: Callable[[int], int]) -> str:
        return weighted_pick(self.destinations, self.cumulative_weights, rand_below).cluster


def _sni_matches(patterns: tuple[str, ...], sni: str | None) -> bool:
    if not sni:
        return False
    for p in patterns:
        if p == "*" or p == sni or (p.startswith("*.") and sni.endswith(p[1:])):
            return True
    return False


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """Where a server's certificate comes from: PEM files (Gateway serverCertificate/privateKey/
    caCertificates, or a credentialName resolved to its secret's files). Other sources (the mesh
    CA's workload certificate) become other kinds of this field; proxy/tls/certificates.py maps each
    to a source it can load and watch."""

    cert_file: str
    key_file: str
    ca_file: str = ""  # the CA bundle that verifies client certificates (MUTUAL)
    origin: str = ""  # what the user wrote, for /certs and errors: "credentialName x" or "files"


@dataclass(frozen=True, slots=True)
class ServerTls:
    """One terminating Gateway server's TLS (mode SIMPLE or MUTUAL), compiled."""

    server_names: tuple[str, ...]  # SNI it answers: exact names or "*.suffix"; ("*",) for any
    mode: str  # SIMPLE | MUTUAL | OPTIONAL_MUTUAL | ISTIO_MUTUAL (the workload certificate, proxy/tls/mesh.py)
    certificate: CertificateFiles
    min_protocol_version: str = "TLS_AUTO"
    max_protocol_version: str = "TLS_AUTO"
    cipher_suites: tuple[str, ...] = ()
    listener: str = ""  # the virtual listener whose routes serve this server's requests
    owner: str = ""  # "Gateway ns/name $.spec.servers[i]"


@dataclass(frozen=True, slots=True)
class Listener:
    name: str  # e.g. "0.0.0.0_8080"
    address: str
    port: int
    protocol: str  # Gateway server port.protocol: HTTP, TCP, ...
    route_table: RouteTable
    # OUTBOUND: gateway and Sidecar egress listeners; INBOUND: Sidecar ingress (to the local app)
    traffic_direction: str = "OUTBOUND"
    # Envoy's bind_to_port: False for a sidecar's virtual listeners, reached only through the
    # capture listeners (the route table of one captured service port, or of one inbound port)
    bind_to_port: bool = True
    # Envoy's use_original_dst: a capture listener (virtualOutbound :15001, virtualInbound :15006)
    # that reads SO_ORIGINAL_DST and hands each connection to a virtual listener or the TCP proxy
    use_original_dst: bool = False
    # a Gateway TCP server's route (protocol TCP): the VirtualService tcp route its connections take;
    # None on such a listener: no route applies, connections are closed
    tcp_route: L4Route | None = None
    # protocol HTTPS: the terminating servers on this port, chosen by SNI (the first one without SNI)
    tls_servers: tuple[ServerTls, ...] = ()
    # protocol TLS (PASSTHROUGH): the VirtualService tls routes, chosen by the ClientHello's SNI
    tls_routes: tuple[L4Route, ...] = ()


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
    # mesh VirtualService tls/tcp routes by the service host they apply to, in VirtualService order
    # (tls routes before tcp ones): how a sidecar routes captured connections it does not parse
    l4_routes: Mapping[str, tuple[L4Route, ...]] = field(default_factory=dict)
    # service hosts captured traffic may reach (the capturing Sidecar's egress `hosts`); None: all
    captured_hosts: frozenset[str] | None = None
    # the AuthorizationPolicies that apply to this proxy's workload; None: none does (no check at all)
    authorization: WorkloadAuthorization | None = None
    # the HTTP listeners that enforce them: a Gateway's servers and a Sidecar's inbound listeners
    # (a sidecar's outbound traffic is authorized by the proxy of its destination, as in Istio)
    authorized_listeners: frozenset[str] = frozenset()
    # the PeerAuthentication mode of this workload's inbound ports
    mtls: MtlsPolicy = MtlsPolicy()
    # addresses of the mesh's workloads (endpoints of MESH_INTERNAL services): an inbound request's
    # peer metadata is believed only from these (until mutual TLS authenticates the peer)
    mesh_addresses: frozenset[str] = frozenset()
    # the tracing settings of the Telemetry resources that apply to this proxy (config/telemetry.py)
    tracing: TracingPolicy = TracingPolicy()
    # the access logging of the Telemetry resources that apply; None: none says anything of it, every
    # request and connection is logged in --access-log's format (config/telemetry.py)
    access_logging: AccessLoggingPolicy | None = None
    # the Telemetry `metrics` overrides, applied to Istio's metrics when they are served (never per
    # request: proxy/telemetry/metrics_overrides.py); None: none applies
    metrics: MetricsPolicy | None = None


EMPTY_SNAPSHOT = Snapshot(version="", listeners=(), clusters={})
