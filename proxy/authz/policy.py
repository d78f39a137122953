"""The compiled form of the AuthorizationPolicies that apply to one workload: matchers built once,
per snapshot, so evaluating a request only compares.

Istio's string matching (exact, prefix `abc*`, suffix `*abc`, `*` any value) becomes one
`StringMatcher`, a path with `{*}` or `{**}` a `PathTemplate`; CIDR lists become `ip_network`s; ports
become ints. A field left out of a rule is `None` (matches anything); a `not` form is kept beside its
positive form, as Envoy's RBAC does.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Union

from proxy.config.istio import MATCH_ANY_SEGMENTS, MATCH_ONE_SEGMENT, PATH_TEMPLATE_CHARACTERS

IpNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """One Istio string value: `*` any non-empty value, `abc*` a prefix, `*abc` a suffix, else exact.
    `ignore_case` for hosts (Istio matches them case-insensitively). For a request header (`header`)
    `*` is Envoy's present_match, which an empty value passes too: Istio's HeaderMatcher for "*"."""

    kind: str  # "non_empty" | "present" | "prefix" | "suffix" | "exact"
    value: str
    ignore_case: bool = False

    @classmethod
    def parse(cls, text: str, *, ignore_case: bool = False, header: bool = False) -> StringMatcher:
        value = text.lower() if ignore_case else text
        if value == "*":
            return cls("present" if header else "non_empty", "", ignore_case)
        if value.endswith("*"):
            return cls("prefix", value[:-1], ignore_case)
        if value.startswith("*"):
            return cls("suffix", value[1:], ignore_case)
        return cls("exact", value, ignore_case)

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.ignore_case:
            text = text.lower()
        kind = self.kind
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "suffix":
            return text.endswith(self.value)
        return kind == "present" or text != ""


# a template operator as Envoy's uri_template compiles it: `{*}` one or more path characters (one
# segment), `{**}` zero or more path characters or `/` (any number of segments)
_OPERATOR_REGEX = {MATCH_ONE_SEGMENT: f"[{PATH_TEMPLATE_CHARACTERS}]+",
                   MATCH_ANY_SEGMENTS: f"[{PATH_TEMPLATE_CHARACTERS}/]*"}


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A `paths`/`notPaths` entry with `{*}` or `{**}` (validated by the loader): Envoy's URI template
    match, the whole path against the template's segments. Plain paths stay `StringMatcher`s."""

    template: str
    regex: re.Pattern

    @classmethod
    def parse(cls, template: str) -> PathTemplate:
        segments = template[1:].split("/")
        body = "/".join(_OPERATOR_REGEX.get(s) or re.escape(s) for s in segments)
        return cls(template, re.compile("/" + body))

    def matches(self, text: str | None) -> bool:
        return text is not None and self.regex.fullmatch(text) is not None


Matcher = Union[StringMatcher, PathTemplate]


def any_matches(matchers: tuple[Matcher, ...], text: str | None) -> bool:
    return any(m.matches(text) for m in matchers)


def in_networks(networks: tuple[IpNetwork, ...], ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True, slots=True)
class SourceMatch:
    """`from[].source`: every field set must hold (each list: any entry; a `not` list: no entry)."""

    principals: tuple[StringMatcher, ...] | None = None
    not_principals: tuple[StringMatcher, ...] | None = None
    namespaces: tuple[StringMatcher, ...] | None = None
    not_namespaces: tuple[StringMatcher, ...] | None = None
    ip_blocks: tuple[IpNetwork, ...] | None = None
    not_ip_blocks: tuple[IpNetwork, ...] | None = None
    remote_ip_blocks: tuple[IpNetwork, ...] | None = None
    not_remote_ip_blocks: tuple[IpNetwork, ...] | None = None


@dataclass(frozen=True, slots=True)
class OperationMatch:
    """`to[].operation`. hosts, methods and paths are HTTP-only fields (see `http_only`)."""

    hosts: tuple[StringMatcher, ...] | None = None
    not_hosts: tuple[StringMatcher, ...] | None = None
    ports: frozenset[int] | None = None
    not_ports: frozenset[int] | None = None
    methods: tuple[StringMatcher, ...] | None = None
    not_methods: tuple[StringMatcher, ...] | None = None
    paths: tuple[Matcher, ...] | None = None
    not_paths: tuple[Matcher, ...] | None = None

    @property
    def http_only(self) -> bool:
        return any(v is not None for v in (self.hosts, self.not_hosts, self.methods, self.not_methods, self.paths,
                                            self.not_paths))


@dataclass(frozen=True, slots=True)
class ConditionMatch:
    """`when[]`: `key` is an Istio condition key; `header` the lowercase name for request.headers[...].
    Values are StringMatchers, networks (ip keys) or ints (destination.port) by key."""

    key: str
    values: tuple = ()
    not_values: tuple = ()
    header: str = ""

    @property
    def http_only(self) -> bool:
        return bool(self.header)


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """One rule: any of `sources` (None: any), any of `operations` (None: any), all `conditions`."""

    sources: tuple[SourceMatch, ...] | None
    operations: tuple[OperationMatch, ...] | None
    conditions: tuple[ConditionMatch, ...]
    # the rule names an HTTP-only field somewhere: on TCP an ALLOW rule like this never matches and
    # a DENY/AUDIT rule ignores those fields (Istio's TCP authorization)
    http_only: bool = False


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    namespace: str
    name: str
    action: str  # ALLOW | DENY | AUDIT
    rules: tuple[RuleMatch, ...]

    def label(self, rule_index: int) -> str:
        """Envoy's policy name as Istio builds it: ns[<ns>]-policy[<name>]-rule[<i>]."""
        return f"ns[{self.namespace}]-policy[{self.name}]-rule[{rule_index}]"


@dataclass(frozen=True, slots=True)
class WorkloadAuthorization:
    """The policies that apply to this proxy's workload, by action (config order within each)."""

    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()
