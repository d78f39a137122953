"""The service registry a config describes: ServiceEntry hosts with their endpoints (inline or
WorkloadEntries picked by workloadSelector), DestinationRule subsets and policies, and the clusters
(`outbound|port|subset|host`) they compile to.

Names per namespace, as Istio resolves them. A short ServiceEntry host ("customer") names a service
of its own namespace (customer.<ns>.svc.cluster.local), so two namespaces may both declare it; a name
written in a resource is looked up in that resource's namespace first, then among the services that
declare it literally and are exported to that namespace (first in config order). A short host declared
in several namespaces names its clusters by its FQDN, so the clusters stay distinct in one snapshot.

DestinationRules, as Istio merges them (rules for one host in one namespace with the same exportTo
merge into one: subsets from all, a subset name defined twice keeps the first definition, the
top-level trafficPolicy of the first rule that sets one; "first" is config order, the file and
document order Istio's creation-time order stands for). Which namespace's rule applies to a service
follows Istio's lookup: the client's namespace, then the service's namespace (rules exported to the
client), then the root namespace (rules exported to the client); rules of other namespaces never
apply. Without a client namespace (a proxy whose namespace is not known), the service's namespace,
the root namespace, then the first other namespace with a rule for the host."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from proxy.config import hosts, locality, policies, upstream_tls
from proxy.config.istio import DestinationRuleSpec, Port, ServiceEntrySpec, Subset, TrafficPolicy, WorkloadEntrySpec
from proxy.config.load import Resource
from proxy.config.snapshot import Cluster, Endpoint, UpstreamTls, cluster_name

ROOT_NAMESPACE = "istio-system"  # Istio's default meshConfig.rootNamespace


class FrozenLabels(dict):
    """Read-only, hashable labels, so an Endpoint (a frozen dataclass) can key a dict or set."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("endpoint labels are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __reduce__(self):  # rebuilt from its items (pickle's default would call the refused __setitem__)
        return (FrozenLabels, (dict(self),))


@dataclass(frozen=True, slots=True)
class Instance:
    """A workload behind a service, before its port is chosen."""

    address: str
    ports: dict[str, int]
    labels: FrozenLabels
    weight: int
    locality: str = ""
    service_account: str = ""  # its `serviceAccount`: the identity its sidecar's certificate proves


@dataclass(frozen=True, slots=True)
class MergedRule:
    """The DestinationRules of one namespace for one host (same exportTo), merged as Istio merges them."""

    namespace: str
    host: str  # as written in the first rule
    export_to: tuple[str, ...]
    sources: tuple[Resource, ...]  # in config order
    traffic_policy: TrafficPolicy | None
    subsets: tuple[Subset, ...]

    def visible_to(self, client_namespace: str | None) -> bool:
        return client_namespace is None or hosts.exported_to(self.export_to, self.namespace, client_namespace)

    @property
    def label(self) -> str:
        return ", ".join(f"DestinationRule {r.namespace}/{r.name}" for r in self.sources)


@dataclass(slots=True)
class Service:
    host: str  # as written in the ServiceEntry
    namespace: str
    resource: Resource
    host_path: str  # "$.spec.hosts[i]"
    spec: ServiceEntrySpec
    instances: list[Instance] = field(default_factory=list)
    rule: MergedRule | None = None
    cluster_host: str = ""  # the host its clusters are named by: the host, or its FQDN when ambiguous

    @property
    def key(self) -> str:
        """Its identity in the registry: the FQDN of a short host, else the host as written."""
        return hosts.fqdn(self.host, self.namespace)

    @property
    def ports(self) -> tuple[Port, ...]:
        return self.spec.ports

    def port(self, number: int) -> Port | None:
        for p in self.spec.ports:
            if p.number == number:
                return p
        return None

    def subset_names(self) -> list[str]:
        return [s.name for s in self.rule.subsets] if self.rule else []


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
    """Services by key (Service.key), with the services declaring each literal host, in config order."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self._literal: dict[str, list[Service]] = {}

    def lookup(self, host: str, namespace: str) -> Service | None:
        """The service `host`, written in a resource of `namespace`, names: the host qualified by that
        namespace first, then the first service declaring it literally and exported to the namespace."""
        svc = self.services.get(hosts.fqdn(host, namespace))
        if svc is not None:
            return svc
        for svc in self._literal.get(host, ()):
            if hosts.exported_to(svc.spec.export_to, svc.namespace, namespace):
                return svc
        return None

    def first_declaring(self, host: str) -> Service | None:
        """The first service declaring `host` literally, visible or not (for a precise error)."""
        return next(iter(self._literal.get(host, ())), None)

    def _add(self, svc: Service) -> None:
        other = self.services.get(svc.key)
        if other is not None:
            raise svc.resource.error(
                svc.host_path,
                f"host {svc.host!r} is already declared by ServiceEntry {other.namespace}/{other.resource.name} "
                f"({other.resource.file} document {other.resource.document})",
            )
        self.services[svc.key] = svc
        self._literal.setdefault(svc.host, []).append(svc)

    def _name_clusters(self) -> None:
        for same in self._literal.values():
            for svc in same:
                svc.cluster_host = svc.host if len(same) == 1 else svc.key


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
    return Instance(ep.address, dict(ep.ports), FrozenLabels(ep.labels), ep.weight or 1, ep.locality,
                    ep.service_account)


def build_registry(
    service_entries: Iterable[Resource],
    workload_entries: Iterable[Resource],
    destination_rules: Iterable[Resource],
    client_namespace: str | None = None,
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
    reg._name_clusters()
    _bind_rules(reg, list(destination_rules), client_namespace)
    return reg


def merge_rules(rules: list[Resource]) -> list[MergedRule]:
    """Istio's merge of the DestinationRules of one namespace for one host, in config order: rules with
    the same exportTo merge (a rule with another exportTo stays separate); subsets from all, the first
    definition of a subset name wins; the first top-level trafficPolicy wins."""
    groups: dict[frozenset[str], list[Resource]] = {}
    for r in rules:
        groups.setdefault(frozenset(r.obj.spec.export_to or ("*",)), []).append(r)
    out = []
    for group in groups.values():
        subsets: dict[str, Subset] = {}
        policy = None
        for r in group:
            spec: DestinationRuleSpec = r.obj.spec
            for s in spec.subsets:
                subsets.setdefault(s.name, s)
            if policy is None:
                policy = spec.traffic_policy
        first = group[0]
        out.append(MergedRule(first.namespace, first.obj.spec.host, first.obj.spec.export_to, tuple(group), policy,
                              tuple(subsets.values())))
    return out


def _check_rule(r: Resource) -> None:
    names: set[str] = set()
    for i, s in enumerate(r.obj.spec.subsets):
        if s.name in names:
            raise r.error(f"$.spec.subsets[{i}].name", f"duplicate subset name {s.name!r}")
        names.add(s.name)


def _bind_rules(reg: Registry, rules: list[Resource], client_namespace: str | None) -> None:
    """Give each service the merged rule Istio would pick for a client of `client_namespace`."""
    # namespace -> exact rules per service key, and wildcard rules per pattern (config order)
    exact: dict[str, dict[str, list[Resource]]] = {}
    wildcard: dict[str, dict[str, list[Resource]]] = {}
    for r in rules:
        _check_rule(r)
        host = r.obj.spec.host
        if hosts.is_wildcard(host):
            wildcard.setdefault(r.namespace, {}).setdefault(host, []).append(r)
            continue
        svc = reg.lookup(host, r.namespace)
        if svc is None:
            if reg.first_declaring(host) is not None:
                continue  # a rule for a service its namespace cannot see applies nowhere (as in Istio)
            raise r.error("$.spec.host", f"host {host!r} matches no ServiceEntry host")
        exact.setdefault(r.namespace, {}).setdefault(svc.key, []).append(r)
    order = list(dict.fromkeys([r.namespace for r in rules]))
    for svc in reg.services.values():
        if client_namespace is None:
            namespaces = [svc.namespace, ROOT_NAMESPACE, *order]
        else:
            namespaces = [client_namespace, svc.namespace, ROOT_NAMESPACE]
        for ns in dict.fromkeys(namespaces):
            found = exact.get(ns, {}).get(svc.key)
            if found is None:
                # Istio's most specific host match: the longest wildcard pattern covering the host
                patterns = sorted((p for p in wildcard.get(ns, {}) if hosts.matches(p, svc.key) or hosts.matches(p, svc.host)),
                                  key=len, reverse=True)
                found = wildcard[ns][patterns[0]] if patterns else None
            if found is None:
                continue
            # the client's own namespace sees all its rules; elsewhere, only rules exported to it
            client = None if ns == client_namespace else client_namespace
            visible = [m for m in merge_rules(found) if m.visible_to(client)]
            if visible:
                svc.rule = visible[0]
                break


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


def mesh_addresses(reg: Registry) -> frozenset[str]:
    """Addresses of the endpoints of MESH_INTERNAL services: the workloads that run sidecars."""
    return frozenset(inst.address for svc in reg.services.values() if svc.spec.location == "MESH_INTERNAL"
                     for inst in svc.instances)


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
                table.setdefault((ip, port.number), svc.cluster_host)
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


def _cluster_tls(svc: Service, port: Port, tp: TrafficPolicy | None, credentials_dir: str | None,
                 endpoints: tuple[Endpoint, ...], subset: str, namespace_mode: str) -> UpstreamTls | None:
    """The cluster's TLS from its effective policy's tls block (checked already where it is written);
    without one, auto mTLS: Istio mutual TLS to the endpoints that have a sidecar, when the service's
    namespace takes it (`namespace_mode`: its mesh- or namespace-wide PeerAuthentication mode)."""
    tls = tp.tls if tp is not None else None
    protocol = str(port.protocol)
    http = protocol in upstream_tls.HTTP_PROTOCOLS
    http2 = policies.upstream_http2(protocol, tp) if http else None  # None: a TCP port
    if tls is None:
        return upstream_tls.auto_mtls(svc.cluster_host, port.number, subset, endpoints, _service_accounts(svc),
                                      http2, _service_mtls_mode(svc, port, tp, namespace_mode))
    if tls.mode == "DISABLE" or svc.rule is None:
        return None
    r, path = next(((r, path) for r in svc.rule.sources for path, block in upstream_tls.tls_blocks(r.obj.spec)
                    if block is tls), (svc.rule.sources[0], "$.spec.trafficPolicy.tls"))
    if tls.mode == "ISTIO_MUTUAL":
        return upstream_tls.istio_mutual(r, tls, svc.cluster_host, port.number, subset, _service_accounts(svc), http2)
    # a TCP port offers no ALPN of its own (Envoy's tcp_proxy upstream TLS sets none unless configured)
    alpn = () if http2 is None else ("h2",) if http2 else ("http/1.1",)
    return upstream_tls.compile_settings(r, path, tls, svc.host, tuple(svc.spec.subject_alt_names), alpn,
                                         credentials_dir)


def _service_accounts(svc: Service) -> tuple[str, ...]:
    """The identities a server of `svc` may prove: its endpoints' accounts (all ports, all subsets, as
    Istio's ServiceAccounts) and its ServiceEntry's subjectAltNames."""
    return upstream_tls.service_accounts(svc.namespace, (inst.service_account for inst in svc.instances),
                                         svc.spec.subject_alt_names)


def _service_mtls_mode(svc: Service, port: Port, tp: TrafficPolicy | None, namespace_mode: str) -> str | None:
    """What auto mTLS may assume of the service's servers (upstream_tls.service_mtls_mode); a
    passthrough service is judged by all its endpoints on the port, whichever the subset."""
    lb = tp.load_balancer if tp is not None else None
    passthrough = svc.spec.resolution == "NONE" or (lb is not None and lb.simple == "PASSTHROUGH")
    return upstream_tls.service_mtls_mode(svc.spec.location == "MESH_EXTERNAL", passthrough,
                                          _endpoints(svc, port, None), namespace_mode)


def build_clusters(reg: Registry, proxy_locality: str = "", credentials_dir: str | None = None,
                   peer_authentications: Iterable[Resource] = ()) -> dict[str, Cluster]:
    """Every cluster of the registry; `proxy_locality` ("region/zone/subzone" of this proxy) decides
    what localityLbSetting does to each; `credentials_dir` is where tls credentialNames resolve;
    `peer_authentications` (all of the config) decide where auto mTLS applies."""
    clusters: dict[str, Cluster] = {}
    checked: set[int] = set()
    peer_authentications = list(peer_authentications)
    namespace_modes: dict[str, str] = {}
    for svc in reg.services.values():
        namespace_mode = namespace_modes.get(svc.namespace)
        if namespace_mode is None:
            namespace_mode = namespace_modes[svc.namespace] = upstream_tls.namespace_mtls_mode(
                peer_authentications, ROOT_NAMESPACE, svc.namespace)
        rule_spec = svc.rule
        base_tp = rule_spec.traffic_policy if rule_spec else None
        for r in rule_spec.sources if rule_spec else ():
            if id(r) not in checked:
                checked.add(id(r))
                upstream_tls.check_rule(r, credentials_dir)
        for port in svc.ports:
            tp = policies.cluster_traffic_policy(base_tp, None, port.number)
            name = cluster_name(svc.cluster_host, port.number)
            endpoints = _endpoints(svc, port, None)
            clusters[name] = Cluster(
                name=name,
                service_host=svc.cluster_host,
                port=port.number,
                subset="",
                endpoints=endpoints,
                resolution=_resolution(svc.spec),
                protocol=str(port.protocol),
                locality_lb=_locality_lb(tp, endpoints, proxy_locality),
                service_namespace=svc.namespace,
                mesh_internal=svc.spec.location == "MESH_INTERNAL",
                tls=_cluster_tls(svc, port, tp, credentials_dir, endpoints, "", namespace_mode),
                **_policy_fields(tp, port),
            )
            if rule_spec is None:
                continue
            for subset in rule_spec.subsets:
                name = cluster_name(svc.cluster_host, port.number, subset.name)
                tp = policies.cluster_traffic_policy(base_tp, subset.traffic_policy, port.number)
                endpoints = _endpoints(svc, port, subset.labels)
                clusters[name] = Cluster(
                    name=name,
                    service_host=svc.cluster_host,
                    port=port.number,
                    subset=subset.name,
                    endpoints=endpoints,
                    resolution=_resolution(svc.spec),
                    protocol=str(port.protocol),
                    locality_lb=_locality_lb(tp, endpoints, proxy_locality),
                    service_namespace=svc.namespace,
                    mesh_internal=svc.spec.location == "MESH_INTERNAL",
                    tls=_cluster_tls(svc, port, tp, credentials_dir, endpoints, subset.name, namespace_mode),
                    **_policy_fields(tp, port),
                )
    return clusters
