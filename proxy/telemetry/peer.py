"""Workload identities and the peer metadata header sidecars exchange (sans-IO: bytes in, identity out).

Istio's sidecars tell each other who they are in the `x-envoy-peer-metadata` request and response
headers (a base64 protobuf struct); ours is one readable header with the same facts:

    x-triomesh-peer: namespace=tutorial;workload=preference-v1;app=preference;version=v1;service=preference;revision=v1;cluster=Kubernetes

Keys may come in any order and unknown keys are ignored (new facts can be added); a missing fact is
`unknown`. Values are limited to what Kubernetes allows in names and label values
([A-Za-z0-9._-], 63 characters), so a header cannot grow the metrics with arbitrary strings: a header
that breaks the rule is refused as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

PEER_HEADER = b"x-triomesh-peer"
UNKNOWN = "unknown"
DEFAULT_CLUSTER_ID = "Kubernetes"  # Istio's default cluster name (values.global.multiCluster.clusterName)
MAX_VALUE_CHARS = 63
MAX_HEADER_BYTES = 512

_FIELDS = ("namespace", "workload", "app", "version", "service", "revision", "cluster")
_ALLOWED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """What Istio's metrics say of one side of a request (source_* or destination_* labels)."""

    namespace: str = UNKNOWN
    workload: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN
    principal: str = UNKNOWN  # a SPIFFE id once mutual TLS tells it; never taken from a header

    def header_value(self) -> bytes:
        values = (self.namespace, self.workload, self.app, self.version, self.canonical_service,
                  self.canonical_revision, self.cluster)
        return ";".join(f"{k}={v}" for k, v in zip(_FIELDS, values) if v != UNKNOWN).encode()


UNKNOWN_WORKLOAD = WorkloadIdentity()


def canonical_service(labels: Mapping[str, str], workload: str) -> str:
    """Istio's canonical service: service.istio.io/canonical-name, app.kubernetes.io/name, app, else
    the workload name."""
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        value = labels.get(key)
        if value:
            return value
    return workload


def canonical_revision(labels: Mapping[str, str]) -> str:
    """Istio's canonical revision: service.istio.io/canonical-revision, app.kubernetes.io/version,
    version, else "latest"."""
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        value = labels.get(key)
        if value:
            return value
    return "latest"


def identity_from_labels(namespace: str, labels: Mapping[str, str], workload: str | None = None,
                         cluster: str = DEFAULT_CLUSTER_ID) -> WorkloadIdentity:
    """A workload's identity from its namespace and labels, as Istio derives the metric labels; the
    workload name defaults to the canonical service (a Deployment is usually named after its app)."""
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or UNKNOWN
    service = canonical_service(labels, workload or UNKNOWN)
    return WorkloadIdentity(
        namespace=namespace or UNKNOWN,
        workload=workload or (service if service != UNKNOWN else UNKNOWN),
        app=app,
        version=labels.get("version") or labels.get("app.kubernetes.io/version") or UNKNOWN,
        canonical_service=service,
        canonical_revision=canonical_revision(labels),
        cluster=cluster or UNKNOWN,
    )


def parse_peer_header(value: bytes) -> WorkloadIdentity | None:
    """The identity a peer sidecar sent, or None when the header is malformed (too long, a value
    with characters outside [A-Za-z0-9._-] or over 63 characters, a part without `=`)."""
    if len(value) > MAX_HEADER_BYTES:
        return None
    facts: dict[str, str] = {}
    for part in value.split(b";"):
        key, sep, fact = part.strip().partition(b"=")
        if not sep or not fact or len(fact) > MAX_VALUE_CHARS or not _ALLOWED.issuperset(fact):
            return None
        facts[key.decode("ascii", "replace")] = fact.decode("ascii")
    return WorkloadIdentity(
        namespace=facts.get("namespace", UNKNOWN),
        workload=facts.get("workload", UNKNOWN),
        app=facts.get("app", UNKNOWN),
        version=facts.get("version", UNKNOWN),
        canonical_service=facts.get("service", UNKNOWN),
        canonical_revision=facts.get("revision", UNKNOWN),
        cluster=facts.get("cluster", UNKNOWN),
    )


class PeerHeaderCache:
    """Parsed peer headers by their bytes: the same few peers send the same value on every request."""

    __slots__ = ("_parsed", "max_entries")

    def __init__(self, max_entries: int = 1024) -> None:
        self._parsed: dict[bytes, WorkloadIdentity | None] = {}
        self.max_entries = max_entries

    def parse(self, value: bytes) -> WorkloadIdentity | None:
        parsed = self._parsed
        if value in parsed:
            return parsed[value]
        identity = parse_peer_header(value)
        if len(parsed) < self.max_entries:
            parsed[value] = identity
        return identity
