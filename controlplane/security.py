"""The control plane's security state: its CA (reloaded when the CA directory changes), its own
serving certificate, the tokens file, and the decisions made with them (who may open a proxy stream
as which identity, who may change the config, what a CSR gets). Sync; the server calls it.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane import tls
from controlplane.ca import (
    DEFAULT_WORKLOAD_CERT_TTL_S,
    CaError,
    CertificateAuthority,
    CsrRefused,
    IssuedCertificate,
    fingerprint,
    server_names,
)
from controlplane.tokens import TOKENS_FILE, Authorized, Refused, TokenBook, authorize
from controlplane.wire import CertificateReply
from proxy.identity.spiffe import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, SpiffeId

SERVER_CERT_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class SecurityOptions:
    ca_dir: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    workload_cert_ttl_s: float = DEFAULT_WORKLOAD_CERT_TTL_S
    server_hosts: tuple[str, ...] = ()  # the serving certificate's SANs (DNS names or IPs)
    tokens_file: Path | None = None  # default: CA_DIR/tokens.json


@dataclass
class ServingCertificate:
    context: ssl.SSLContext
    serial: int
    renew_after: datetime.datetime


@dataclass
class Security:
    options: SecurityOptions
    ca: CertificateAuthority
    tokens: TokenBook
    serving: ServingCertificate = field(init=False)
    last_ca_error: str = ""
    certificates_issued: int = 0

    @classmethod
    def open(cls, options: SecurityOptions) -> "Security":
        """Load (or on first start create) the CA. Raises CaError."""
        ca = CertificateAuthority.load_or_create(options.ca_dir, options.trust_domain)
        tokens = TokenBook(options.tokens_file or options.ca_dir / TOKENS_FILE)
        security = cls(options, ca, tokens)
        security.serving = security._new_serving_certificate()
        return security

    @property
    def trust_domain(self) -> str:
        return self.options.trust_domain

    def _new_serving_certificate(self) -> ServingCertificate:
        """A fresh key and certificate for the control plane's TLS port, from its own CA: the SANs
        configured, and istiod's SPIFFE ID."""
        key = ec.generate_private_key(ec.SECP256R1())
        own = SpiffeId.of(self.trust_domain, *tls.CONTROLPLANE_SERVICE_ACCOUNT)
        names = [*server_names(self.options.server_hosts), x509.UniformResourceIdentifier(own.uri)]
        issued = self.ca.issue_for_key(key.public_key(), names, SERVER_CERT_TTL_S)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        context = tls.server_context(issued.chain_pem, key_pem, self.ca.trust_bundle_pem)
        renew_after = issued.not_before + (issued.not_after - issued.not_before) / 2
        return ServingCertificate(context, issued.serial, renew_after)

    # ---- changes over time

    def reload_if_changed(self) -> bool:
        """Reload the CA when its files changed. True when the CA (roots or signer) is new. A CA
        directory that does not load keeps the old CA (`last_ca_error` says why)."""
        if fingerprint(self.options.ca_dir) == self.ca.files:
            return False
        try:
            ca = CertificateAuthority.load(self.options.ca_dir, self.trust_domain)
        except (CaError, OSError) as e:
            self.last_ca_error = str(e)
            return False
        self.last_ca_error = ""
        self.ca = ca
        self.serving = self._new_serving_certificate()  # signed by the new signer, trusting the new bundle
        return True

    def refresh_serving_if_due(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if now < self.serving.renew_after:
            return False
        self.serving = self._new_serving_certificate()
        return True

    # ---- decisions

    def admit_proxy(self, namespace: str, service_account: str, token: str, peer: SpiffeId | None) -> Authorized | Refused:
        try:
            requested = SpiffeId.of(self.trust_domain, namespace, service_account or DEFAULT_SERVICE_ACCOUNT)
        except InvalidSpiffeId as e:
            return Refused("BAD_HELLO", str(e))
        return authorize(requested, peer=peer, token=token, grant=self.tokens.lookup(token))

    def admit_admin(self, token: str) -> Refused | None:
        if not token:
            return Refused("UNAUTHENTICATED", "this control plane requires an admin token for apply, delete and "
                                              "status (--token-file, or $TRIOMESH_TOKEN_FILE; make one with "
                                              "`triomesh controlplane token --admin`)")
        grant = self.tokens.lookup(token)
        if grant is None:
            return Refused("UNAUTHENTICATED", "the admin token is not known to this control plane")
        if not grant.admin:
            return Refused("PERMISSION_DENIED", "a workload bootstrap token cannot apply, delete or read status")
        return None

    def sign(self, request_id: int, csr_pem: bytes, identity: SpiffeId) -> "Signed":
        try:
            issued = self.ca.issue(csr_pem, identity, self.options.workload_cert_ttl_s)
        except CsrRefused as e:
            return Signed(CertificateReply(request_id=request_id, error_code=e.code, error=e.message), None)
        self.certificates_issued += 1
        return Signed(CertificateReply(request_id=request_id, certificate_chain=issued.chain_pem,
                                       trust_bundle=self.ca.trust_bundle_pem), issued)


@dataclass(frozen=True)
class Signed:
    """The answer to a certificate request, and what was issued (None: refused, the reply says why)."""

    reply: CertificateReply
    issued: IssuedCertificate | None
