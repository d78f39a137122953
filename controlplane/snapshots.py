"""Per-proxy snapshots, pure: which resources a proxy needs, and a content-hash version of that set.

Theory of operation. The store's state is a mapping of resource key -> `StoredResource` (the typed
resource, its wire encoding and a digest of that encoding). A proxy is described by its `ProxyClass`
(namespace and labels): every proxy of a class needs the same resources, so views are computed once
per class per state, however many proxies share it.

The view follows Istio's Sidecar scoping. The one Sidecar that applies to a proxy is, in Istio's order,
the Sidecar in the proxy's namespace whose workloadSelector matches its labels, else the selector-less
Sidecar of its namespace, else the selector-less Sidecar of the root namespace. Only that Sidecar is
in the view (so the proxy's compile never sees another workload's listeners). If it has egress
listeners, their `hosts` ("ns/dnsName") narrow the mesh services and routes the proxy sees: visible
ServiceEntries and mesh VirtualServices, the DestinationRules and WorkloadEntries of those services,
and whatever an included VirtualService routes to (a route to a service the proxy cannot resolve would
be refused by its compile). Gateways whose selector matches the proxy, and the VirtualServices bound to
them, are always in the view. Without a Sidecar (or without egress hosts) the proxy sees every service.
Security policies as Istio scopes them: the AuthorizationPolicies of the root namespace and of the
proxy's namespace whose selector matches it, the root namespace's mesh-wide PeerAuthentication and the
proxy's namespace's PeerAuthentications whose selector (if any) matches it.

The version of a view is a hash over its sorted (key, digest) pairs: a change to any resource a proxy
sees changes its version, a change elsewhere does not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from controlplane.wire import ResourceKey, WireResource, encode_istio
from proxy.config import hosts
from proxy.config.load import Resource
from proxy.config.sidecars import select_sidecar as pick_sidecar

ROOT_NAMESPACE = "istio-system"  # Istio's default meshConfig.rootNamespace
MESH = "mesh"


@dataclass(frozen=True, slots=True)
class StoredResource:
    key: ResourceKey
    resource: Resource
    body: bytes  # the wire encoding (MessagePack of the YAML-equivalent mapping)
    digest: str
    wire: WireResource = field(compare=False)

    @classmethod
    def of(cls, resource: Resource) -> "StoredResource":
        import msgspec

        body = encode_istio(resource.obj)
        key = ResourceKey(resource.kind, resource.namespace, resource.name)
        digest = hashlib.blake2b(body, digest_size=12).hexdigest()
        wire = WireResource(body=msgspec.Raw(body), file=resource.file, document=resource.document)
        return cls(key, resource, body, digest, wire)


State = Mapping[ResourceKey, StoredResource]


@dataclass(frozen=True, slots=True)
class ProxyClass:
    namespace: str
    labels: frozenset[tuple[str, str]] = frozenset()
    # computed once: a change looks up every connected proxy's class a few times
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.namespace, self.labels)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # a string's hash differs between processes: recompute it on unpickling
        return (ProxyClass, (self.namespace, self.labels))

    @classmethod
    def of(cls, namespace: str, labels: Mapping[str, str]) -> "ProxyClass":
        return cls(namespace, frozenset(labels.items()))

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def selects(self, selector: Mapping[str, str] | None) -> bool:
        if not selector:
            return True
        labels = self.label_dict
        return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class View:
    """What one class of proxy receives: resources sorted by key, and their version. Shared by every
    proxy of the class (and kept as the proxy's last ACKed set), so it is built once."""

    resources: tuple[StoredResource, ...]
    version: str
    index: dict[ResourceKey, StoredResource] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.index:
            object.__setattr__(self, "index", {s.key: s for s in self.resources})

    def by_key(self) -> dict[ResourceKey, StoredResource]:
        return self.index


def view_version(resources: Iterable[StoredResource]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for s in resources:
        h.update(f"{s.key.kind}\0{s.key.namespace}\0{s.key.name}\0{s.digest}\n".encode())
    return h.hexdigest()


def _of_kind(state: State, kind: str) -> list[StoredResource]:
    return [s for k, s in state.items() if k.kind == kind]


def select_sidecar(state: State, pc: ProxyClass) -> StoredResource | None:
    stored = {id(s.resource): s for s in _of_kind(state, "Sidecar")}
    chosen = pick_sidecar((s.resource for s in stored.values()), pc.namespace, pc.selects)
    return stored[id(chosen)] if chosen is not None else None


def _egress_scopes(sidecar: StoredResource) -> list[tuple[str, str]] | None:
    """("ns" or "*", dns pattern) pairs from the egress hosts; None when the Sidecar does not narrow."""
    spec = sidecar.resource.obj.spec
    scopes: list[tuple[str, str]] = []
    for eg in spec.egress:
        for h in eg.hosts:
            ns, sep, dns = h.partition("/")
            if not sep or ns == "~":
                continue  # "~/..." selects nothing; a malformed host is the compiler's error to report
            scopes.append((sidecar.key.namespace if ns == "." else ns, dns))
    return scopes if spec.egress else None


def _visible(scopes: list[tuple[str, str]], owner_ns: str, host: str) -> bool:
    full = hosts.fqdn(host, owner_ns)
    for ns, dns in scopes:
        if ns != "*" and ns != owner_ns:
            continue
        if hosts.matches(dns, host) or hosts.matches(dns, full):
            return True
    return False


def _gateway_ref(name: str, namespace: str) -> str:
    if name == MESH:
        return MESH
    return name if "/" in name else f"{namespace}/{name}"


def _vs_gateways(vs: StoredResource) -> set[str]:
    spec = vs.resource.obj.spec
    refs = {_gateway_ref(g, vs.key.namespace) for g in spec.gateways} or {MESH}
    for http in spec.http:
        for m in http.match:
            refs.update(_gateway_ref(g, vs.key.namespace) for g in m.gateways)
    return refs


def _service_hosts(se: StoredResource) -> list[str]:
    return [hosts.fqdn(h, se.key.namespace) for h in se.resource.obj.spec.hosts]


def _refers(host: str, namespace: str, se: StoredResource) -> bool:
    """Does a destination/DestinationRule host written in `namespace` name a host of this ServiceEntry?"""
    if host in se.resource.obj.spec.hosts:
        return True
    full = hosts.fqdn(host, namespace)
    return any(full == h or (hosts.is_wildcard(host) and hosts.matches(full, h)) for h in _service_hosts(se))


def compute_view(state: State, pc: ProxyClass) -> View:
    sidecar = select_sidecar(state, pc)
    gateways = _of_kind(state, "Gateway")
    own_gateways = {f"{g.key.namespace}/{g.key.name}" for g in gateways if pc.selects(g.resource.obj.spec.selector)}
    scopes = _egress_scopes(sidecar) if sidecar is not None else None
    virtual_services = _of_kind(state, "VirtualService")
    service_entries = _of_kind(state, "ServiceEntry")

    if scopes is None:
        chosen_vs = virtual_services
        chosen_se = service_entries
    else:
        chosen_vs = []
        for vs in virtual_services:
            refs = _vs_gateways(vs)
            if refs & own_gateways or (MESH in refs and any(_visible(scopes, vs.key.namespace, h) for h in vs.resource.obj.spec.hosts)):
                chosen_vs.append(vs)
        chosen_se = [
            se for se in service_entries if any(_visible(scopes, se.key.namespace, h) for h in se.resource.obj.spec.hosts)
        ]
        # whatever an included route sends traffic to must resolve in the proxy's compile
        chosen_keys = {se.key for se in chosen_se}
        for vs in chosen_vs:
            for http in vs.resource.obj.spec.http:
                for rd in http.route:
                    for se in service_entries:
                        if se.key not in chosen_keys and _refers(rd.destination.host, vs.key.namespace, se):
                            chosen_se.append(se)
                            chosen_keys.add(se.key)
    out: list[StoredResource] = list(chosen_vs) + list(chosen_se)
    # Gateways: the proxy's own, and any an included VirtualService names (the reference must resolve)
    named = set(own_gateways)
    for vs in chosen_vs:
        named |= _vs_gateways(vs)
    out += [g for g in gateways if f"{g.key.namespace}/{g.key.name}" in named]
    if sidecar is not None:
        out.append(sidecar)
    if scopes is None:
        out += _of_kind(state, "DestinationRule") + _of_kind(state, "WorkloadEntry")
    else:
        for dr in _of_kind(state, "DestinationRule"):
            host = dr.resource.obj.spec.host
            if hosts.is_wildcard(host) or any(_refers(host, dr.key.namespace, se) for se in chosen_se):
                out.append(dr)
        selectors = [
            (se.key.namespace, se.resource.obj.spec.workload_selector.labels)
            for se in chosen_se
            if se.resource.obj.spec.workload_selector is not None
        ]
        for we in _of_kind(state, "WorkloadEntry"):
            labels = we.resource.obj.spec.labels
            if any(ns == we.key.namespace and all(labels.get(k) == v for k, v in sel.items()) for ns, sel in selectors):
                out.append(we)
    # AuthorizationPolicies: the root namespace's (mesh-wide) and the proxy's namespace's whose selector
    # matches; PeerAuthentications and Telemetry: the root namespace's mesh-wide one and the proxy's
    # namespace's whose selector (if any) matches
    for kind in ("AuthorizationPolicy", "PeerAuthentication", "Telemetry"):
        for policy in _of_kind(state, kind):
            selector = policy.resource.obj.spec.selector
            match_labels = selector.match_labels if selector is not None else {}
            if kind != "AuthorizationPolicy" and policy.key.namespace != pc.namespace:
                if policy.key.namespace != ROOT_NAMESPACE or match_labels:
                    continue
            elif policy.key.namespace not in (ROOT_NAMESPACE, pc.namespace):
                continue
            if pc.selects(match_labels):
                out.append(policy)
    out.sort(key=lambda s: (s.key.kind, s.key.namespace, s.key.name))
    return View(tuple(out), view_version(out))


class ViewCache:
    """Views of one state, computed at most once per proxy class; deltas at most once per pair."""

    def __init__(self, state: State) -> None:
        self.state = state
        # a view reads a proxy's labels only through selectors: labels no selector names (a pod name,
        # a template hash) must not make every proxy a class of its own
        self.keys = selector_keys(state)
        self._views: dict[ProxyClass, View] = {}
        self._deltas: dict[tuple[str, str], tuple[list[StoredResource], list[ResourceKey]]] = {}

    def view(self, pc: ProxyClass) -> View:
        v = self._views.get(pc)
        if v is None:
            narrowed = ProxyClass(pc.namespace, frozenset(kv for kv in pc.labels if kv[0] in self.keys))
            v = self._views.get(narrowed)
            if v is None:
                v = self._views[narrowed] = compute_view(self.state, narrowed)
            self._views[pc] = v
        return v

    def delta(self, old: View, new: View) -> tuple[list[StoredResource], list[ResourceKey]]:
        key = (old.version, new.version)  # versions are content hashes: same pair, same delta
        d = self._deltas.get(key)
        if d is None:
            d = self._deltas[key] = delta(old.index, new)
        return d


_SELECTOR_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "Telemetry")  # `selector: {matchLabels}`


def representative_classes(state: State) -> set[ProxyClass]:
    """One proxy class per way the config can apply to a proxy: each namespace with no extra labels,
    and the namespace + selector labels of each Sidecar and Gateway that has a selector. Compiling the
    view of each is how the store validates a change for proxies that have not connected yet."""
    classes = {ProxyClass("default")}
    for key, s in state.items():
        classes.add(ProxyClass(key.namespace))
        if key.kind == "Sidecar":
            ws = s.resource.obj.spec.workload_selector
            if ws is not None and ws.labels:
                classes.add(ProxyClass.of(key.namespace, ws.labels))
        elif key.kind == "Gateway" and s.resource.obj.spec.selector:
            classes.add(ProxyClass.of(key.namespace, s.resource.obj.spec.selector))
        elif key.kind in _SELECTOR_KINDS and s.resource.obj.spec.selector is not None:
            classes.add(ProxyClass.of(key.namespace, s.resource.obj.spec.selector.match_labels))
    return classes


def selector_keys(state: State) -> frozenset[str]:
    """Every label key the config selects on (Gateway selectors, Sidecar workloadSelectors,
    VirtualService sourceLabels): labels outside these keys cannot change how a proxy's view compiles."""
    keys: set[str] = set()
    for key, s in state.items():
        spec = s.resource.obj.spec
        if key.kind == "Gateway":
            keys.update(spec.selector)
        elif key.kind == "Sidecar" and spec.workload_selector is not None:
            keys.update(spec.workload_selector.labels)
        elif key.kind in _SELECTOR_KINDS and spec.selector is not None:
            keys.update(spec.selector.match_labels)
        elif key.kind == "VirtualService":
            for http in spec.http:
                for m in http.match:
                    keys.update(m.source_labels)
    return frozenset(keys)


def delta(old: Mapping[ResourceKey, StoredResource], new: View) -> tuple[list[StoredResource], list[ResourceKey]]:
    """(added or changed, removed keys) turning the `old` set into `new`."""
    changed = [s for s in new.resources if (o := old.get(s.key)) is None or o.digest != s.digest]
    new_keys = {s.key for s in new.resources}
    removed = [k for k in old if k not in new_keys]
    return changed, removed
