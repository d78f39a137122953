"""Whether a request (or a TCP connection) may pass the AuthorizationPolicies of its workload. Pure.

Theory of operation, as Istio documents it: CUSTOM policies would run first (triomesh refuses
them); then if any DENY policy matches, the request is denied; then if no ALLOW policy applies, it
is allowed; if some do, it is allowed only when one of them matches. AUDIT policies never decide,
they only mark the request. A policy matches when one of its rules does; a rule when one of its
`from` sources, one of its `to` operations and all of its `when` conditions match (a part left out
matches anything; a policy with no rules matches nothing).

Peer identity: `principal` is the peer certificate's SPIFFE ID without `spiffe://`
("cluster.local/ns/foo/sa/bar"), None for a plaintext peer. A positive principal or namespace
field never matches a plaintext peer; a `not` form does (Envoy's RBAC negates "authenticated as
X", which is false without a certificate).

TCP (`http` False): a rule naming an HTTP-only field (hosts, methods, paths, request.headers) never
matches in an ALLOW policy, and in DENY and AUDIT policies those fields are ignored, so the rule
matches more connections (Istio's TCP authorization: never less restrictive).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping, Union

from proxy.authz.policy import (
    CompiledPolicy,
    ConditionMatch,
    OperationMatch,
    RuleMatch,
    SourceMatch,
    WorkloadAuthorization,
    any_matches,
    in_networks,
)

IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(slots=True)
class Attributes:
    """What a policy can see of one request or connection."""

    source_ip: IpAddress | None  # the direct peer
    remote_ip: IpAddress | None  # the original client (x-forwarded-for, see remote_address)
    principal: str | None  # the peer's identity; None: plaintext
    destination_ip: IpAddress | None
    destination_port: int | None
    sni: str | None = None
    http: bool = False
    method: str | None = None
    host: str | None = None  # the authority as sent
    path: str | None = None  # normalized (paths.normalize_path)
    headers: Mapping[str, str] | None = None  # lowercase name -> values joined with ","

    @property
    def namespace(self) -> str | None:
        return namespace_of(self.principal)


def namespace_of(principal: str | None) -> str | None:
    """The namespace in a "<trust-domain>/ns/<namespace>/sa/<account>" principal."""
    if principal is None:
        return None
    _, sep, rest = principal.partition("/ns/")
    if not sep:
        return None
    namespace, sep, _ = rest.partition("/sa/")
    return namespace if sep else None


def parse_ip(text: str | bytes | None) -> IpAddress | None:
    if not text:
        return None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        return ipaddress.ip_address(text.strip().strip("[]").partition("%")[0])
    except ValueError:
        return None


def remote_address(direct: IpAddress | None, forwarded_for: str | None, num_trusted_proxies: int) -> IpAddress | None:
    """The original client as Envoy's xff_num_trusted_hops finds it (Istio's numTrustedProxies):
    with N trusted proxies in front, the Nth address from the right of x-forwarded-for; with 0 (the
    default), or a shorter list, the direct peer."""
    if num_trusted_proxies <= 0 or not forwarded_for:
        return direct
    addresses = [a.strip() for a in forwarded_for.split(",") if a.strip()]
    if len(addresses) < num_trusted_proxies:
        return direct
    return parse_ip(addresses[-num_trusted_proxies]) or direct


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    # the policy that decided, as Envoy names it (ns[..]-policy[..]-rule[..]); "none" when an ALLOW
    # policy applied and none matched; "" when allowed because no policy says otherwise
    policy: str = ""
    audit: str = ""  # the AUDIT policy rule that matched, "" when none did

    @property
    def details(self) -> str:
        """Envoy's response code details for a denial (also the TCP termination details)."""
        return f"rbac_access_denied_matched_policy[{self.policy}]"


def _source_matches(s: SourceMatch, a: Attributes) -> bool:
    if s.principals is not None and not any_matches(s.principals, a.principal):
        return False
    if s.not_principals is not None and any_matches(s.not_principals, a.principal):
        return False
    if s.namespaces is not None or s.not_namespaces is not None:
        namespace = a.namespace
        if s.namespaces is not None and not any_matches(s.namespaces, namespace):
            return False
        if s.not_namespaces is not None and any_matches(s.not_namespaces, namespace):
            return False
    if s.ip_blocks is not None and not in_networks(s.ip_blocks, a.source_ip):
        return False
    if s.not_ip_blocks is not None and in_networks(s.not_ip_blocks, a.source_ip):
        return False
    if s.remote_ip_blocks is not None and not in_networks(s.remote_ip_blocks, a.remote_ip):
        return False
    if s.not_remote_ip_blocks is not None and in_networks(s.not_remote_ip_blocks, a.remote_ip):
        return False
    return True


def _operation_matches(o: OperationMatch, a: Attributes) -> bool:
    if o.ports is not None and a.destination_port not in o.ports:
        return False
    if o.not_ports is not None and a.destination_port in o.not_ports:
        return False
    if not a.http:
        return True  # hosts, methods and paths ignored (DENY/AUDIT; ALLOW rules with them never get here)
    if o.hosts is not None and not any_matches(o.hosts, a.host):
        return False
    if o.not_hosts is not None and any_matches(o.not_hosts, a.host):
        return False
    if o.methods is not None and not any_matches(o.methods, a.method):
        return False
    if o.not_methods is not None and any_matches(o.not_methods, a.method):
        return False
    if o.paths is not None and not any_matches(o.paths, a.path):
        return False
    if o.not_paths is not None and any_matches(o.not_paths, a.path):
        return False
    return True


def _condition_value(c: ConditionMatch, a: Attributes):
    key = c.key
    if c.header:
        return a.headers.get(c.header) if a.headers is not None else None
    if key == "source.ip":
        return a.source_ip
    if key == "remote.ip":
        return a.remote_ip
    if key == "destination.ip":
        return a.destination_ip
    if key == "destination.port":
        return a.destination_port
    if key == "source.principal":
        return a.principal
    if key == "source.namespace":
        return a.namespace
    # connection.sni: a client may write its SNI in any case and with a trailing dot, as the server
    # it reaches is picked (ListenerTls.pick); a policy on it must see the name the same way
    return (a.sni.rstrip(".") or a.sni) if a.sni else a.sni


def _value_matches(c: ConditionMatch, values: tuple, value) -> bool:
    if c.key in ("source.ip", "remote.ip", "destination.ip"):
        return in_networks(values, value)
    if c.key == "destination.port":
        return value in values
    return any_matches(values, value)


def _condition_matches(c: ConditionMatch, a: Attributes) -> bool:
    if c.header and not a.http:
        return True  # an HTTP-only condition, ignored on TCP (DENY/AUDIT)
    value = _condition_value(c, a)
    if c.values and not _value_matches(c, c.values, value):
        return False
    if c.not_values and _value_matches(c, c.not_values, value):
        return False
    return True


def rule_matches(rule: RuleMatch, a: Attributes, action: str) -> bool:
    if not a.http and rule.http_only and action == "ALLOW":
        return False
    if rule.sources is not None and not any(_source_matches(s, a) for s in rule.sources):
        return False
    if rule.operations is not None and not any(_operation_matches(o, a) for o in rule.operations):
        return False
    return all(_condition_matches(c, a) for c in rule.conditions)


def first_match(policies: tuple[CompiledPolicy, ...], a: Attributes) -> str:
    """The label of the first rule that matches among `policies`, "" when none does."""
    for policy in policies:
        for index, rule in enumerate(policy.rules):
            if rule_matches(rule, a, policy.action):
                return policy.label(index)
    return ""


def evaluate(authorization: WorkloadAuthorization, a: Attributes) -> Verdict:
    audit = first_match(authorization.audit, a) if authorization.audit else ""
    if authorization.deny:
        matched = first_match(authorization.deny, a)
        if matched:
            return Verdict(False, matched, audit)
    if not authorization.allow:
        return Verdict(True, "", audit)
    matched = first_match(authorization.allow, a)
    if matched:
        return Verdict(True, matched, audit)
    return Verdict(False, "none", audit)
