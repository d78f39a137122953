"""Cross-resource findings over loaded resources, as `istioctl analyze` reports them: every one, not the
first.

Each check reads the resources only (no compiler state), so one broken reference does not hide the
next. Names resolve as the compiler resolves them: a destination or DestinationRule host is the
literal ServiceEntry host or, with Istio's short-name rule, the same FQDN; gateway names are
"namespace/name" with the referrer's namespace by default. What the compiler would still refuse
beyond these checks is reported by the caller (`NotAcceptedByCompiler`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from proxy.config import findings as codes
from proxy.config import hosts
from proxy.config.findings import Finding, Origin
from proxy.config.istio import Destination, VirtualServiceSpec
from proxy.config.load import Resource

MESH = "mesh"


def finding(code: codes.Code, r: Resource, field_path: str, message: str) -> Finding:
    return Finding(code, message, Origin(r.kind, r.namespace, r.name, r.file, r.document), field_path)


def _not_found(r: Resource, field_path: str, what: str, value: str) -> Finding:
    # Istio's wording, "Referenced host not found: \"ratings\"", value quoted as Go's %q does
    return finding(codes.REFERENCED_RESOURCE_NOT_FOUND, r, field_path, f'Referenced {what} not found: "{value}"')


def _gateway_ref(name: str, namespace: str) -> str:
    return name if name == MESH or "/" in name else f"{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class _Service:
    host: str
    fqdn: str
    resource: Resource


class _Index:
    """Services, subsets and gateways by the names references use."""

    def __init__(self, by_kind: dict[str, list[Resource]], unknown: frozenset[str]) -> None:
        self.unknown = unknown
        self.services: list[_Service] = [
            _Service(h, hosts.fqdn(h, r.namespace), r) for r in by_kind["ServiceEntry"] for h in r.obj.spec.hosts
        ]
        self.gateways = {f"{r.namespace}/{r.name}": r for r in by_kind["Gateway"]}
        self.rules = by_kind["DestinationRule"]

    def lookup(self, host: str, namespace: str) -> _Service | None:
        full = hosts.fqdn(host, namespace)
        return next((s for s in self.services if s.fqdn == full), None) or next(
            (s for s in self.services if s.host == host), None
        )

    def subsets(self, svc: _Service) -> set[str]:
        """Subset names of the rules for a service: its exact-host rules, else the longest wildcard."""
        exact = [r for r in self.rules if self.lookup(r.obj.spec.host, r.namespace) is svc]
        if not exact:
            wildcard = sorted((r for r in self.rules if hosts.is_wildcard(r.obj.spec.host)
                               and hosts.matches(r.obj.spec.host, svc.host)), key=lambda r: -len(r.obj.spec.host))
            exact = wildcard[:1]
        return {s.name for r in exact for s in r.obj.spec.subsets}


def _destinations(spec: VirtualServiceSpec) -> Iterator[tuple[str, Destination]]:
    for i, http in enumerate(spec.http):
        for j, rd in enumerate(http.route):
            yield f"$.spec.http[{i}].route[{j}].destination", rd.destination
        if http.mirror is not None:
            yield f"$.spec.http[{i}].mirror", http.mirror
        for j, m in enumerate(http.mirrors):
            yield f"$.spec.http[{i}].mirrors[{j}].destination", m.destination
    for kind, items in (("tls", spec.tls), ("tcp", spec.tcp)):
        for i, item in enumerate(items):
            for j, rd in enumerate(item.route):
                yield f"$.spec.{kind}[{i}].route[{j}].destination", rd.destination


def _gateway_names(spec: VirtualServiceSpec) -> Iterator[tuple[str, str]]:
    for i, g in enumerate(spec.gateways):
        yield f"$.spec.gateways[{i}]", g
    for kind, items in (("http", spec.http), ("tls", spec.tls), ("tcp", spec.tcp)):
        for i, item in enumerate(items):
            for k, m in enumerate(item.match):
                for j, g in enumerate(m.gateways):
                    yield f"$.spec.{kind}[{i}].match[{k}].gateways[{j}]", g


def _check_destination(index: _Index, r: Resource, path: str, dest: Destination) -> Iterator[Finding]:
    svc = index.lookup(dest.host, r.namespace)
    if svc is None:
        if "ServiceEntry" not in index.unknown:
            yield _not_found(r, f"{path}.host", "host", dest.host)
        return
    ports = [p.number for p in svc.resource.obj.spec.ports]
    if dest.port is not None and dest.port.number not in ports:
        yield _not_found(r, f"{path}.port.number", "host:port", f"{dest.host}:{dest.port.number}")
    elif dest.port is None and len(ports) > 1:
        yield finding(codes.VIRTUAL_SERVICE_DESTINATION_PORT_SELECTOR_REQUIRED, r, f"{path}.port",
                      f'This VirtualService routes to a service "{dest.host}" that exposes multiple ports '
                      f"{ports}. Specifying a port in the destination is required to disambiguate.")
    if dest.subset and "DestinationRule" not in index.unknown and dest.subset not in index.subsets(svc):
        yield _not_found(r, f"{path}.subset", "host+subset in destinationrule", f"{dest.host}+{dest.subset}")


def _virtual_service_references(index: _Index, r: Resource) -> Iterator[Finding]:
    spec: VirtualServiceSpec = r.obj.spec
    for path, name in _gateway_names(spec):
        ref = _gateway_ref(name, r.namespace)
        if ref != MESH and ref not in index.gateways and "Gateway" not in index.unknown:
            yield _not_found(r, path, "gateway", ref)
    for path, dest in _destinations(spec):
        yield from _check_destination(index, r, path, dest)
    for i, name in enumerate(spec.gateways):
        gateway = index.gateways.get(_gateway_ref(name, r.namespace))
        if gateway is None:
            continue
        accepted = []
        for server in gateway.obj.spec.servers:
            for scoped in server.hosts:
                ns, host = hosts.split_scoped(scoped, gateway.namespace)
                if ns in ("*", r.namespace):
                    accepted.append(host)
        missing = [h for h in spec.hosts if not any(hosts.intersect(h, g) for g in accepted)]
        if missing:
            yield finding(codes.VIRTUAL_SERVICE_HOST_NOT_FOUND_IN_GATEWAY, r, f"$.spec.gateways[{i}]",
                          f"one or more host {missing} defined in VirtualService {r.namespace}/{r.name} "
                          f"not found in Gateway {gateway.namespace}/{gateway.name}.")


def _mesh_host_conflicts(virtual_services: list[Resource]) -> Iterator[Finding]:
    by_host: dict[str, list[tuple[Resource, int]]] = defaultdict(list)
    for r in virtual_services:
        spec: VirtualServiceSpec = r.obj.spec
        if spec.gateways and MESH not in spec.gateways:
            continue
        for i, h in enumerate(spec.hosts):
            by_host[hosts.fqdn(h, r.namespace)].append((r, i))
    for host, claims in by_host.items():
        if len({r.key for r, _ in claims}) < 2:
            continue
        names = ",".join(f"{r.namespace}/{r.name}" for r, _ in claims)
        for r, i in claims:
            yield finding(codes.CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS, r, f"$.spec.hosts[{i}]",
                          f"The VirtualServices {names} associated with mesh gateway define the same host {host} "
                          "which can lead to undefined behavior. This can be fixed by merging the conflicting "
                          "VirtualServices into a single resource.")


def _gateway_conflicts(gateways: list[Resource]) -> Iterator[Finding]:
    """Istio's rule: same selector, same port number, a host one server accepts that the other does."""
    seen: list[tuple[Resource, int, str]] = []  # gateway, port, host
    for r in gateways:
        selector = dict(r.obj.spec.selector)
        for s, server in enumerate(r.obj.spec.servers):
            hosts_here = [hosts.split_scoped(h, r.namespace)[1] for h in server.hosts]
            clashes = sorted({
                f"{other.namespace}/{other.name}"
                for other, port, host in seen
                if other is not r and port == server.port.number and dict(other.obj.spec.selector) == selector
                and any(hosts.intersect(host, h) for h in hosts_here)
            })
            if clashes:
                labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(none)"
                yield finding(codes.CONFLICTING_GATEWAYS, r, f"$.spec.servers[{s}]",
                              f"Conflict with gateways {','.join(clashes)} (workload selector {labels}, "
                              f"port {server.port.number}, hosts {hosts_here}).")
            seen.extend((r, server.port.number, h) for h in hosts_here)


def _selectorless_sidecars(sidecars: list[Resource]) -> Iterator[Finding]:
    by_namespace: dict[str, list[Resource]] = defaultdict(list)
    for r in sidecars:
        if r.obj.spec.workload_selector is None:
            by_namespace[r.namespace].append(r)
    for namespace, group in by_namespace.items():
        if len(group) > 1:
            names = "[" + " ".join(r.name for r in group) + "]"
            for r in group:
                yield finding(codes.MULTIPLE_SIDECARS_WITHOUT_WORKLOAD_SELECTORS, r, "$.spec",
                              f'The Sidecars {names} in namespace "{namespace}" have no workload selector, '
                              "which can lead to undefined behavior.")


def _destination_rule_hosts(index: _Index, rules: list[Resource]) -> Iterator[Finding]:
    first_subset: dict[tuple[str, str], Resource] = {}  # (service fqdn, subset) -> first rule defining it
    for r in rules:
        host = r.obj.spec.host
        if hosts.is_wildcard(host):
            continue
        svc = index.lookup(host, r.namespace)
        if svc is None:
            if "ServiceEntry" not in index.unknown:
                yield _not_found(r, "$.spec.host", "host", host)
            continue
        for i, subset in enumerate(r.obj.spec.subsets):
            first = first_subset.setdefault((svc.fqdn, subset.name), r)
            if first is not r:
                yield finding(codes.DUPLICATE_SUBSET, r, f"$.spec.subsets[{i}].name",
                              f'Subset "{subset.name}" of host {svc.fqdn} is already defined by DestinationRule '
                              f"{first.namespace}/{first.name} ({first.file} document {first.document})")


def analyze(resources: Sequence[Resource], undecoded_kinds: Iterable[str] = ()) -> list[Finding]:
    """Every cross-resource finding, resource by resource in load order, then conflicts.

    `undecoded_kinds` are the kinds of documents that failed to decode (with their own finding):
    references to those kinds are not checked, as the missing resource may be that document."""
    by_kind: dict[str, list[Resource]] = defaultdict(list)
    for r in resources:
        by_kind[r.kind].append(r)
    index = _Index(by_kind, frozenset(undecoded_kinds))
    out: list[Finding] = []
    for r in by_kind["VirtualService"]:
        out.extend(_virtual_service_references(index, r))
    out.extend(_destination_rule_hosts(index, by_kind["DestinationRule"]))
    out.extend(_mesh_host_conflicts(by_kind["VirtualService"]))
    out.extend(_gateway_conflicts(by_kind["Gateway"]))
    out.extend(_selectorless_sidecars(by_kind["Sidecar"]))
    return out
