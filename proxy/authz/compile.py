"""AuthorizationPolicy resources -> the WorkloadAuthorization of one proxy. Pure.

Which policies apply, as Istio scopes them: a policy in the root namespace applies to every
workload of the mesh, one in another namespace to that namespace's workloads; a `selector` narrows
either to the workloads whose labels it matches. A proxy that did not say its namespace (a
standalone edge proxy) gets the root namespace's policies only; one that did not say its labels is
matched by every selector (as Gateway selectors treat it).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping

from proxy.authz.policy import (
    CompiledPolicy,
    ConditionMatch,
    Matcher,
    OperationMatch,
    PathTemplate,
    RuleMatch,
    SourceMatch,
    StringMatcher,
    WorkloadAuthorization,
)
from proxy.config.istio import HEADER_KEY, IP_CONDITION_KEYS, Condition, Operation, Rule, Source, is_path_template
from proxy.config.scopes import selects


def applies(namespace: str, match_labels: Mapping[str, str], root_namespace: str, proxy_namespace: str | None,
            proxy_labels: Mapping[str, str] | None) -> bool:
    if namespace != root_namespace and namespace != proxy_namespace:
        return False
    return selects(match_labels, proxy_labels)


def _strings(values: tuple[str, ...], *, ignore_case: bool = False,
             header: bool = False) -> tuple[StringMatcher, ...] | None:
    if not values:
        return None
    return tuple(StringMatcher.parse(v, ignore_case=ignore_case, header=header) for v in values)


def _paths(values: tuple[str, ...]) -> tuple[Matcher, ...] | None:
    # Istio 1.22+: a path with `{*}` or `{**}` is a URI template; any other keeps exact/prefix/suffix
    if not values:
        return None
    return tuple(PathTemplate.parse(v) if is_path_template(v) else StringMatcher.parse(v) for v in values)


def _principals(values: tuple[str, ...]) -> tuple[StringMatcher, ...] | None:
    # Istio adds `spiffe://` to what the user wrote; the peer's principal is compared without it
    return _strings(tuple(v.removeprefix("spiffe://") for v in values))


def _networks(values: tuple[str, ...]):
    if not values:
        return None
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _ports(values: tuple[str, ...]) -> frozenset[int] | None:
    return frozenset(int(v) for v in values) if values else None


def _source(s: Source) -> SourceMatch:
    return SourceMatch(
        principals=_principals(s.principals),
        not_principals=_principals(s.not_principals),
        namespaces=_strings(s.namespaces),
        not_namespaces=_strings(s.not_namespaces),
        ip_blocks=_networks(s.ip_blocks),
        not_ip_blocks=_networks(s.not_ip_blocks),
        remote_ip_blocks=_networks(s.remote_ip_blocks),
        not_remote_ip_blocks=_networks(s.not_remote_ip_blocks),
    )


def _operation(o: Operation) -> OperationMatch:
    return OperationMatch(
        hosts=_strings(o.hosts, ignore_case=True),
        not_hosts=_strings(o.not_hosts, ignore_case=True),
        ports=_ports(o.ports),
        not_ports=_ports(o.not_ports),
        methods=_strings(o.methods),
        not_methods=_strings(o.not_methods),
        paths=_paths(o.paths),
        not_paths=_paths(o.not_paths),
    )


def _condition_values(key: str, values: tuple[str, ...], header: str) -> tuple:
    if header:
        return _strings(values, header=True) or ()
    if key in IP_CONDITION_KEYS:
        return _networks(values) or ()
    if key == "destination.port":
        return tuple(int(v) for v in values)
    if key == "source.principal":
        return _principals(values) or ()
    if key == "connection.sni":  # a DNS name: no case, no trailing dot (as evaluate's _condition_value)
        return tuple(StringMatcher.parse(_without_trailing_dot(v), ignore_case=True) for v in values)
    return _strings(values) or ()


def _without_trailing_dot(name: str) -> str:
    # "*." (a suffix match on the dot itself) and "." stay as written: stripped, they would mean "any"
    stripped = name.rstrip(".")
    return stripped if stripped not in ("", "*") else name


def _condition(c: Condition) -> ConditionMatch:
    match = HEADER_KEY.fullmatch(c.key)
    header = match.group(1).strip().lower() if match is not None else ""
    return ConditionMatch(c.key, _condition_values(c.key, c.values, header),
                          _condition_values(c.key, c.not_values, header), header)


def _rule(rule: Rule) -> RuleMatch:
    sources = tuple(_source(f.source) for f in rule.from_) if rule.from_ else None
    operations = tuple(_operation(t.operation) for t in rule.to) if rule.to else None
    conditions = tuple(_condition(c) for c in rule.when or ())
    http_only = any(o.http_only for o in operations or ()) or any(c.http_only for c in conditions)
    return RuleMatch(sources, operations, conditions, http_only)


def compile_policy(namespace: str, name: str, spec) -> CompiledPolicy:
    return CompiledPolicy(namespace, name, spec.action, tuple(_rule(r) for r in spec.rules))


def compile_authorization(policies: Iterable, root_namespace: str, proxy_namespace: str | None,
                          proxy_labels: Mapping[str, str] | None) -> WorkloadAuthorization | None:
    """The policies of `policies` (loaded AuthorizationPolicy resources) that apply to this proxy, or
    None when none does (the data path then skips authorization entirely)."""
    by_action: dict[str, list[CompiledPolicy]] = {"ALLOW": [], "DENY": [], "AUDIT": []}
    for r in policies:
        spec = r.obj.spec
        labels = spec.selector.match_labels if spec.selector is not None else {}
        if applies(r.namespace, labels, root_namespace, proxy_namespace, proxy_labels):
            by_action[spec.action].append(compile_policy(r.namespace, r.name, spec))
    if not any(by_action.values()):
        return None
    return WorkloadAuthorization(deny=tuple(by_action["DENY"]), allow=tuple(by_action["ALLOW"]),
                                 audit=tuple(by_action["AUDIT"]))


def describe(authorization: WorkloadAuthorization | None) -> dict:
    """The /config_dump view: which policies apply, by action."""
    if authorization is None:
        return {"deny": [], "allow": [], "audit": []}
    return {action: [f"{p.namespace}/{p.name}" for p in policies]
            for action, policies in (("deny", authorization.deny), ("allow", authorization.allow),
                                     ("audit", authorization.audit))}
