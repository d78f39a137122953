"""Compile the traffic-control fields of VirtualService routes and DestinationRule traffic policies
(headers, rewrite, redirect, directResponse, retries, fault, mirror; loadBalancer, connectionPool,
outlierDetection) into the frozen policy objects of snapshot.py, with precise errors.

Defaults follow what Istio programs into Envoy:
- a route without `retries` gets Istio's default retry policy: 2 retries on
  "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes" with retriable status
  code 503, other hosts preferred (previous_hosts predicate); `attempts: 0` disables retries.
  A set `retryOn` replaces the default list; numeric entries ("503") become retriable status codes.
- fault percentages left unset inject nothing (Istio: "If left unspecified, no request will be ...").
- mirrors without a percentage mirror every request.
- outlierDetection fields left unset take Envoy's defaults (5 consecutive 5xx, 10 s interval, 30 s base
  ejection, 10 % max ejection); consecutiveGatewayErrors is off unless set.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Callable

from proxy.config.istio import (
    HTTP2_PROTOCOLS,
    ConnectionPoolSettings,
    HeaderOperations,
    Headers,
    HTTPRoute,
    OutlierDetection,
    PercentValue,
    StringMatch,
    TrafficPolicy,
)
from proxy.config.load import Resource
from proxy.config.matchers import compile_string_match
from proxy.config.snapshot import (
    ConnectionPool,
    CorsPolicy,
    ConsistentHash,
    DirectResponse,
    FaultPolicy,
    HeaderOps,
    MirrorPolicy,
    OutlierPolicy,
    Redirect,
    RetryPolicy,
    Rewrite,
)
from proxy.config.snapshot_transfer import rebuilt_by

# Envoy's retry_on conditions (x-envoy-retry-on and x-envoy-retry-grpc-on), all accepted by Istio.
RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
    "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
    "unavailable",
})
DEFAULT_RETRY = RetryPolicy(
    num_retries=2,
    retry_on=frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}),
    retriable_status_codes=frozenset({503}),
)
GRPC_CODES = {name: code for code, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}
_HEADER_NAME = re.compile(r"^:?[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PPM = 1_000_000


def ppm(p: PercentValue | None, legacy: int | None, default: float) -> int:
    """A percentage as parts per million (Istio's Percent is a double, the old form an integer)."""
    if p is not None:
        return round(p.value * 10_000)
    if legacy is not None:
        return legacy * 10_000
    return round(default * 10_000)


def header_ops(r: Resource, path: str, ops: HeaderOperations | None) -> HeaderOps | None:
    if ops is None or not (ops.set or ops.add or ops.remove):
        return None
    authority: bytes | None = None
    sets: list[tuple[bytes, bytes]] = []
    adds: list[tuple[bytes, bytes]] = []
    for kind, table, out in (("set", ops.set, sets), ("add", ops.add, adds)):
        for name, value in table.items():
            _check_header(r, f"{path}.{kind}.{name}", name, value)
            key = name.lower()
            if key in ("host", ":authority"):
                authority = value.encode()
                continue
            if key.startswith(":"):
                raise r.error(f"{path}.{kind}.{name}", f"pseudo-header {name!r} cannot be set")
            out.append((key.encode(), value.encode()))
    remove = []
    for i, name in enumerate(ops.remove):
        _check_header(r, f"{path}.remove[{i}]", name, "")
        if name.lower() in ("host", ":authority") or name.startswith(":"):
            raise r.error(f"{path}.remove[{i}]", f"{name!r} cannot be removed")
        remove.append(name.lower().encode())
    drop = frozenset(remove) | {n for n, _ in sets}
    return HeaderOps(tuple(sets), tuple(adds), frozenset(remove), drop, authority)


def _check_header(r: Resource, path: str, name: str, value: str) -> None:
    if not _HEADER_NAME.match(name):
        raise r.error(path, f"invalid header name {name!r}")
    if any(c in value for c in "\r\n\0"):
        raise r.error(path, "header values may not contain CR, LF or NUL")


def headers_pair(r: Resource, path: str, h: Headers | None) -> tuple[HeaderOps | None, HeaderOps | None]:
    if h is None:
        return None, None
    return header_ops(r, f"{path}.request", h.request), header_ops(r, f"{path}.response", h.response)


def retry_policy(r: Resource, path: str, http: HTTPRoute) -> RetryPolicy | None:
    spec = http.retries
    if spec is None:
        return DEFAULT_RETRY
    if spec.attempts == 0:
        return None
    retry_on = DEFAULT_RETRY.retry_on
    codes = DEFAULT_RETRY.retriable_status_codes
    if spec.retry_on:
        names: set[str] = set()
        found: set[int] = set()
        for token in spec.retry_on.split(","):
            token = token.strip()
            if not token:
                continue
            if token.isdigit():
                code = int(token)
                if not 100 <= code <= 599:
                    raise r.error(f"{path}.retries.retryOn", f"status code {code} is out of range 100-599")
                found.add(code)
            elif token in RETRY_ON:
                names.add(token)
            else:
                raise r.error(f"{path}.retries.retryOn",
                              f"unknown retry condition {token!r}; expected status codes or {', '.join(sorted(RETRY_ON))}")
        if found:
            names.add("retriable-status-codes")
        retry_on, codes = frozenset(names), frozenset(found)
    per_try = None
    if spec.per_try_timeout is not None:
        if spec.per_try_timeout < 0.001:
            raise r.error(f"{path}.retries.perTryTimeout", "perTryTimeout must be at least 1ms")
        per_try = float(spec.per_try_timeout)
    base = 0.025
    if spec.backoff is not None:
        if spec.backoff < 0.001:
            raise r.error(f"{path}.retries.backoff", "backoff must be at least 1ms")
        base = float(spec.backoff)
    return RetryPolicy(num_retries=spec.attempts, retry_on=retry_on, retriable_status_codes=codes,
                       per_try_timeout_s=per_try, ignore_previous_hosts=spec.retry_ignore_previous_hosts,
                       backoff_base_s=base, backoff_max_s=base * 10)


def fault_policy(r: Resource, path: str, http: HTTPRoute) -> FaultPolicy | None:
    f = http.fault
    if f is None:
        return None
    if f.delay is None and f.abort is None:
        raise r.error(f"{path}.fault", "a fault needs `delay` or `abort`")
    delay_s, delay_ppm, status, abort_ppm = 0.0, 0, 0, 0
    if f.delay is not None:
        if f.delay.fixed_delay is None:
            raise r.error(f"{path}.fault.delay.fixedDelay", "a delay needs fixedDelay")
        if f.delay.fixed_delay < 0.001:
            raise r.error(f"{path}.fault.delay.fixedDelay", "fixedDelay must be at least 1ms")
        delay_s = float(f.delay.fixed_delay)
        delay_ppm = ppm(f.delay.percentage, f.delay.percent, 0.0)
    grpc = None
    if f.abort is not None:
        if (f.abort.http_status is None) == (f.abort.grpc_status is None):
            raise r.error(f"{path}.fault.abort.httpStatus", "an abort needs exactly one of httpStatus and grpcStatus")
        if f.abort.grpc_status is not None:
            grpc = GRPC_CODES.get(f.abort.grpc_status.upper())
            if grpc is None:
                raise r.error(f"{path}.fault.abort.grpcStatus",
                              f"unknown gRPC status {f.abort.grpc_status!r}; expected one of {', '.join(GRPC_CODES)}")
            status = 200
        else:
            status = f.abort.http_status
        abort_ppm = ppm(f.abort.percentage, f.abort.percent, 0.0)
    return FaultPolicy(delay_s, delay_ppm, status, abort_ppm, grpc)


def rewrite_for(r: Resource, path: str, http: HTTPRoute, matched_prefix: bytes | None) -> Rewrite | None:
    rw = http.rewrite
    if rw is None:
        return None
    if http.redirect is not None or http.direct_response is not None:
        raise r.error(f"{path}.rewrite", "rewrite cannot be combined with redirect or directResponse")
    if not (rw.uri or rw.authority or rw.uri_regex_rewrite):
        raise r.error(f"{path}.rewrite", "a rewrite needs `uri`, `authority` or `uriRegexRewrite`")
    regex, sub = None, b""
    if rw.uri_regex_rewrite is not None:
        regex = re.compile(rw.uri_regex_rewrite.match.encode())
        # RE2 substitutions name groups \1..\9; Python's re.sub understands the same form
        sub = rw.uri_regex_rewrite.rewrite.encode()
        try:
            regex.sub(sub, b"")
        except re.error as e:
            raise r.error(f"{path}.rewrite.uriRegexRewrite.rewrite", f"invalid substitution: {e}") from None
    return Rewrite(uri=rw.uri.encode() if rw.uri else None, prefix=matched_prefix, regex=regex, substitution=sub,
                   authority=rw.authority.encode() if rw.authority else None)


def redirect_for(r: Resource, path: str, http: HTTPRoute) -> Redirect | None:
    rd = http.redirect
    if rd is None:
        return None
    if http.route:
        raise r.error(f"{path}.redirect", "a route with redirect cannot also have route destinations")
    if http.direct_response is not None:
        raise r.error(f"{path}.redirect", "redirect and directResponse are mutually exclusive")
    if rd.uri and not rd.uri.startswith("/"):
        raise r.error(f"{path}.redirect.uri", "a redirect uri must start with '/'")
    if rd.scheme and rd.scheme not in ("http", "https"):
        raise r.error(f"{path}.redirect.scheme", f"scheme {rd.scheme!r} is not http or https")
    return Redirect(uri=rd.uri.encode() if rd.uri else None, authority=rd.authority.encode() if rd.authority else None,
                    port=rd.port, derive_port=rd.derive_port, scheme=rd.scheme.encode() if rd.scheme else None,
                    code=rd.redirect_code)


def direct_response_for(r: Resource, path: str, http: HTTPRoute) -> DirectResponse | None:
    dr = http.direct_response
    if dr is None:
        return None
    if http.route:
        raise r.error(f"{path}.directResponse", "a route with directResponse cannot also have route destinations")
    body = b""
    if dr.body is not None:
        if dr.body.string is not None and dr.body.bytes is not None:
            raise r.error(f"{path}.directResponse.body", "a body takes only one of `string` and `bytes`")
        if dr.body.string is not None:
            body = dr.body.string.encode()
        elif dr.body.bytes is not None:
            try:
                body = base64.b64decode(dr.body.bytes, validate=True)
            except (binascii.Error, ValueError):
                raise r.error(f"{path}.directResponse.body.bytes", "not valid base64") from None
        if len(body) > 1024 * 1024:
            raise r.error(f"{path}.directResponse.body", "a direct response body is limited to 1 MiB")
    return DirectResponse(dr.status, body)


def mirror_policies(r: Resource, path: str, http: HTTPRoute, resolve: Callable[[str, object], str]) -> tuple[MirrorPolicy, ...]:
    out: list[MirrorPolicy] = []
    if http.mirror is not None:
        if http.mirrors:
            raise r.error(f"{path}.mirrors", "`mirror` and `mirrors` are mutually exclusive")
        cluster = resolve(f"{path}.mirror", http.mirror)
        out.append(MirrorPolicy(cluster, ppm(http.mirror_percentage, http.mirror_percent, 100.0)))
    elif http.mirror_percentage is not None or http.mirror_percent is not None:
        raise r.error(f"{path}.mirrorPercentage", "mirrorPercentage needs `mirror`")
    for i, m in enumerate(http.mirrors):
        cluster = resolve(f"{path}.mirrors[{i}].destination", m.destination)
        out.append(MirrorPolicy(cluster, ppm(m.percentage, None, 100.0)))
    return tuple(out)


def origin_matcher(exact: frozenset[bytes], allow_origins: tuple[StringMatch, ...]) -> Callable[[bytes], bool]:
    """corsPolicy's allowOrigin (exact values) and allowOrigins (string matches) as one predicate."""
    match_any = tuple(compile_string_match(m) for m in allow_origins)

    def origin_allowed(origin: bytes) -> bool:
        if origin in exact or b"*" in exact:
            return True
        for m in match_any:
            if m(origin):
                return True
        return False

    return rebuilt_by(origin_allowed, origin_matcher, exact, allow_origins)


def cors_policy(r: Resource, path: str, http: HTTPRoute) -> CorsPolicy | None:
    c = http.cors_policy
    if c is None:
        return None
    exact = frozenset(o.encode() for o in c.allow_origin)
    if not c.allow_origins and not exact:
        raise r.error(f"{path}.corsPolicy.allowOrigins", "a corsPolicy needs at least one allowed origin")
    for i, m in enumerate(c.allow_origins):
        if m.exact is None and m.prefix is None and m.regex is None:
            raise r.error(f"{path}.corsPolicy.allowOrigins[{i}]", "an origin match needs exact, prefix or regex")
    for field_name, values in (("allowHeaders", c.allow_headers), ("exposeHeaders", c.expose_headers)):
        for i, h in enumerate(values):
            if h != "*" and not _HEADER_NAME.match(h):
                raise r.error(f"{path}.corsPolicy.{field_name}[{i}]", f"invalid header name {h!r}")
    credentials = [(b"access-control-allow-credentials", b"true")] if c.allow_credentials else []
    preflight: list[tuple[bytes, bytes]] = []
    if c.allow_methods:
        preflight.append((b"access-control-allow-methods", ",".join(c.allow_methods).encode()))
    if c.allow_headers:
        preflight.append((b"access-control-allow-headers", ",".join(c.allow_headers).encode()))
    if c.max_age is not None:
        preflight.append((b"access-control-max-age", b"%d" % int(c.max_age)))
    preflight += credentials
    response = list(credentials)
    if c.expose_headers:
        response.append((b"access-control-expose-headers", ",".join(c.expose_headers).encode()))
    return CorsPolicy(origin_matcher(exact, tuple(c.allow_origins)), tuple(preflight), tuple(response),
                      forward_unmatched_preflights=c.unmatched_preflights != "IGNORE")


# --------------------------------------------------------------------------------------------------
# DestinationRule trafficPolicy


def merge_traffic_policy(base: TrafficPolicy | None, subset: TrafficPolicy | None) -> TrafficPolicy | None:
    """Istio's rule: a field set on the subset's policy replaces the host-level one as a whole."""
    if subset is None:
        return base
    if base is None:
        return subset
    return TrafficPolicy(
        load_balancer=subset.load_balancer or base.load_balancer,
        connection_pool=subset.connection_pool or base.connection_pool,
        outlier_detection=subset.outlier_detection or base.outlier_detection,
        retry_budget=subset.retry_budget or base.retry_budget,
        tls=subset.tls or base.tls,
    )


def _port_entry(tp: TrafficPolicy | None, port: int) -> TrafficPolicy | None:
    """The policy's portLevelSettings entry for `port`, as a policy of its own. It replaces the
    loadBalancer, connectionPool, outlierDetection and tls as a whole; as Istio documents, fields the
    entry leaves out fall back to the defaults, not to the enclosing policy's."""
    if tp is not None:
        for p in tp.port_level_settings:
            if p.port.number == port:
                return TrafficPolicy(load_balancer=p.load_balancer, connection_pool=p.connection_pool,
                                     outlier_detection=p.outlier_detection, retry_budget=tp.retry_budget, tls=p.tls)
    return None


def cluster_traffic_policy(host: TrafficPolicy | None, subset: TrafficPolicy | None, port: int) -> TrafficPolicy | None:
    """Istio's precedence for one cluster: subset port-level > subset > host port-level > host."""
    effective = _port_entry(host, port) or host
    if subset is None:
        return effective
    return _port_entry(subset, port) or merge_traffic_policy(effective, subset)


def lb_settings(tp: TrafficPolicy | None) -> tuple[str, ConsistentHash | None]:
    lb = tp.load_balancer if tp is not None else None
    if lb is None:
        return "ROUND_ROBIN", None
    if lb.consistent_hash is not None:
        ch = lb.consistent_hash
        ring, size = "ring_hash", 1024
        if ch.maglev is not None:
            ring, size = "maglev", ch.maglev.table_size
        elif ch.ring_hash is not None:
            size = ch.ring_hash.minimum_ring_size
        elif ch.minimum_ring_size is not None:
            size = ch.minimum_ring_size
        if ch.http_header_name is not None:
            return "CONSISTENT_HASH", ConsistentHash("header", ch.http_header_name.lower().encode(), ring=ring, ring_size=size)
        if ch.http_cookie is not None:
            c = ch.http_cookie
            attrs = b"".join(b"; " + (a.name + ("=" + a.value if a.value else "")).encode() for a in c.attributes)
            return "CONSISTENT_HASH", ConsistentHash("cookie", c.name.encode(), cookie_path=c.path.encode(),
                                                     cookie_ttl_s=None if c.ttl is None else float(c.ttl),
                                                     cookie_attributes=attrs, ring=ring, ring_size=size)
        if ch.http_query_parameter_name is not None:
            return "CONSISTENT_HASH", ConsistentHash("query", ch.http_query_parameter_name.encode(), ring=ring, ring_size=size)
        return "CONSISTENT_HASH", ConsistentHash("source_ip", ring=ring, ring_size=size)
    simple = lb.simple
    if simple in (None, "UNSPECIFIED"):
        return "ROUND_ROBIN", None
    return ("LEAST_REQUEST" if simple == "LEAST_CONN" else simple), None


def connection_pool(cp: ConnectionPoolSettings | None) -> tuple[ConnectionPool, float | None]:
    """(pool limits, tcp.connectTimeout or None)."""
    if cp is None:
        return ConnectionPool(), None
    return _pool(cp), (float(cp.tcp.connect_timeout) if cp.tcp and cp.tcp.connect_timeout is not None else None)


def pool_with_budget(tp: TrafficPolicy | None) -> tuple[ConnectionPool, float | None]:
    """connectionPool plus the policy's retryBudget, which lives beside it in Istio."""
    pool, connect = connection_pool(tp.connection_pool if tp else None)
    rb = tp.retry_budget if tp is not None else None
    if rb is not None:
        pool = dataclasses.replace(pool, retry_budget_percent=rb.percent.value if rb.percent is not None else 20.0,
                                   min_retry_concurrency=rb.min_retry_concurrency if rb.min_retry_concurrency is not None else 3)
    return pool, connect


def _pool(cp: ConnectionPoolSettings) -> ConnectionPool:
    tcp, http = cp.tcp, cp.http
    pool = ConnectionPool(
        max_connections=tcp.max_connections if tcp else None,
        max_pending_requests=http.http1_max_pending_requests if http else None,
        # Istio: 0 means unlimited
        max_requests_per_connection=(http.max_requests_per_connection or None) if http else None,
        max_retries=http.max_retries if http else None,
        idle_timeout_s=float(http.idle_timeout) if http and http.idle_timeout is not None else None,
        max_requests=http.http2_max_requests if http else None,
        # Istio applies only a positive value: 0 keeps the default
        max_concurrent_streams=(http.max_concurrent_streams or None) if http else None,
        max_connection_duration_s=(float(tcp.max_connection_duration) or None)
        if tcp and tcp.max_connection_duration is not None else None,
        keepalive=None if tcp is None or tcp.tcp_keepalive is None else (
            tcp.tcp_keepalive.probes,
            float(tcp.tcp_keepalive.time) if tcp.tcp_keepalive.time is not None else None,
            float(tcp.tcp_keepalive.interval) if tcp.tcp_keepalive.interval is not None else None),
    )
    return pool


def upstream_http2(protocol: str, tp: TrafficPolicy | None) -> bool:
    """Whether a cluster speaks h2c (HTTP/2 with prior knowledge) to its endpoints, as Istio decides:
    a port declared HTTP2, GRPC or GRPC-WEB always does (whatever the upgrade policy); an HTTP port
    only when the effective policy's connectionPool.http.h2UpgradePolicy is UPGRADE (DEFAULT follows
    the mesh default, DO_NOT_UPGRADE). `tp` is the cluster's effective policy (cluster_traffic_policy:
    a subset's or port's connectionPool replaces the enclosing one as a whole)."""
    if protocol in HTTP2_PROTOCOLS:
        return True
    if protocol != "HTTP":
        return False  # TCP, TLS, HTTPS...: proxied at L4, never HTTP/2-framed by the proxy
    cp = tp.connection_pool if tp is not None else None
    http = cp.http if cp is not None else None
    return http is not None and http.h2_upgrade_policy == "UPGRADE"


def outlier_policy(od: OutlierDetection | None) -> OutlierPolicy | None:
    if od is None:
        return None
    d = OutlierPolicy()
    consecutive_5xx, gateway = d.consecutive_5xx, d.consecutive_gateway
    if od.consecutive_errors:
        # the deprecated field counts gateway errors only, with the 5xx detector off (Istio's mapping)
        consecutive_5xx, gateway = 0, od.consecutive_errors
    if od.consecutive_5xx_errors is not None:
        consecutive_5xx = od.consecutive_5xx_errors
    if od.consecutive_gateway_errors is not None:
        gateway = od.consecutive_gateway_errors
    return OutlierPolicy(
        consecutive_5xx=consecutive_5xx,
        consecutive_gateway=gateway,
        interval_s=float(od.interval) if od.interval else d.interval_s,
        base_ejection_time_s=float(od.base_ejection_time) if od.base_ejection_time else d.base_ejection_time_s,
        max_ejection_percent=od.max_ejection_percent if od.max_ejection_percent is not None else d.max_ejection_percent,
        min_health_percent=od.min_health_percent if od.min_health_percent is not None else d.min_health_percent,
        split_local_origin=od.split_external_local_origin_errors,
        consecutive_local_origin=(od.consecutive_local_origin_failures
                                  if od.consecutive_local_origin_failures is not None else d.consecutive_local_origin),
    )
