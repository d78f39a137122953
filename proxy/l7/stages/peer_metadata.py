"""The peer metadata exchange between sidecars (header in proxy/telemetry/peer.py): what each side
adds, strips and believes, so the metrics can name both ends of a request.

| listener | request | response |
|---|---|---|
| OUTBOUND (client sidecar, gateway) | to a MESH_INTERNAL cluster: any x-triomesh-peer the app sent is removed and ours added; to others: nothing added | x-triomesh-peer removed; believed (destination_*) only from a MESH_INTERNAL cluster |
| INBOUND (server sidecar) | x-triomesh-peer removed; believed (source_*) only from an address the registry lists as a mesh workload | ours added |

So the header never reaches an app, never leaves toward a MESH_EXTERNAL service, and a client
outside the mesh cannot choose the source it is reported as. Until mutual TLS authenticates peers,
"from a mesh workload" means "from an endpoint address of a MESH_INTERNAL service"; with mutual TLS
the peer certificate is the proof (see `_connection_security`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.l7.events import split_authority
from proxy.telemetry.istio_metrics import UNKNOWN_SERVICE, PeerFacts, ServiceLabels, service_labels
from proxy.telemetry.peer import PEER_HEADER, PeerHeaderCache, WorkloadIdentity

if TYPE_CHECKING:
    from proxy.config.snapshot import Snapshot
    from proxy.l7.context import RequestContext
    from proxy.l7.events import ResponseHead
    from proxy.l7.events import split_authority
from proxy.telemetry.istio_metrics import IstioMetrics

MAX_INTERNED = 1024  # distinct (peer, service) facts kept per listener; more are made per request


def _without_peer_header(headers: list) -> bytes | None:
    """Removes every x-triomesh-peer from `headers` (in place); returns the first value."""
    found = None
    i = 0
    while i < len(headers):
        if headers[i][0] == PEER_HEADER:
            if found is None:
                found = headers[i][1]
            del headers[i]
        else:
            i += 1
    return found


class PeerMetadataStage:
    has_response_step = True
    __slots__ = ("inbound", "header_value", "mesh_addresses", "services", "parsed", "interned")

    def __init__(self, metrics: IstioMetrics, snapshot: Snapshot, inbound: bool) -> None:
        self.inbound = inbound
        self.header_value = metrics.identity.header_value()
        self.mesh_addresses = frozenset(a.encode() for a in snapshot.mesh_addresses)
        self.parsed = PeerHeaderCache()
        self.interned: dict[tuple, PeerFacts] = {}
        # inbound: the service a request was addressed to, by the host of its authority (Istio falls
        # back to the Host header for inbound clusters without a service)
        self.services: dict[bytes, ServiceLabels] = {}
        if inbound:
            for cluster in snapshot.clusters.values():
                labels = service_labels(cluster)
                if labels is not UNKNOWN_SERVICE:
                    for host in (cluster.service_host, labels.service, f"{labels.name}.{labels.namespace}"):
                        self.services.setdefault(host.encode(), labels)

    def _facts(self, identity: WorkloadIdentity | None, service: ServiceLabels, security: str) -> PeerFacts:
        key = (identity, service, security)
        facts = self.interned.get(key)
        if facts is None:
            facts = PeerFacts(identity, service, security)
            if len(self.interned) < MAX_INTERNED:
                self.interned[key] = facts
        return facts

    def _connection_security(self, ctx: RequestContext) -> tuple[str, bool]:
        """(connection_security_policy, whether the peer is a proven mesh workload). Before mutual
        TLS exists every connection is "none"; a mutual TLS downstream would answer ("mutual_tls",
        True) and its certificate's SPIFFE id would become the source principal."""
        return "none", ctx.downstream_ip in self.mesh_addresses

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.request
        if self.inbound:
            value = _without_peer_header(head.headers)
            security, trusted = self._connection_security(ctx)
            identity = self.parsed.parse(value) if value is not None and trusted else None
            service = self.services.get(split_authority(head.authority)[0], UNKNOWN_SERVICE) if head.authority else UNKNOWN_SERVICE
            ctx.scratch()["peer"] = self._facts(identity, service, security)
            return None
        cluster = ctx.cluster
        if cluster is not None and cluster.mesh_internal:
            _without_peer_header(head.headers)
            head.headers.append((PEER_HEADER, self.header_value))
        return None

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        headers = head.headers
        if self.inbound:
            headers.append((PEER_HEADER, self.header_value))
            return
        value = _without_peer_header(headers)
        cluster = ctx.cluster
        if value is not None and cluster is not None and cluster.mesh_internal:
            identity = self.parsed.parse(value)
            if identity is not None:
                ctx.scratch()["peer"] = self._facts(identity, UNKNOWN_SERVICE, "unknown")
