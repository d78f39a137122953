"""The proxy's side of issuing: a fresh EC P-256 key made locally, and a CSR for the SPIFFE ID it
asks for. Only the CSR leaves the proxy; the key stays with it (and its own workers)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.identity.spiffe import SpiffeId


@dataclass(frozen=True)
class KeyAndRequest:
    private_key_pem: bytes
    csr_pem: bytes


def new_key_and_request(identity: SpiffeId) -> KeyAndRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return KeyAndRequest(key_pem, csr.public_bytes(serialization.Encoding.PEM))
