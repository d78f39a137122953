"""Istio's config kinds as typed, immutable msgspec Structs: the schema `triomesh` accepts.

Theory of operation: every struct is frozen, camelCase on the wire (`rename="camel"`) and rejects
unknown fields, so a typo is an error with msgspec's `$.spec...` path instead of a silently ignored
setting. Field names are Istio's own (networking.istio.io v1 protos).

Istio fields triomesh does not enforce yet are still *declared* (typed `Any`, default UNSET) and listed
in the struct's `unsupported` class variable, so a user who writes `fault:` hears "not supported yet"
rather than "unknown field". Likewise a valid Istio enum value we do not enforce is listed in
`unsupported_values`. `unsupported_settings()` walks a decoded resource and reports both. Moving a
field from `unsupported` to a real type is how later issues add behaviour.

Scalars with syntax of their own are custom types decoded by `dec_hook` (errors carry the field's path):
`Duration` (protobuf JSON "1.5s" or Go style "100ms", "1m30s"), `Regex` (RE2 syntax, checked by
compiling), `Protocol` (Istio's port protocols, case-insensitive, normalized to upper case).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Iterator, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, field

API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")

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
    # Python field name -> valid Istio enum values not enforced yet
    unsupported_values: ClassVar[dict[str, frozenset[str]]] = {}


def _not_set(value: Any) -> bool:
    return value is UNSET or value is None


def unsupported_settings(obj: Any, path: str = "$") -> Iterator[tuple[str, str]]:
    """Yield (field path, message) for every set field or enum value triomesh does not enforce yet."""
    if isinstance(obj, Struct):
        cls = type(obj)
        names = {f.name: f.encode_name for f in msgspec.structs.fields(cls)}
        unsupported = getattr(cls, "unsupported", ())
        bad_values = getattr(cls, "unsupported_values", {})
        for name, wire in names.items():
            value = getattr(obj, name)
            if _not_set(value):
                continue
            sub = f"{path}.{wire}"
            if name in unsupported:
                yield sub, f"`{wire}` is an Istio {cls.__name__} field triomesh does not support yet"
                continue
            if name in bad_values and value in bad_values[name]:
                yield sub, f"{wire} {value} is not supported by triomesh yet"
                continue
            yield from unsupported_settings(value, sub)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from unsupported_settings(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            if isinstance(item, Struct):
                yield from unsupported_settings(item, f"{path}.{key}")


# --------------------------------------------------------------------------------------------------
# envelope


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


class HTTPRouteDestination(IstioStruct, frozen=True):
    destination: Destination
    weight: Percent = 0
    headers: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("headers",)


class HTTPRoute(IstioStruct, frozen=True):
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    timeout: Duration | None = None
    # issue 3 and later
    redirect: Any = UNSET
    direct_response: Any = UNSET
    delegate: Any = UNSET
    rewrite: Any = UNSET
    retries: Any = UNSET
    fault: Any = UNSET
    mirror: Any = UNSET
    mirrors: Any = UNSET
    mirror_percent: Any = UNSET
    mirror_percentage: Any = UNSET
    cors_policy: Any = UNSET
    headers: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = (
        "redirect",
        "direct_response",
        "delegate",
        "rewrite",
        "retries",
        "fault",
        "mirror",
        "mirrors",
        "mirror_percent",
        "mirror_percentage",
        "cors_policy",
        "headers",
    )


class VirtualServiceSpec(IstioStruct, frozen=True):
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: Any = UNSET
    tcp: Any = UNSET
    export_to: tuple[str, ...] = ()

    unsupported: ClassVar[tuple[str, ...]] = ("tls", "tcp")


# --------------------------------------------------------------------------------------------------
# DestinationRule

LbSimple = Literal["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"]


class LoadBalancerSettings(IstioStruct, frozen=True):
    simple: LbSimple | None = None
    consistent_hash: Any = UNSET
    locality_lb_setting: Any = UNSET
    warmup_duration_secs: Any = UNSET
    warmup: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("consistent_hash", "locality_lb_setting", "warmup_duration_secs", "warmup")
    unsupported_values: ClassVar[dict[str, frozenset[str]]] = {"simple": frozenset({"PASSTHROUGH"})}


class TrafficPolicy(IstioStruct, frozen=True):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: Any = UNSET
    outlier_detection: Any = UNSET
    tls: Any = UNSET
    port_level_settings: Any = UNSET
    tunnel: Any = UNSET
    proxy_protocol: Any = UNSET
    retry_budget: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = (
        "connection_pool",
        "outlier_detection",
        "tls",
        "port_level_settings",
        "tunnel",
        "proxy_protocol",
        "retry_budget",
    )


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


class Server(IstioStruct, frozen=True):
    port: Port
    hosts: tuple[str, ...] = ()
    bind: str = ""
    name: str = ""
    tls: Any = UNSET
    default_endpoint: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("tls", "default_endpoint")


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
    subject_alt_names: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("subject_alt_names",)


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

    unsupported_values: ClassVar[dict[str, frozenset[str]]] = {"capture_mode": frozenset({"IPTABLES"})}


class IstioIngressListener(IstioStruct, frozen=True):
    port: SidecarPort
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    default_endpoint: str = ""
    tls: Any = UNSET
    connection_pool: Any = UNSET

    unsupported: ClassVar[tuple[str, ...]] = ("tls", "connection_pool")
    unsupported_values: ClassVar[dict[str, frozenset[str]]] = {"capture_mode": frozenset({"IPTABLES"})}


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
# the kinds


class _Kind(IstioStruct, frozen=True):
    api_version: Literal[API_VERSIONS]  # type: ignore[valid-type]
    metadata: ObjectMeta
    status: Any = UNSET  # written by Kubernetes, not config: tolerated and dropped

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def name(self) -> str:
        return self.metadata.name


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


IstioObject = Union[Gateway, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Sidecar]

KINDS: dict[str, type] = {
    cls.__name__: cls for cls in (Gateway, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Sidecar)
}
