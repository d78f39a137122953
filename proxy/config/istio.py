"""Istio's config kinds as typed, immutable msgspec Structs: the schema `triomesh` accepts.

Theory of operation: every struct is frozen, camelCase on the wire (`rename="camel"`) and rejects
unknown fields, so a typo is an error with msgspec's `$.spec...` path instead of a silently ignored
setting. Field names are Istio's own (networking.istio.io v1 protos).

Istio fields triomesh does not enforce yet are still *declared* (typed `Any`, default UNSET) and listed
in the struct's `unsupported` class variable, so a user who writes `fault:` hears "not supported yet"
rather than "unknown field". Likewise a valid Istio enum value we do not enforce is listed in
`unsupported_values`. A field Istio removed is declared too and listed in `removed` with the reason
(what replaced it). `unsupported_settings()` walks a decoded resource and reports all three. Moving a
field from `unsupported` to a real type is how later issues add behaviour.

Scalars with syntax of their own are custom types decoded by `dec_hook` (errors carry the field's path):
`Duration` (protobuf JSON "1.5s" or Go style "100ms", "1m30s"), `Regex` (RE2 syntax, checked by
compiling), `Protocol` (Istio's port protocols, case-insensitive, normalized to upper case).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar, Iterator, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, field

API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
SECURITY_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
TELEMETRY_API_VERSIONS = ("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1")
# the tracing provider a Telemetry resource may name: the Zipkin collector given by --zipkin-address
TRACING_PROVIDERS = ("zipkin",)
# the access-log provider a Telemetry resource may name: Istio's built-in `envoy` (Envoy's default
# text format on the proxy's access log); extensionProviders need a MeshConfig triomesh does not read
ACCESS_LOG_PROVIDERS = ("envoy",)
# the metrics provider: the proxy's /stats/prometheus
METRICS_PROVIDERS = ("prometheus",)
# Istio's standard metrics by their Telemetry names (MetricSelector.IstioMetric)
ISTIO_METRIC_NAMES = {
    "REQUEST_COUNT": "istio_requests_total",
    "REQUEST_DURATION": "istio_request_duration_milliseconds",
    "REQUEST_SIZE": "istio_request_bytes",
    "RESPONSE_SIZE": "istio_response_bytes",
    "TCP_OPENED_CONNECTIONS": "istio_tcp_connections_opened_total",
    "TCP_CLOSED_CONNECTIONS": "istio_tcp_connections_closed_total",
    "TCP_SENT_BYTES": "istio_tcp_sent_bytes_total",
    "TCP_RECEIVED_BYTES": "istio_tcp_received_bytes_total",
    "GRPC_REQUEST_MESSAGES": "istio_request_messages_total",
    "GRPC_RESPONSE_MESSAGES": "istio_response_messages_total",
}

PortNumber = Annotated[int, Meta(ge=1, le=65535)]
Percent = Annotated[int, Meta(ge=0, le=100)]
Labels = dict[str, str]


# --------------------------------------------------------------------------------------------------
# custom scalar types (decoded by dec_hook)


class Duration(float):
    """Seconds. Accepts protobuf JSON durations ("1s", "0.5s") and Go durations ("100ms", "1m30s")."""

    __slots__ = ()


class Regex(str):
    """An RE2-syntax regular expression, matched as a full match (Envoy's safe_regex semantics)."""

    __slots__ = ()


class Protocol(str):
    """An Istio port protocol name, normalized to upper case."""

    __slots__ = ()


# Istio's protocol names (pkg/config/protocol): parsing is case-insensitive.
PROTOCOLS = frozenset(
    {"HTTP", "HTTPS", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-WEB", "TCP", "TLS", "UDP", "MONGO", "MYSQL", "REDIS"}
)

# Istio's HTTP-family port protocols that an HTTP listener serves (HTTP/1.1 and h2c alike), and the
# subset of them whose upstream is spoken to in HTTP/2 whatever the h2UpgradePolicy (Istio's
# protocol.IsHTTP2). HTTP_PROXY is HTTP too in Istio, but triomesh takes it only on a Sidecar egress
# listener (the explicit-proxy port), so it is not in HTTP_PROTOCOLS.
HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})
HTTP_PROTOCOLS = frozenset({"HTTP"}) | HTTP2_PROTOCOLS


def is_http_protocol(protocol: str) -> bool:
    """Whether a port of this (normalized) protocol is served and routed as HTTP (an L7 listener)."""
    return protocol in HTTP_PROTOCOLS


_GO_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+")
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# protobuf Duration's range: +-315,576,000,000 s
_MAX_DURATION_S = 315_576_000_000.0

# Python `re` accepts constructs RE2 (Envoy's engine) rejects; refuse them so a config that validates
# here also means the same thing there.
_NON_RE2 = re.compile(r"(?<!\\)(?:\(\?<?[=!]|\(\?P=|\(\?\(|[*+?}][+])|(?<!\\)(?:\\\\)*\\[1-9]")


def parse_duration(text: str) -> float:
    """Seconds from a duration string; ValueError with the reason when malformed."""
    if not text or _GO_DURATION.fullmatch(text) is None:
        raise ValueError(f"invalid duration {text!r}: expected e.g. \"2s\", \"0.5s\", \"100ms\", \"1m30s\"")
    seconds = sum(float(num) * _UNIT_S[unit] for num, unit in _GO_PART.findall(text))
    if seconds > _MAX_DURATION_S:
        raise ValueError(f"duration {text!r} is out of range")
    return seconds


def check_regex(pattern: str) -> None:
    bad = _NON_RE2.search(pattern)
    if bad is not None:
        raise ValueError(f"regex {pattern!r} uses {bad.group(0)!r}, which RE2 does not support")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None


def dec_hook(tp: type, obj: Any) -> Any:
    """msgspec.convert hook for the custom scalars above. Errors become ValidationErrors with a path."""
    if tp is Duration:
        if not isinstance(obj, str):
            raise TypeError(f"Expected a duration string like \"2s\", got `{type(obj).__name__}`")
        return Duration(parse_duration(obj))
    if tp is Regex:
        if not isinstance(obj, str):
            raise TypeError(f"Expected a regex string, got `{type(obj).__name__}`")
        check_regex(obj)
        return Regex(obj)
    if tp is Protocol:
        if not isinstance(obj, str):
            raise TypeError(f"Expected a protocol name, got `{type(obj).__name__}`")
        name = obj.upper()
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {obj!r}; expected one of {', '.join(sorted(PROTOCOLS))}")
        return Protocol(name)
    raise NotImplementedError(tp)


# --------------------------------------------------------------------------------------------------
# base


class IstioStruct(Struct, frozen=True, forbid_unknown_fields=True, rename="camel", kw_only=True, omit_defaults=True):
    # Python field names of Istio fields accepted by the schema but not enforced yet
    unsupported: ClassVar[tuple[str, ...]] = ()
    # Python field name -> valid Istio enum values not enforced yet (a dict: value -> why)
    unsupported_values: ClassVar[dict[str, frozenset[str] | dict[str, str]]] = {}
    # Python field name -> why a field Istio removed is refused (declared so the user hears that, not
    # "unknown field")
    removed: ClassVar[dict[str, str]] = {}


def _not_set(value: Any) -> bool:
    return value is UNSET or value is None


def unsupported_settings(obj: Any, path: str = "$") -> Iterator[tuple[str, str]]:
    """Yield (field path, message) for every set field or enum value triomesh does not enforce yet."""
    if isinstance(obj, Struct):
        cls = type(obj)
        # the class's own field tables: msgspec.structs.fields() evaluates every annotation on each
        # call, which made this walk most of the cost of loading a resource
        names = zip(cls.__struct_fields__, cls.__struct_encode_fields__)
        unsupported = getattr(cls, "unsupported", ())
        bad_values = getattr(cls, "unsupported_values", {})
        removed = getattr(cls, "removed", {})
        for name, wire in names:
            value = getattr(obj, name)
            if _not_set(value):
                continue
            sub = f"{path}.{wire}"
            if name in removed:
                yield sub, removed[name]
                continue
            if name in unsupported:
                yield sub, f"`{wire}` is an Istio {cls.__name__} field triomesh does not support yet"
                continue
            if name in bad_values and value in bad_values[name]:
                reasons = bad_values[name]
                yield sub, reasons[value] if isinstance(reasons, dict) else f"{wire} {value} is not supported by triomesh yet"
                continue
            yield from unsupported_settings(value, sub)
        refused_values = getattr(obj, "refused_values", None)
        if refused_values is not None:  # a value triomesh refuses that the field's type cannot express
            for wire, message in refused_values():
                yield f"{path}.{wire}", message
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from unsupported_settings(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            if isinstance(item, Struct):
                yield from unsupported_settings(item, f"{path}.{key}")


# --------------------------------------------------------------------------------------------------
# envelope


# Kubernetes ObjectMeta fields the API server manages (what `kubectl get -o yaml` prints besides the
# author's name, namespace, labels and annotations): the loader drops them, with a top-level `status`.
SERVER_MANAGED_METADATA = frozenset({
    "creationTimestamp", "resourceVersion", "uid", "generation", "managedFields", "ownerReferences",
    "finalizers", "selfLink", "generateName", "deletionTimestamp", "deletionGracePeriodSeconds",
    "clusterName",  # removed in Kubernetes 1.25, still in older exports
})


class ObjectMeta(IstioStruct, frozen=True):
    name: Annotated[str, Meta(min_length=1)]
    namespace: Annotated[str, Meta(min_length=1)] = "default"
    labels: Labels = field(default_factory=dict)
    annotations: Labels = field(default_factory=dict)


class WorkloadSelector(IstioStruct, frozen=True):
    labels: Labels = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# VirtualService


class StringMatch(IstioStruct, frozen=True):
    """Istio's oneof exact/prefix/regex; empty (`{}`) means "present" for header matches."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.exact, self.prefix, self.regex)) > 1:
            raise ValueError("a StringMatch takes only one of `exact`, `prefix`, `regex`")


class HTTPMatchRequest(IstioStruct, frozen=True):
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = field(default_factory=dict)
    port: PortNumber | None = None
    source_labels: Labels = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = field(default_factory=dict)
    source_namespace: Any = UNSET
    stat_prefix: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("source_namespace", "stat_prefix")


class PortSelector(IstioStruct, frozen=True):
    number: PortNumber


class Destination(IstioStruct, frozen=True):
    host: Annotated[str, Meta(min_length=1)]
    subset: str = ""
    port: PortSelector | None = None


class HeaderOperations(IstioStruct, frozen=True):
    """Istio `Headers.HeaderOperations`: `set` overwrites, `add` appends, `remove` deletes by name."""

    set: dict[str, str] = field(default_factory=dict)
    add: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


class Headers(IstioStruct, frozen=True):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(IstioStruct, frozen=True):
    destination: Destination
    weight: Percent = 0
    headers: Headers | None = None


class RegexRewrite(IstioStruct, frozen=True):
    match: Regex
    rewrite: str


class HTTPRewrite(IstioStruct, frozen=True):
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None

    def __post_init__(self) -> None:
        if self.uri and self.uri_regex_rewrite is not None:
            raise ValueError("a rewrite takes only one of `uri` and `uriRegexRewrite`")


class HTTPRedirect(IstioStruct, frozen=True):
    uri: str = ""
    authority: str = ""
    port: PortNumber | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str = ""
    redirect_code: Annotated[int, Meta(ge=300, le=399)] = 301

    def __post_init__(self) -> None:
        if self.port is not None and self.derive_port is not None:
            raise ValueError("a redirect takes only one of `port` and `derivePort`")
        if self.redirect_code not in (301, 302, 303, 307, 308):
            raise ValueError(f"redirectCode {self.redirect_code} is not one of 301, 302, 303, 307, 308")


class HTTPBody(IstioStruct, frozen=True):
    string: str | None = None
    bytes: str | None = None  # base64 text, decoded by the compiler
    file_name: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("file_name",)


class HTTPDirectResponse(IstioStruct, frozen=True):
    status: Annotated[int, Meta(ge=200, le=599)]
    body: HTTPBody | None = None


class PercentValue(IstioStruct, frozen=True):
    """Istio's `Percent`: a double in [0, 100]."""

    value: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0


class HTTPRetry(IstioStruct, frozen=True):
    attempts: Annotated[int, Meta(ge=0)] = 0
    per_try_timeout: Duration | None = None
    retry_on: str = ""
    retry_remote_localities: Any = UNSET
    retry_ignore_previous_hosts: bool = True
    backoff: Duration | None = None

    unsupported: ClassVar[tuple[str, ...]] = ("retry_remote_localities",)


class FaultDelay(IstioStruct, frozen=True):
    fixed_delay: Duration | None = None
    percentage: PercentValue | None = None
    percent: Percent | None = None  # deprecated integer form
    exponential_delay: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("exponential_delay",)


class FaultAbort(IstioStruct, frozen=True):
    http_status: Annotated[int, Meta(ge=200, le=599)] | None = None
    grpc_status: str | None = None
    percentage: PercentValue | None = None
    percent: Percent | None = None  # deprecated integer form (Istio 1.x read it when percentage is unset)
    http2_error: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("http2_error",)


class HTTPFaultInjection(IstioStruct, frozen=True):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class HTTPMirrorPolicy(IstioStruct, frozen=True):
    destination: Destination
    percentage: PercentValue | None = None


class CorsPolicy(IstioStruct, frozen=True):
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()  # deprecated exact origins
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] = "FORWARD"


class Delegate(IstioStruct, frozen=True):
    name: Annotated[str, Meta(min_length=1)]
    namespace: str = ""


class HTTPRoute(IstioStruct, frozen=True):
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    timeout: Duration | None = None
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percent: Percent | None = None  # deprecated integer form of mirrorPercentage
    mirror_percentage: PercentValue | None = None
    headers: Headers | None = None
    cors_policy: CorsPolicy | None = None
    delegate: Delegate | None = None
    websocket_upgrade: Any = UNSET

    removed: ClassVar[dict[str, str]] = {
        "websocket_upgrade": "`websocketUpgrade` was removed from Istio's VirtualService (deprecated in Istio 1.0): "
                             "WebSocket upgrades are always allowed; delete the field",
    }


class RouteDestination(IstioStruct, frozen=True):
    """A tls/tcp route destination (no header operations at L4)."""

    destination: Destination
    weight: Percent = 0


class L4MatchAttributes(IstioStruct, frozen=True):
    destination_subnets: tuple[str, ...] = ()
    port: PortNumber | None = None
    source_labels: Labels = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    source_namespace: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("source_namespace",)


class TLSMatchAttributes(IstioStruct, frozen=True):
    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: PortNumber | None = None
    source_labels: Labels = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    source_namespace: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("source_namespace",)


class TLSRoute(IstioStruct, frozen=True):
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


class TCPRoute(IstioStruct, frozen=True):
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


class VirtualServiceSpec(IstioStruct, frozen=True):
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# DestinationRule

LbSimple = Literal["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"]


class CookieAttribute(IstioStruct, frozen=True):
    name: Annotated[str, Meta(min_length=1)]
    value: str = ""


class HTTPCookie(IstioStruct, frozen=True):
    name: Annotated[str, Meta(min_length=1)]
    path: str = ""
    ttl: Duration | None = None
    attributes: tuple[CookieAttribute, ...] = ()


class RingHash(IstioStruct, frozen=True):
    minimum_ring_size: Annotated[int, Meta(ge=1, le=8_388_608)] = 1024


class MagLev(IstioStruct, frozen=True):
    table_size: Annotated[int, Meta(ge=2, le=5_000_011)] = 65537

    def __post_init__(self) -> None:
        n = self.table_size
        if n < 2 or any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
            raise ValueError(f"maglev tableSize {n} is not a prime number")


class ConsistentHashLB(IstioStruct, frozen=True):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: Annotated[int, Meta(ge=1, le=8_388_608)] | None = None  # deprecated: ringHash

    def __post_init__(self) -> None:
        keys = (self.http_header_name, self.http_cookie, self.use_source_ip or None, self.http_query_parameter_name)
        if sum(k is not None for k in keys) != 1:
            raise ValueError(
                "a consistentHash takes exactly one of `httpHeaderName`, `httpCookie`, `useSourceIp`, "
                "`httpQueryParameterName`"
            )
        if self.ring_hash is not None and self.maglev is not None:
            raise ValueError("a consistentHash takes only one of `ringHash` and `maglev`")


def _check_localities(patterns: list[str]) -> None:
    """Istio's validateLocalities: a `*` only as the last segment, no pattern given twice."""
    seen: set[str] = set()
    for p in patterns:
        parts = p.split("/")
        if not p or len(parts) > 3 or any(not part for part in parts):
            raise ValueError(f"locality {p!r} must be region, region/zone or region/zone/subzone (a `*` may end it)")
        if "*" in parts[:-1] or any("*" in part and part != "*" for part in parts):
            raise ValueError(f"locality {p!r}: the wildcard `*` may only be the whole last segment")
        if p in seen:
            raise ValueError(f"locality {p!r} is given twice")
        seen.add(p)


class LocalityDistribute(IstioStruct, frozen=True):
    """Traffic from the localities `from` matches goes to the localities of `to` by weight (percent)."""

    from_: str = field(name="from")
    to: dict[str, int] = field(default_factory=dict)


class LocalityFailover(IstioStruct, frozen=True):
    """When the endpoints of the proxy's region `from` are unhealthy, prefer region `to`."""

    from_: str = field(name="from")
    to: str


class LocalityLoadBalancerSetting(IstioStruct, frozen=True):
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: Any = UNSET
    enabled: bool | None = None

    unsupported: ClassVar[tuple[str, ...]] = ("failover_priority",)

    def __post_init__(self) -> None:
        # Istio's validateLocalityLbSetting
        if self.distribute and self.failover:
            raise ValueError("a localityLbSetting cannot set both `distribute` and `failover`")
        for d in self.distribute:
            for weight in d.to.values():
                if not 1 <= weight <= 100:
                    raise ValueError("a distribute locality weight must be in [1, 100]")
            if sum(d.to.values()) != 100:
                raise ValueError(f"total locality weight {sum(d.to.values())} != 100 (distribute from {d.from_!r})")
            _check_localities(list(d.to))
        _check_localities([d.from_ for d in self.distribute])
        for f in self.failover:
            if f.from_ == f.to:
                raise ValueError(f"a locality failover must name two different regions (from and to are {f.to!r})")
            if "/" in f.from_ + f.to:
                raise ValueError("a locality failover names regions only (no `/`)")
            if "*" in f.from_ + f.to:
                raise ValueError("a locality failover region cannot contain the wildcard `*`")


class LoadBalancerSettings(IstioStruct, frozen=True):
    simple: LbSimple | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: Any = UNSET
    warmup: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("warmup_duration_secs", "warmup")

    def __post_init__(self) -> None:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("a loadBalancer takes only one of `simple` and `consistentHash`")


class TcpKeepalive(IstioStruct, frozen=True):
    probes: Annotated[int, Meta(ge=1)] | None = None
    time: Duration | None = None
    interval: Duration | None = None


class TCPSettings(IstioStruct, frozen=True):
    max_connections: Annotated[int, Meta(ge=1)] | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("idle_timeout",)


class HTTPSettings(IstioStruct, frozen=True):
    http1_max_pending_requests: Annotated[int, Meta(ge=1)] | None = None
    http2_max_requests: Annotated[int, Meta(ge=1)] | None = None
    max_requests_per_connection: Annotated[int, Meta(ge=0)] | None = None
    max_retries: Annotated[int, Meta(ge=0)] | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    # int32 in Istio; 0 leaves Envoy's default (no limit beyond the peer's SETTINGS)
    max_concurrent_streams: Annotated[int, Meta(ge=0, le=2_147_483_647)] | None = None

    def __post_init__(self) -> None:
        if self.h2_upgrade_policy == "UPGRADE" and self.use_client_protocol:
            raise ValueError("useClientProtocol must not be true when h2UpgradePolicy is UPGRADE")


class ConnectionPoolSettings(IstioStruct, frozen=True):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(IstioStruct, frozen=True):
    consecutive_5xx_errors: Annotated[int, Meta(ge=0)] | None = field(default=None, name="consecutive5xxErrors")
    consecutive_gateway_errors: Annotated[int, Meta(ge=0)] | None = None
    consecutive_errors: Annotated[int, Meta(ge=0)] | None = None  # deprecated: gateway errors, 5xx detector off
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Percent | None = None
    min_health_percent: Percent | None = None
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: Annotated[int, Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        for name, value in (("interval", self.interval), ("baseEjectionTime", self.base_ejection_time)):
            if value is not None and value < 0.001:
                raise ValueError(f"{name} must be at least 1ms")


class ClientTLSSettings(IstioStruct, frozen=True):
    """Istio's ClientTLSSettings (DestinationRule `tls`): TLS the proxy originates to the upstream.
    ISTIO_MUTUAL uses the workload certificate from the mesh CA (docs/mtls.md); caCrl is refused as not
    supported yet."""

    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool | None = None
    ca_crl: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("ca_crl",)


class PortTrafficPolicy(IstioStruct, frozen=True):
    port: PortSelector
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class RetryBudget(IstioStruct, frozen=True):
    percent: PercentValue | None = None
    min_retry_concurrency: Annotated[int, Meta(ge=0)] | None = None


class TrafficPolicy(IstioStruct, frozen=True):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tls: ClientTLSSettings | None = None
    tunnel: Any = UNSET
    proxy_protocol: Any = UNSET
    retry_budget: RetryBudget | None = None

    unsupported: ClassVar[tuple[str, ...]] = ("tunnel", "proxy_protocol")


class Subset(IstioStruct, frozen=True):
    name: Annotated[str, Meta(min_length=1)]
    labels: Labels = field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(IstioStruct, frozen=True):
    host: Annotated[str, Meta(min_length=1)]
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("workload_selector",)


# --------------------------------------------------------------------------------------------------
# Gateway


class Port(IstioStruct, frozen=True):
    """Gateway `Port` and ServiceEntry `ServicePort` (same fields)."""

    number: PortNumber
    protocol: Protocol
    name: str = ""
    target_port: PortNumber | None = None


TLSProtocol = Literal["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"]


class ServerTLSSettings(IstioStruct, frozen=True):
    """Istio's ServerTLSSettings (Gateway `servers[].tls`). TLSV1_0/TLSV1_1 decode (they are Istio
    values) and are refused by the compiler with the reason; ISTIO_MUTUAL likewise (it needs the
    mesh CA's workload certificate)."""

    https_redirect: bool = False
    mode: Literal["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"] = "PASSTHROUGH"
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    min_protocol_version: TLSProtocol = "TLS_AUTO"
    max_protocol_version: TLSProtocol = "TLS_AUTO"
    cipher_suites: tuple[str, ...] = ()
    ca_crl: Any = UNSET
    credential_names: Any = UNSET
    tls_certificates: Any = UNSET
    subject_alt_names: Any = UNSET
    verify_certificate_spki: Any = UNSET
    verify_certificate_hash: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = (
        "ca_crl", "credential_names", "tls_certificates", "subject_alt_names", "verify_certificate_spki",
        "verify_certificate_hash",
    )
    unsupported_values: ClassVar[dict[str, frozenset[str]]] = {"mode": frozenset({"AUTO_PASSTHROUGH"})}


class Server(IstioStruct, frozen=True):
    port: Port
    hosts: tuple[str, ...] = ()
    bind: str = ""
    name: str = ""
    tls: ServerTLSSettings | None = None
    default_endpoint: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("default_endpoint",)


class GatewaySpec(IstioStruct, frozen=True):
    servers: tuple[Server, ...] = ()
    selector: Labels = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# ServiceEntry / WorkloadEntry


class WorkloadEntrySpec(IstioStruct, frozen=True):
    """Also the type of ServiceEntry `endpoints[]`."""

    address: str = ""
    ports: dict[str, PortNumber] = field(default_factory=dict)
    labels: Labels = field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: Annotated[int, Meta(ge=0)] = 0
    service_account: str = ""


class ServiceEntrySpec(IstioStruct, frozen=True):
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[Port, ...] = ()
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] = "MESH_EXTERNAL"
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"] = "NONE"
    endpoints: tuple[WorkloadEntrySpec, ...] = ()
    workload_selector: WorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()  # the upstream certificate's SANs, when a DestinationRule's tls does not say


# --------------------------------------------------------------------------------------------------
# Sidecar

CaptureMode = Literal["DEFAULT", "IPTABLES", "NONE"]


class SidecarPort(IstioStruct, frozen=True):
    number: Annotated[int, Meta(ge=0, le=65535)] = 0
    protocol: Protocol | None = None
    name: str = ""
    target_port: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("target_port",)


class IstioEgressListener(IstioStruct, frozen=True):
    port: SidecarPort | None = None
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    hosts: tuple[str, ...] = ()


class IstioIngressListener(IstioStruct, frozen=True):
    port: SidecarPort
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    default_endpoint: str = ""
    tls: Any = UNSET
    connection_pool: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("tls", "connection_pool")


class OutboundTrafficPolicy(IstioStruct, frozen=True):
    mode: Literal["REGISTRY_ONLY", "ALLOW_ANY"] = "REGISTRY_ONLY"
    egress_proxy: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("egress_proxy",)


class SidecarSpec(IstioStruct, frozen=True):
    workload_selector: WorkloadSelector | None = None
    ingress: tuple[IstioIngressListener, ...] = ()
    egress: tuple[IstioEgressListener, ...] = ()
    inbound_connection_pool: Any = UNSET
    outbound_traffic_policy: OutboundTrafficPolicy | None = None

    unsupported: ClassVar[tuple[str, ...]] = ("inbound_connection_pool",)


# --------------------------------------------------------------------------------------------------
# security.istio.io: PeerAuthentication, AuthorizationPolicy


class SecurityWorkloadSelector(IstioStruct, frozen=True):
    """istio.type.v1beta1.WorkloadSelector (`matchLabels`), the selector of the security kinds."""

    match_labels: Labels = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Istio's validateWorkloadSelector
        for key, value in self.match_labels.items():
            if not key:
                raise ValueError(f"empty key is not supported in selector: {key}={value}")
            if "*" in key or "*" in value:
                raise ValueError(f"wildcard is not supported in selector: {key}={value}")


class PolicyTargetReference(IstioStruct, frozen=True):
    """`targetRef`/`targetRefs` (Gateway API attachment): declared so it is refused by name."""

    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class MutualTLS(IstioStruct, frozen=True):
    mode: MtlsMode = "UNSET"


def _decimal_port(text: str) -> int | None:
    """A port number written as decimal text, or None. ASCII digits only, as Go's strconv reads it
    (str.isdigit() alone takes "８０" or "²")."""
    return int(text) if text.isascii() and text.isdigit() else None


def _port_level_key(key: int | str) -> int:
    """A `portLevelMtls` key as its port number. Hand-written YAML gives integer keys; JSON, and the
    YAML `kubectl get -o yaml` prints, give decimal strings (map keys are strings in JSON, and Istio's
    protobuf JSON reads a uint32 key from its decimal text)."""
    port = _decimal_port(key) if isinstance(key, str) else key
    if port is None:
        raise ValueError(f"portLevelMtls port {key!r} is not a port number in [1, 65535]")
    if not 0 < port <= 65535:
        raise ValueError(f"portLevelMtls port {port} is not a port number in [1, 65535]")
    return port


def _by_port_number(port_level_mtls: dict[int | str, MutualTLS]) -> dict[int, MutualTLS]:
    by_port: dict[int, MutualTLS] = {}
    for key, mtls in port_level_mtls.items():
        port = _port_level_key(key)
        if port in by_port:  # 8080 and "8080" (or "08080"): Istio's protobuf JSON refuses a duplicate key
            raise ValueError(f"portLevelMtls port {port} is given twice")
        by_port[port] = mtls
    return by_port


class PeerAuthenticationSpec(IstioStruct, frozen=True):
    selector: SecurityWorkloadSelector | None = None
    mtls: MutualTLS | None = None
    # keyed by port number: integer keys, or decimal strings, which __post_init__ turns into integers
    port_level_mtls: dict[int | str, MutualTLS] | None = None

    def __post_init__(self) -> None:
        # Istio's ValidatePeerAuthentication
        if self.port_level_mtls is not None:
            if self.selector is None or not self.selector.match_labels:
                raise ValueError("mesh/namespace peer authentication cannot have port level mTLS "
                                 "(`portLevelMtls` needs a `selector` with matchLabels)")
            if not self.port_level_mtls:
                raise ValueError("port level mTLS, if defined, must have at least one element")
            msgspec.structs.force_setattr(self, "port_level_mtls", _by_port_number(self.port_level_mtls))


def _check_ip_blocks(name: str, blocks: tuple[str, ...]) -> None:
    """Istio's ValidateIPs: every entry an IP address or a CIDR block."""
    for block in blocks:
        try:
            ipaddress.ip_network(block, strict=False)
        except ValueError:
            raise ValueError(f"{name}: {block!r} is not an IP address or CIDR block") from None


def _check_no_empty_values(name: str, values: tuple[str, ...]) -> None:
    """Istio's CheckEmptyValues: an empty string would match nothing (or everything) by accident."""
    if any(v == "" for v in values):
        raise ValueError(f"empty value is found in {name}")


class Source(IstioStruct, frozen=True):
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    service_accounts: Any = UNSET
    not_service_accounts: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("service_accounts", "not_service_accounts")

    def __post_init__(self) -> None:
        values = {wire: getattr(self, name) for name, wire in zip(self.__struct_fields__, self.__struct_encode_fields__)}
        if not any(v for v in values.values() if v is not UNSET):
            raise ValueError("`source` must not be empty (a rule with no `from` matches every source)")
        for name in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
            _check_ip_blocks(name, values[name])
        for name, value in values.items():
            if isinstance(value, tuple):
                _check_no_empty_values(name, value)

    def refused_values(self) -> Iterator[tuple[str, str]]:
        for wire, value in (("requestPrincipals", self.request_principals),
                            ("notRequestPrincipals", self.not_request_principals)):
            if value:
                yield wire, f"`{wire}` needs RequestAuthentication (JWT), which triomesh does not support yet"


class RuleFrom(IstioStruct, frozen=True):
    source: Source | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            raise ValueError("`from.source` must be set")


def _check_ports(name: str, ports: tuple[str, ...]) -> None:
    """Istio's ValidatePorts: each a port number (as text)."""
    for port in ports:
        number = _decimal_port(port)
        if number is None or not 0 < number <= 65535:
            raise ValueError(f"{name}: {port!r} is not a port number in [1, 65535]")


# Istio's path template operators (1.22+): a path holding either is an Envoy URI template, `{*}` one
# path segment, `{**}` any number of them
MATCH_ONE_SEGMENT = "{*}"
MATCH_ANY_SEGMENTS = "{**}"
# what a template's literal segment may hold, and what its operators match: RFC 3986 pchar less `*`
# (Envoy's kLiteral; Istio's validLiteral), as the body of a regex character class
PATH_TEMPLATE_CHARACTERS = r"a-zA-Z0-9\-._~%!$&'()+,;:@="
_PATH_TEMPLATE_LITERAL = re.compile(f"[{PATH_TEMPLATE_CHARACTERS}]+")


def is_path_template(path: str) -> bool:
    return MATCH_ONE_SEGMENT in path or MATCH_ANY_SEGMENTS in path


def path_template_error(path: str) -> str | None:
    """Why a `paths` entry is refused, or None: Istio's CheckValidPathTemplate, plus what Envoy's URI
    template parser would refuse after it (no leading `/`, an empty segment), which Istio leaves to a
    rejected listener."""
    if not is_path_template(path):
        return "'{' and '}' may only make a whole segment {*} or {**}" if "{" in path or "}" in path else None
    if not path.startswith("/"):
        return "it must start with '/'"
    seen_any = False
    for segment in path[1:].removesuffix("/").split("/"):  # one trailing `/` is a literal Envoy keeps
        if segment in (MATCH_ONE_SEGMENT, MATCH_ANY_SEGMENTS):
            if seen_any:
                return "{**} must be the last operator"
            seen_any = segment == MATCH_ANY_SEGMENTS
        elif "{" in segment or "}" in segment:
            return "'{' and '}' may only make a whole segment {*} or {**}"
        elif not segment:
            return "it has an empty segment"
        elif _PATH_TEMPLATE_LITERAL.fullmatch(segment) is None:
            return (f"segment {segment!r} has a character other than letters, digits and -._~%!$&'()+,;:@= "
                    f"(no `*` beside {{*}} or {{**}})")
    return None


def _check_path_templates(name: str, paths: tuple[str, ...]) -> None:
    for path in paths:
        why = path_template_error(path)
        if why is not None:
            raise ValueError(f"{name}: {path!r} is not a valid path template: {why}")


class Operation(IstioStruct, frozen=True):
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        values = {wire: getattr(self, name) for name, wire in zip(self.__struct_fields__, self.__struct_encode_fields__)}
        if not any(values.values()):
            raise ValueError("`operation` must not be empty (a rule with no `to` matches every operation)")
        _check_ports("ports", self.ports)
        _check_ports("notPorts", self.not_ports)
        for name, value in values.items():
            _check_no_empty_values(name, value)
        _check_path_templates("paths", self.paths)
        _check_path_templates("notPaths", self.not_paths)


class RuleTo(IstioStruct, frozen=True):
    operation: Operation | None = None

    def __post_init__(self) -> None:
        if self.operation is None:
            raise ValueError("`to.operation` must be set")


# Istio's condition keys (security/conditions): supported here, and the JWT ones refused by name
CONDITION_KEYS = frozenset({
    "source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip", "destination.port",
    "connection.sni",
})
JWT_CONDITION_KEYS = frozenset({"request.auth.principal", "request.auth.audiences", "request.auth.presenter"})
HEADER_KEY = re.compile(r"request\.headers\[([^\]]+)\]")
JWT_CLAIM_KEY = re.compile(r"request\.auth\.claims\[.+\]")
IP_CONDITION_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})


class Condition(IstioStruct, frozen=True):
    key: Annotated[str, Meta(min_length=1)]
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        key = self.key
        jwt = key in JWT_CONDITION_KEYS or JWT_CLAIM_KEY.fullmatch(key) is not None
        if not jwt and key not in CONDITION_KEYS and HEADER_KEY.fullmatch(key) is None:
            raise ValueError(f"unknown condition key {key!r}; expected one of "
                             f"{', '.join(sorted(CONDITION_KEYS))} or request.headers[<name>]")
        header = HEADER_KEY.fullmatch(key)
        if header is not None and not header.group(1).strip():
            raise ValueError(f"condition key {key!r} names no header (request.headers[<name>])")
        if not self.values and not self.not_values:
            raise ValueError(f"at least one of `values` or `notValues` must be set for key {key}")
        for name, values in (("values", self.values), ("notValues", self.not_values)):
            _check_no_empty_values(name, values)
            if key in IP_CONDITION_KEYS:
                _check_ip_blocks(f"{name} of {key}", values)
            elif key == "destination.port":
                _check_ports(f"{name} of {key}", values)

    def refused_values(self) -> Iterator[tuple[str, str]]:
        if self.key in JWT_CONDITION_KEYS or JWT_CLAIM_KEY.fullmatch(self.key) is not None:
            yield "key", f"condition key {self.key!r} needs RequestAuthentication (JWT), which triomesh does not support yet"


class Rule(IstioStruct, frozen=True):
    from_: tuple[RuleFrom, ...] | None = field(default=None, name="from")
    to: tuple[RuleTo, ...] | None = None
    when: tuple[Condition, ...] | None = None

    def __post_init__(self) -> None:
        for name, value in (("from", self.from_), ("to", self.to), ("when", self.when)):
            if value is not None and not value:
                raise ValueError(f"`{name}` must not be empty (leave it out to match everything)")


class ExtensionProvider(IstioStruct, frozen=True):
    name: str = ""


class AuthorizationPolicySpec(IstioStruct, frozen=True):
    selector: SecurityWorkloadSelector | None = None
    target_ref: Any = UNSET
    target_refs: Any = UNSET
    rules: tuple[Rule, ...] = ()
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("target_ref", "target_refs", "provider")
    unsupported_values: ClassVar[dict[str, frozenset[str]]] = {"action": frozenset({"CUSTOM"})}

    def __post_init__(self) -> None:
        # Istio's ValidateAuthorizationPolicy
        if self.action == "DENY" and not self.rules:
            raise ValueError("DENY action without `rules` is meaningless as it will never be triggered, "
                             "add an empty rule `{}` if you want it be triggered for every request")


class ProviderRef(IstioStruct, frozen=True):
    name: Annotated[str, Meta(min_length=1)]


class TelemetryTracing(IstioStruct, frozen=True):
    """Telemetry `tracing[]`: which provider, how many requests are sampled, whether spans are reported."""

    match: Any = UNSET
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: Annotated[float, Meta(ge=0, le=100)] | None = None
    disable_span_reporting: bool | None = None
    custom_tags: Any = UNSET
    use_request_id_for_trace_sampling: Any = UNSET
    enable_istio_tags: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("match", "custom_tags", "use_request_id_for_trace_sampling",
                                              "enable_istio_tags")

    def refused_values(self) -> Iterator[tuple[str, str]]:
        for i, provider in enumerate(self.providers):
            if provider.name not in TRACING_PROVIDERS:
                yield (f"providers[{i}].name", f"tracing provider {provider.name!r} is not one triomesh has; "
                       f"it reports to {', '.join(repr(p) for p in TRACING_PROVIDERS)} (the collector of --zipkin-address)")


class TelemetryMatch(IstioStruct, frozen=True):
    """Telemetry `match`: which side of the proxy's traffic a setting is for (a gateway is CLIENT)."""

    mode: Literal["CLIENT", "SERVER", "CLIENT_AND_SERVER"] = "CLIENT_AND_SERVER"


class AccessLogFilter(IstioStruct, frozen=True):
    expression: str


class TelemetryAccessLogging(IstioStruct, frozen=True):
    """Telemetry `accessLogging[]`: whether requests get an access-log line, which ones, in what provider."""

    match: TelemetryMatch | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: bool | None = None
    filter: AccessLogFilter | None = None

    def refused_values(self) -> Iterator[tuple[str, str]]:
        from proxy.config.access_log_filter import FilterError, compile_filter

        for i, provider in enumerate(self.providers):
            if provider.name not in ACCESS_LOG_PROVIDERS:
                yield (f"providers[{i}].name", f"access-log provider {provider.name!r} is not one triomesh has; it "
                       f"writes to {', '.join(repr(p) for p in ACCESS_LOG_PROVIDERS)} (Envoy's text format on the "
                       "proxy's access log): meshConfig extensionProviders are not configurable")
        if self.filter is not None:
            try:
                compile_filter(self.filter.expression)
            except FilterError as e:
                yield ("filter.expression", f"filter expression {self.filter.expression!r} is not one triomesh "
                       f"evaluates: {e}")


class MetricSelector(IstioStruct, frozen=True):
    """Telemetry `metrics[].overrides[].match`: which of Istio's metrics, reported by which side."""

    metric: Literal["ALL_METRICS", "REQUEST_COUNT", "REQUEST_DURATION", "REQUEST_SIZE", "RESPONSE_SIZE",
                    "TCP_OPENED_CONNECTIONS", "TCP_CLOSED_CONNECTIONS", "TCP_SENT_BYTES", "TCP_RECEIVED_BYTES",
                    "GRPC_REQUEST_MESSAGES", "GRPC_RESPONSE_MESSAGES"] = "ALL_METRICS"
    custom_metric: Any = UNSET
    mode: Literal["CLIENT", "SERVER", "CLIENT_AND_SERVER"] = "CLIENT_AND_SERVER"

    unsupported: ClassVar[tuple[str, ...]] = ("custom_metric",)


class TagOverride(IstioStruct, frozen=True):
    operation: Literal["UPSERT", "REMOVE"] = "UPSERT"
    value: str | None = None

    def refused_values(self) -> Iterator[tuple[str, str]]:
        if self.operation == "UPSERT":
            if self.value is None:
                yield ("value", "UPSERT needs a `value`")
            elif literal_tag_value(self.value) is None:
                yield ("value", f"tag value {self.value!r} is not one triomesh evaluates: only a quoted string "
                       "literal ('text' or \"text\"), applied when the metrics are served; attribute "
                       "expressions would cost every request")


def literal_tag_value(expression: str) -> str | None:
    """The string of a CEL string literal ('x' or "x"), None for anything else."""
    text = expression.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and text[0] not in text[1:-1] \
            and "\\" not in text:
        return text[1:-1]
    return None


class MetricsOverride(IstioStruct, frozen=True):
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: dict[str, TagOverride] = field(default_factory=dict)


class TelemetryMetrics(IstioStruct, frozen=True):
    """Telemetry `metrics[]`: overrides of Istio's standard metrics, applied when they are served."""

    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverride, ...] = ()
    reporting_interval: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("reporting_interval",)

    def refused_values(self) -> Iterator[tuple[str, str]]:
        for i, provider in enumerate(self.providers):
            if provider.name not in METRICS_PROVIDERS:
                yield (f"providers[{i}].name", f"metrics provider {provider.name!r} is not one triomesh has; it "
                       f"serves {', '.join(repr(p) for p in METRICS_PROVIDERS)} (the admin /stats/prometheus)")


class TelemetrySpec(IstioStruct, frozen=True):
    selector: SecurityWorkloadSelector | None = None
    target_ref: Any = UNSET
    target_refs: Any = UNSET
    tracing: tuple[TelemetryTracing, ...] = ()
    metrics: tuple[TelemetryMetrics, ...] = ()
    access_logging: tuple[TelemetryAccessLogging, ...] = ()

    unsupported: ClassVar[tuple[str, ...]] = ("target_ref", "target_refs")

    def __post_init__(self) -> None:
        if len(self.tracing) > 1:  # Istio itself uses only the first entry
            raise ValueError("only one `tracing` entry is supported (Istio applies only the first)")


# --------------------------------------------------------------------------------------------------
# the kinds


class _Kind(IstioStruct, frozen=True):
    api_version: Literal[API_VERSIONS]  # type: ignore[valid-type]
    metadata: ObjectMeta

    api_versions: ClassVar[tuple[str, ...]] = API_VERSIONS

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def name(self) -> str:
        return self.metadata.name


class _SecurityKind(_Kind, frozen=True):
    api_version: Literal[SECURITY_API_VERSIONS]  # type: ignore[valid-type]

    api_versions: ClassVar[tuple[str, ...]] = SECURITY_API_VERSIONS


class _TelemetryKind(_Kind, frozen=True):
    api_version: Literal[TELEMETRY_API_VERSIONS]  # type: ignore[valid-type]

    api_versions: ClassVar[tuple[str, ...]] = TELEMETRY_API_VERSIONS


class Gateway(_Kind, frozen=True, kw_only=True):
    kind: Literal["Gateway"]
    spec: GatewaySpec


class VirtualService(_Kind, frozen=True, kw_only=True):
    kind: Literal["VirtualService"]
    spec: VirtualServiceSpec


class DestinationRule(_Kind, frozen=True, kw_only=True):
    kind: Literal["DestinationRule"]
    spec: DestinationRuleSpec


class ServiceEntry(_Kind, frozen=True, kw_only=True):
    kind: Literal["ServiceEntry"]
    spec: ServiceEntrySpec


class WorkloadEntry(_Kind, frozen=True, kw_only=True):
    kind: Literal["WorkloadEntry"]
    spec: WorkloadEntrySpec


class Sidecar(_Kind, frozen=True, kw_only=True):
    kind: Literal["Sidecar"]
    spec: SidecarSpec


class PeerAuthentication(_SecurityKind, frozen=True, kw_only=True):
    kind: Literal["PeerAuthentication"]
    spec: PeerAuthenticationSpec = PeerAuthenticationSpec()


class AuthorizationPolicy(_SecurityKind, frozen=True, kw_only=True):
    kind: Literal["AuthorizationPolicy"]
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()


class Telemetry(_TelemetryKind, frozen=True, kw_only=True):
    kind: Literal["Telemetry"]
    spec: TelemetrySpec = TelemetrySpec()


IstioObject = Union[Gateway, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Sidecar, PeerAuthentication,
                    AuthorizationPolicy, Telemetry]

KINDS: dict[str, type] = {
    cls.__name__: cls for cls in (Gateway, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Sidecar,
                                  PeerAuthentication, AuthorizationPolicy, Telemetry)
}
