"""SPIFFE IDs as Istio spells them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"  # Istio's default
DEFAULT_SERVICE_ACCOUNT = "default"  # what Kubernetes gives a pod that names none

# a DNS-label-like segment (Kubernetes names); keeps "/" and other path syntax out of the ID
_SEGMENT = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")


class InvalidSpiffeId(ValueError):
    pass


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def of(cls, trust_domain: str, namespace: str, service_account: str) -> "SpiffeId":
        """Checked: every part must be a plain name, so the URI cannot say more than it means."""
        if not _TRUST_DOMAIN.match(trust_domain):
            raise InvalidSpiffeId(f"trust domain {trust_domain!r} is not a valid name")
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if not _SEGMENT.match(value):
                raise InvalidSpiffeId(f"{what} {value!r} is not a valid name (lower-case letters, digits, '-', '.')")
        return cls(trust_domain, namespace, service_account)

    @classmethod
    def parse(cls, uri: str) -> "SpiffeId":
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise InvalidSpiffeId(f"{uri!r} is not a spiffe:// URI")
        trust_domain, _, path = uri[len(prefix):].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise InvalidSpiffeId(f"{uri!r} is not of the form spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT")
        return cls.of(trust_domain, parts[1], parts[3])

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri
