"""The service registry a config describes: ServiceEntry hosts with their endpoints (inline or
WorkloadEntries picked by workloadSelector), DestinationRule subsets and policies, and the clusters
(`outbound|port|subset|host`) they compile to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from proxy.config import hosts, locality, policies
from proxy.config.istio import DestinationRuleSpec, Port, ServiceEntrySpec, TrafficPolicy, WorkloadEntrySpec
from proxy.config.load import Resource
from proxy.config.snapshot import Cluster, Endpoint, cluster_name

class FrozenLabels(dict):
    """Read-only, hashable labels, so an Endpoint (a frozen dataclass) can key a dict or set."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("endpoint labels are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Instance:
    """A workload behind a service, before its port is chosen."""

    address: str
    ports: dict[str, int]
    labels: FrozenLabels
    weight: int
    locality: str = ""


@dataclass(slots=True)
class Service:
    host: str  # as written in the ServiceEntry
    namespace: str
    resource: Resource
    host_path: str  # "$.spec.hosts[i]"
    spec: ServiceEntrySpec
    instances: list[Instance] = field(default_factory=list)
    rule: tuple[Resource, DestinationRuleSpec] | None = None

    @property
    def ports(self) -> tuple[Port, ...]:
        return self.spec.ports

    def port(self, number: int) -> Port | None:
        for p in self.spec.ports:
            if p.number == number:
                return p
        return None

    def subset_names(self) -> list[str]:
        return [s.name for s in self.rule[1].subsets] if self.rule else []


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _check_address(r: Resource, path: str, address: str, *, need_ip: bool) -> None:
    if not address:
        raise r.error(path, "an endpoint address is required")
    if address.startswith("unix://"):
        raise r.error(path, "Unix domain socket endpoints are not supported by triomesh yet")
    if need_ip and not _is_ip(address):
        raise r.error(path, f"{address!r} is not an IP address (resolution STATIC needs IP endpoints)")


class Registry:
    """Services by host. Lookups follow Istio: the literal host, then its short-name FQDN."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self._alias: dict[str, str] = {}

    def lookup(self, host: str, namespace: str) -> Service | None:
        s = self.services.get(host)
        if s is not None:
            return s
        full = hosts.fqdn(host, namespace)
        key = self._alias.get(full, full)
        return self.services.get(key)

    def _add(self, svc: Service) -> None:
        other = self.lookup(svc.host, svc.namespace)
        if other is not None:
            raise svc.resource.error(
                svc.host_path,
                f"host {svc.host!r} is already declared by ServiceEntry {other.namespace}/{other.resource.name} "
                f"({other.resource.file} document {other.resource.document})",
            )
        self.services[svc.host] = svc
        full = hosts.fqdn(svc.host, svc.namespace)
        if full != svc.host:
            self._alias[full] = svc.host


def _check_service_entry(r: Resource, spec: ServiceEntrySpec) -> None:
    if not spec.hosts:
        raise r.error("$.spec.hosts", "a ServiceEntry needs at least one host")
    for i, h in enumerate(spec.hosts):
        if not h or "/" in h or (h.startswith("*") and not (h == "*" or h.startswith("*."))):
            raise r.error(f"$.spec.hosts[{i}]", f"invalid host {h!r}")
        if h.startswith("*") and spec.resolution in ("DNS", "DNS_ROUND_ROBIN") and not spec.endpoints:
            raise r.error(f"$.spec.hosts[{i}]", f"wildcard host {h!r} cannot be resolved by DNS")
    if not spec.ports:
        raise r.error("$.spec.ports", "a ServiceEntry needs at least one port")
    names: set[str] = set()
    numbers: set[int] = set()
    for i, p in enumerate(spec.ports):
        if not p.name:
            raise r.error(f"$.spec.ports[{i}].name", "a ServiceEntry port needs a name")
        if p.name in names:
            raise r.error(f"$.spec.ports[{i}].name", f"duplicate port name {p.name!r}")
        if p.number in numbers:
            raise r.error(f"$.spec.ports[{i}].number", f"duplicate port number {p.number}")
        names.add(p.name)
        numbers.add(p.number)
    for i, a in enumerate(spec.addresses):
        try:
            ipaddress.ip_network(a, strict=False)
        except ValueError:
            raise r.error(f"$.spec.addresses[{i}]", f"{a!r} is not an IP address or CIDR block") from None
    if spec.endpoints and spec.workload_selector is not None:
        raise r.error("$.spec.workloadSelector", "only one of `endpoints` and `workloadSelector` may be set")
    if spec.resolution == "NONE" and spec.endpoints:
        raise r.error("$.spec.endpoints", "resolution NONE takes no endpoints")
    for i, ep in enumerate(spec.endpoints):
        _check_address(r, f"$.spec.endpoints[{i}].address", ep.address, need_ip=spec.resolution == "STATIC")
        for name in ep.ports:
            if name not in names:
                raise r.error(f"$.spec.endpoints[{i}].ports.{name}", f"no port named {name!r} in $.spec.ports")


def _instance(ep: WorkloadEntrySpec) -> Instance:
    return Instance(ep.address, dict(ep.ports), FrozenLabels(ep.labels), ep.weight or 1, ep.locality)


def build_registry(
    service_entries: Iterable[Resource], workload_entries: Iterable[Resource], destination_rules: Iterable[Resource]
) -> Registry:
    reg = Registry()
    workloads = list(workload_entries)
    for r in service_entries:
        spec: ServiceEntrySpec = r.obj.spec
        _check_service_entry(r, spec)
        instances: list[Instance] = [_instance(ep) for ep in spec.endpoints]
        if spec.workload_selector is not None:
            want = spec.workload_selector.labels
            for w in workloads:
                we: WorkloadEntrySpec = w.obj.spec
                if w.namespace == r.namespace and all(we.labels.get(k) == v for k, v in want.items()):
                    _check_address(w, "$.spec.address", we.address, need_ip=spec.resolution == "STATIC")
                    instances.append(_instance(we))
        for i, h in enumerate(spec.hosts):
            svc_instances = instances
            if not instances and spec.resolution in ("DNS", "DNS_ROUND_ROBIN"):
                svc_instances = [Instance(h, {}, FrozenLabels(), 1)]  # no endpoints: the host name itself is resolved
            reg._add(Service(h, r.namespace, r, f"$.spec.hosts[{i}]", spec, list(svc_instances)))
    for w in workloads:
        we = w.obj.spec
        if not we.address:
            raise w.error("$.spec.address", "a WorkloadEntry needs an address")
    exact: list[tuple[Resource, DestinationRuleSpec]] = []
    wildcard: list[tuple[Resource, DestinationRuleSpec]] = []
    for r in destination_rules:
        spec = r.obj.spec
        names: set[str] = set()
        for i, s in enumerate(spec.subsets):
            if s.name in names:
                raise r.error(f"$.spec.subsets[{i}].name", f"duplicate subset name {s.name!r}")
            names.add(s.name)
        (wildcard if hosts.is_wildcard(spec.host) else exact).append((r, spec))
    for r, spec in exact:
        svc = reg.lookup(spec.host, r.namespace)
        if svc is None:
            raise r.error("$.spec.host", f"host {spec.host!r} matches no ServiceEntry host")
        if svc.rule is not None:
            first = svc.rule[0]
            raise r.error(
                "$.spec.host",
                f"host {spec.host!r} already has DestinationRule {first.namespace}/{first.name} "
                f"({first.file} document {first.document})",
            )
        svc.rule = (r, spec)
    # a wildcard rule applies to the services no exact rule names, longest pattern first
    for r, spec in sorted(wildcard, key=lambda rs: -len(rs[1].host)):
        for svc in reg.services.values():
            if svc.rule is None and hosts.matches(spec.host, svc.host):
                svc.rule = (r, spec)
    return reg


def _endpoints(svc: Service, port: Port, labels: dict[str, str] | None) -> tuple[Endpoint, ...]:
    out = []
    for inst in svc.instances:
        if labels and any(inst.labels.get(k) != v for k, v in labels.items()):
            continue
        number = inst.ports.get(port.name) or port.target_port or port.number
        out.append(Endpoint(inst.address, number, inst.labels, inst.weight, inst.locality))
    return tuple(out)


def _resolution(spec: ServiceEntrySpec) -> str:
    return spec.resolution


def service_addresses(reg: Registry) -> dict[tuple[str, int], str]:
    """(VIP, port) -> host for ServiceEntry `addresses` (single IPs; CIDR blocks are not keys), and
    ("*", port) -> host for services without addresses, the first such service per port winning."""
    table: dict[tuple[str, int], str] = {}
    for svc in reg.services.values():
        ips = []
        for a in svc.spec.addresses:
            net = ipaddress.ip_network(a, strict=False)
            if net.num_addresses == 1:
                ips.append(str(net.network_address))
        for port in svc.ports:
            for ip in ips or ["*"]:
                table.setdefault((ip, port.number), svc.host)
    return table


def _policy_fields(tp: TrafficPolicy | None, port: Port) -> dict:
    """Cluster fields from the cluster's effective traffic policy and its service port."""
    lb_policy, consistent = policies.lb_settings(tp)
    pool, connect = policies.pool_with_budget(tp)
    fields = {
        "lb_policy": lb_policy,
        "consistent_hash": consistent,
        "connection_pool": pool,
        "outlier": policies.outlier_policy(tp.outlier_detection if tp else None),
        "http2": policies.upstream_http2(str(port.protocol), tp),
    }
    if connect is not None:
        fields["connect_timeout_s"] = connect
    return fields


def _locality_lb(tp: TrafficPolicy | None, endpoints: tuple[Endpoint, ...], proxy_locality: str):
    setting = tp.load_balancer.locality_lb_setting if tp is not None and tp.load_balancer is not None else None
    has_outlier_detection = tp is not None and tp.outlier_detection is not None
    return locality.locality_lb(setting, has_outlier_detection, proxy_locality, endpoints)


def build_clusters(reg: Registry, proxy_locality: str = "") -> dict[str, Cluster]:
    """Every cluster of the registry; `proxy_locality` ("region/zone/subzone" of this proxy) decides
    what localityLbSetting does to each."""
    clusters: dict[str, Cluster] = {}
    for svc in reg.services.values():
        rule_spec = svc.rule[1] if svc.rule else None
        base_tp = rule_spec.traffic_policy if rule_spec else None
        for port in svc.ports:
            tp = policies.cluster_traffic_policy(base_tp, None, port.number)
            name = cluster_name(svc.host, port.number)
            endpoints = _endpoints(svc, port, None)
            clusters[name] = Cluster(
                name=name,
                service_host=svc.host,
                port=port.number,
                subset="",
                endpoints=endpoints,
                resolution=_resolution(svc.spec),
                protocol=str(port.protocol),
                locality_lb=_locality_lb(tp, endpoints, proxy_locality),
                **_policy_fields(tp, port),
            )
            if rule_spec is None:
                continue
            for subset in rule_spec.subsets:
                name = cluster_name(svc.host, port.number, subset.name)
                tp = policies.cluster_traffic_policy(base_tp, subset.traffic_policy, port.number)
                endpoints = _endpoints(svc, port, subset.labels)
                clusters[name] = Cluster(
                    name=name,
                    service_host=svc.host,
                    port=port.number,
                    subset=subset.name,
                    endpoints=endpoints,
                    resolution=_resolution(svc.spec),
                    protocol=str(port.protocol),
                    locality_lb=_locality_lb(tp, endpoints, proxy_locality),
                    **_policy_fields(tp, port),
                )
    return clusters
