"""The peer metadata exchange between sidecars (header in proxy/telemetry/peer.py): what each side
adds, strips and believes, so the metrics can name both ends of a request.

| listener | request | response |
|---|---|---|
| OUTBOUND (client sidecar, gateway) | to a MESH_INTERNAL cluster: ours appended last (by the upstream encoders: Chain.peer_header); to others: nothing; a mirrored copy by its own cluster | x-triomesh-peer removed; believed (destination_*) only from a MESH_INTERNAL cluster |
| INBOUND (server sidecar) | every x-triomesh-peer removed; the last one (the client sidecar's own) believed (source_*) only from an address the registry lists as a mesh workload; without it, the registry's workload at that address (if only one is there) | ours added |

So the header never reaches an app, never leaves toward a MESH_EXTERNAL service, and neither a
client outside the mesh nor an app behind a sidecar can choose the source it is reported as (an
app's own header comes before the one its sidecar appends, and only the last one counts). Until
mutual TLS authenticates peers, "from a mesh workload" means "from an endpoint address of a
MESH_INTERNAL service"; with mutual TLS the peer certificate is the proof (`_connection_security`).

A plain HTTP/1.1 response is relayed from its field block without parsing it (router.py): the
outbound side has the head parser take the header out of the block while it sorts the fields
(`takes_plain_field`; Python then never searches for it), the inbound side appends ours to the block.
An HTTP/2 upstream's response, where this stage is the only response stage (Chain.sole_taker), has
the header taken out of its fields once per repeated header block (h2_upstream.ResponseView), and
the stage is told its value the same way (`on_taken_field`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.l7.events import split_authority
from proxy.telemetry.istio_metrics import UNKNOWN_SERVICE, PeerFacts, ServiceLabels, endpoint_identity, service_labels
from proxy.telemetry.peer import PEER_HEADER, UNKNOWN_WORKLOAD, PeerHeaderCache, WorkloadIdentity
from proxy.tls.conn import SPIFFE_PREFIX

if TYPE_CHECKING:
    from proxy.config.snapshot import Snapshot
    from proxy.l7.context import RequestContext
    from proxy.l7.events import ResponseHead
    from proxy.telemetry.istio_metrics import IstioMetrics

MAX_INTERNED = 1024  # distinct (peer, service) facts kept per listener; more are made per request


def _without_peer_header(headers: list) -> bytes | None:
    """Removes every x-triomesh-peer from `headers` (in place); returns the last value."""
    found = None
    i = 0
    while i < len(headers):
        if headers[i][0] == PEER_HEADER:
            found = headers[i][1]
            del headers[i]
        else:
            i += 1
    return found


class PeerMetadataStage:
    has_response_step = True
    __slots__ = ("inbound", "has_request_step", "edits_plain_fields", "takes_plain_field", "header_value",
                 "header_field", "mesh_addresses", "services", "parsed", "interned", "workloads_by_address",
                 "upstream_principals", "with_principal")

    def __init__(self, metrics: IstioMetrics, snapshot: Snapshot, inbound: bool) -> None:
        self.inbound = inbound
        # outbound, the request side is the upstream encoders' (Chain.peer_header): this
        # stage only reads and strips the response's header, and takes no call per request
        self.has_request_step = inbound
        # a plain HTTP/1.1 response (chain.py): inbound, ours is appended to its field block;
        # outbound, the head parser takes the peer's out of it (on_taken_field is called only when
        # there was one)
        self.edits_plain_fields = inbound
        self.takes_plain_field = b"" if inbound else PEER_HEADER
        self.header_value = metrics.identity.header_value()
        self.header_field = PEER_HEADER + b": " + self.header_value + b"\r\n"
        self.mesh_addresses = frozenset(a.encode() for a in snapshot.mesh_addresses)
        self.parsed = PeerHeaderCache()
        self.interned: dict[tuple, PeerFacts] = {}
        self.upstream_principals = metrics.upstream_principals
        self.with_principal: dict[tuple, WorkloadIdentity] = {}
        # inbound: the service a request was addressed to, by the host of its authority (Istio falls
        # back to the Host header for inbound clusters without a service)
        self.services: dict[bytes, ServiceLabels] = {}
        # inbound without a (believable) header: the registry's workload at the client's address, when
        # the address belongs to one workload only (several on one address, as on loopback: unknown)
        self.workloads_by_address: dict[bytes, WorkloadIdentity | None] = {}
        if inbound:
            for cluster in snapshot.clusters.values():
                if cluster.mesh_internal:
                    for endpoint in cluster.endpoints:
                        known = endpoint_identity(endpoint, cluster)
                        key = endpoint.address.encode()
                        if self.workloads_by_address.setdefault(key, known) != known:
                            self.workloads_by_address[key] = None
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
        """(connection_security_policy, whether the peer is a proven mesh workload): a mesh mutual
        TLS downstream proves it with its certificate; plaintext is "none", trusted by address."""
        if ctx.peer.peer_principal is not None:
            return "mutual_tls", True
        return "none", ctx.downstream_ip in self.mesh_addresses

    def on_request(self, ctx: RequestContext) -> None:
        """Inbound: strips every peer header and notes the peer (outbound: see has_request_step)."""
        head = ctx.request
        if self.inbound:
            value = _without_peer_header(head.headers)
            security, trusted = self._connection_security(ctx)
            identity = self.parsed.parse(value) if value is not None and trusted else None
            if identity is None:
                identity = self.workloads_by_address.get(ctx.downstream_ip)
            if security == "mutual_tls":  # source_principal: the verified certificate's SPIFFE ID
                identity = self._with_principal(identity or UNKNOWN_WORKLOAD, SPIFFE_PREFIX + ctx.peer.peer_principal)
            service = self.services.get(split_authority(head.authority)[0], UNKNOWN_SERVICE) if head.authority else UNKNOWN_SERVICE
            ctx.scratch()["peer"] = self._facts(identity, service, security)
        return None

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        headers = head.headers
        if self.inbound:
            headers.append((PEER_HEADER, self.header_value))
            return
        self._note_destination(ctx, _without_peer_header(headers))

    def on_plain_response(self, ctx: RequestContext, fields: bytes) -> bytes:
        """Inbound: ours appended to a plain response's field block."""
        return fields + self.header_field

    def on_taken_field(self, ctx: RequestContext, value: bytes) -> None:
        """Outbound: the peer's header, taken out of a plain response's field block by the head parser."""
        self._note_destination(ctx, value)

    def _note_destination(self, ctx: RequestContext, value: bytes | None) -> None:
        cluster = ctx.cluster
        if value is not None and cluster is not None and cluster.mesh_internal:
            identity = self.parsed.parse(value)
            if identity is not None:
                # destination_principal: the SPIFFE ID the endpoint proved when the connection was made
                endpoint = ctx.endpoint
                principal = self.upstream_principals.get(endpoint.key) if endpoint is not None else None
                if principal is not None:
                    identity = self._with_principal(identity, principal)
                ctx.scratch()["peer"] = self._facts(identity, UNKNOWN_SERVICE, "unknown")

    def _with_principal(self, identity: WorkloadIdentity, principal: str) -> WorkloadIdentity:
        key = (identity, principal)
        found = self.with_principal.get(key)
        if found is None:
            found = replace(identity, principal=principal)
            if len(self.with_principal) < MAX_INTERNED:
                self.with_principal[key] = found
        return found
