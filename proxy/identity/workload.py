"""The proxy's workload identity as one immutable value: certificate chain, private key, trust bundle,
and what the admin endpoint shows of them; loadable into a TLS context (the data path's
`proxy.tls.context.TlsContext` or an `ssl.SSLContext`, same method names) without touching disk."""

from __future__ import annotations

import datetime
import os

from typing import TYPE_CHECKING

import msgspec

from proxy.identity.spiffe import InvalidSpiffeId, SpiffeId

if TYPE_CHECKING:
    from cryptography import x509

# `cryptography` is imported where certificates are parsed, not at module load: worker processes
# import this module (the control channel carries identities) and only load PEM into ssl contexts


class IdentityError(ValueError):
    """Certificate material that cannot make a workload identity; says what is wrong."""


def load_certificate_chain(context, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` from memory. OpenSSL's loaders read files, so the PEM goes through
    an anonymous memory file (memfd): the key never reaches a file system."""
    fd = os.memfd_create("triomesh-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def trust_bundle_roots(trust_bundle_pem: bytes) -> list["x509.Certificate"]:
    """The roots of a PEM trust bundle; IdentityError when there are none or it does not parse."""
    from cryptography import x509

    try:
        roots = x509.load_pem_x509_certificates(trust_bundle_pem)
    except ValueError as e:
        raise IdentityError(f"trust bundle is not PEM certificates: {e}") from e
    return roots


def leaf_spiffe_id(certificate: "x509.Certificate") -> SpiffeId:
    from cryptography import x509

    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise IdentityError("the certificate has no subjectAltName") from e
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"expected exactly one URI SAN, found {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise IdentityError(str(e)) from e


class WorkloadIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What a proxy is, proven by its CA-issued certificate. Swapped whole on renewal: readers take
    the current object once and keep it. Travels to the proxy's own workers (never elsewhere)."""

    spiffe_id: str
    certificate_chain_pem: bytes  # the leaf first, then intermediates
    private_key_pem: bytes
    trust_bundle_pem: bytes  # the roots this workload trusts for its peers
    serial: str  # hex
    not_before: float  # epoch seconds
    not_after: float
    received_at: float = 0.0  # when this proxy got it (its renewal schedule counts from here)

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, trust_bundle_pem: bytes, *,
                 received_at: float = 0.0) -> "WorkloadIdentity":
        from cryptography import x509

        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as e:
            raise IdentityError(f"certificate chain is not PEM: {e}") from e
        leaf = chain[0]
        verify_chain(chain, trust_bundle_roots(trust_bundle_pem))
        return cls(spiffe_id=leaf_spiffe_id(leaf).uri, certificate_chain_pem=chain_pem, private_key_pem=key_pem,
                   trust_bundle_pem=trust_bundle_pem, serial=format(leaf.serial_number, "x"),
                   not_before=leaf.not_valid_before_utc.timestamp(), not_after=leaf.not_valid_after_utc.timestamp(),
                   received_at=received_at)

    def with_trust_bundle(self, trust_bundle_pem: bytes) -> "WorkloadIdentity":
        """The same certificate under a new bundle (root rotation); IdentityError if the bundle does
        not parse or no longer trusts this certificate."""
        from cryptography import x509

        verify_chain(x509.load_pem_x509_certificates(self.certificate_chain_pem), trust_bundle_roots(trust_bundle_pem))
        return msgspec.structs.replace(self, trust_bundle_pem=trust_bundle_pem)

    def load_into(self, context) -> None:
        """Present this certificate and trust this bundle's roots (for either direction of mTLS)."""
        load_certificate_chain(context, self.certificate_chain_pem, self.private_key_pem)
        context.load_verify_locations(cadata=self.trust_bundle_pem.decode("ascii"))

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def dump(self) -> dict:
        """For /config_dump: everything but the key."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        roots = x509.load_pem_x509_certificates(self.trust_bundle_pem) if self.trust_bundle_pem else []
        return {
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "not_before": _utc(self.not_before),
            "not_after": _utc(self.not_after),
            "trust_bundle": [{"subject": r.subject.rfc4514_string(),
                              "sha256": r.fingerprint(hashes.SHA256()).hex()}
                             for r in roots],
        }


def verify_chain(chain: list["x509.Certificate"], roots: list["x509.Certificate"], *,
                 at: datetime.datetime | None = None) -> None:
    """The leaf verifies through the chain to one of the roots, for mutual TLS (at `at`, default now):
    IdentityError if not."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    if not roots:
        raise IdentityError("the trust bundle holds no certificate")
    policy = PolicyBuilder().store(Store(roots))
    if at is not None:
        policy = policy.time(at)
    try:
        policy.build_client_verifier().verify(chain[0], chain[1:])
    except VerificationError as e:
        raise IdentityError(f"the certificate does not verify against the trust bundle: {e}") from e


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
