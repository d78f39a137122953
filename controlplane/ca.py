"""The mesh's certificate authority: its signing material from a CA directory, and workload
certificates issued from certificate signing requests.

Theory of operation. A CA directory holds the four files of Istio's plug-in CA:
- `ca-cert.pem`: the certificate that signs workload certificates (an intermediate, or the root itself);
- `ca-key.pem`: its private key (mode 0600; readable by group or others is a warning, writable refused);
- `cert-chain.pem`: the chain from `ca-cert.pem` up to the root, served after every issued certificate;
- `root-cert.pem`: the trust bundle, one or more root certificates every workload trusts.
An empty (or missing) directory gets a new self-signed root on first start, written in the same four
files, so a restart reuses it. An operator's own files are used as given, after checks that name the
file: the key matches `ca-cert.pem`, which is a CA, is valid now, and chains through `cert-chain.pem`
to a root of `root-cert.pem`; and a throwaway certificate issued with them verifies as proxies verify
(`proxy.identity.workload.verify_chain`).

Root rotation is a change of these files in three steps: add the new root to `root-cert.pem`; once
proxies have it, switch `ca-cert.pem`, `ca-key.pem` and `cert-chain.pem` to the new signing material;
once they renewed, remove the old root. While both roots are in the bundle, workloads trust
certificates from either. controlplane/ca_rotation.py does the three steps for the self-signed root
(`triomesh controlplane ca rotate`, `switch-signer`, `drop-old-roots`). The control plane notices a
change (`fingerprint`, which follows symlinks) and loads it whole or keeps the old CA.

Issuing (`issue`): the CSR's own signature must verify; the certificate carries exactly one URI SAN,
the SPIFFE ID the caller is entitled to (a CSR asking for any other name is refused, never obeyed);
serverAuth and clientAuth, a random serial, not-before backdated a little for clocks that lag, and
not-after capped by the signing certificate's own.

Sync and pure apart from reading and writing the directory's files; the server calls it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.identity.spiffe import SpiffeId
from proxy.identity.workload import IdentityError, verify_chain

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
ROOT_CERT = "root-cert.pem"
CA_FILES = (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT)

DEFAULT_WORKLOAD_CERT_TTL_S = 24 * 3600.0  # Istio's default workload certificate lifetime
ROOT_TTL_S = 10 * 365 * 24 * 3600.0  # Istio's self-signed root lives 10 years
BACKDATE_S = 300.0  # not-before this far in the past: a peer whose clock lags still accepts it
MIN_RSA_BITS = 2048
PROBE_IDENTITY = ("istio-system", "triomesh-ca-load-check")  # the throwaway certificate issued at load
PROBE_TTL_S = 300.0
GENERATED_ROOT_CN = "triomesh root CA"  # the common name's prefix of a root this control plane made

Fingerprint = tuple[tuple[str, int, int, int], ...]


class CaError(Exception):
    """The CA directory cannot be used; the message names the file and what is wrong."""


class CsrRefused(Exception):
    """A certificate request that is not signed. `code` is the control-plane protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class IssuedCertificate:
    chain_pem: bytes  # the leaf, then cert-chain.pem
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime


def fingerprint(directory: Path) -> Fingerprint:
    """(name, inode, mtime_ns, size) of the CA files: cheap to poll; changes on any rewrite."""
    out = []
    for name in CA_FILES:
        try:
            st = os.stat(directory / name)
        except FileNotFoundError:
            continue
        out.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file whole or not at all (a reader never sees half of it), with its mode from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an older tmp file may have had another mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def key_mode_warnings(key_path: Path) -> tuple[str, ...]:
    """The CA key file's mode: refused (CaError) when anyone but its owner may write it (they could
    replace the CA); a warning when its group or others may read it. A Kubernetes Secret mount is 0644
    unless `defaultMode` says otherwise, and Istio's cacerts mount works at that mode: readable is
    the operator's call (the mount is private to the pod), so it is named, not refused."""
    mode = stat.S_IMODE(key_path.stat().st_mode)  # of the file a symlink (a Secret mount's) points at
    writers = _who(mode, 0o020, 0o002)
    if writers:
        raise CaError(f"{key_path}: the CA key is writable by {writers} (mode {mode:04o}), who could replace the "
                      f"CA; chmod 600 it (or 400)")
    readers = _who(mode, 0o040, 0o004)
    if readers:
        return (f"{key_path}: the CA key is readable by {readers} (mode {mode:04o}); chmod 600 it, or for a "
                f"Kubernetes Secret mount set defaultMode: 0400",)
    return ()


def _who(mode: int, group_bit: int, other_bit: int) -> str:
    return " and ".join(who for who, bit in (("its group", group_bit), ("others", other_bit)) if mode & bit)


def _utc(t: datetime.datetime | None = None) -> datetime.datetime:
    return t if t is not None else datetime.datetime.now(datetime.timezone.utc)


def _pem_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaError(f"{path}: not PEM certificates: {e}") from e
    return certificates


def public_key_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def is_generated_root(certificate: x509.Certificate) -> bool:
    """A self-signed root `new_root` made: this control plane's own, which `ca rotate` may replace
    (an operator's plug-in CA is never rewritten)."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (certificate.subject == certificate.issuer and _issued_by(certificate, certificate)
            and len(names) == 1 and str(names[0].value).startswith(f"{GENERATED_ROOT_CN} "))


def new_root(trust_domain: str, *, now: datetime.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed root: EC P-256 (fast to make and to verify), 10 years, CA for any path length."""
    now = _utc(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{GENERATED_ROOT_CN} {now:%Y-%m-%dT%H:%M:%SZ}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=BACKDATE_S))
        .not_valid_after(now + datetime.timedelta(seconds=ROOT_TTL_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def certificates_pem(certificates: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def private_key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _requested_names(csr: x509.CertificateSigningRequest) -> x509.SubjectAlternativeName | None:
    """The SAN the request asks for, or None. `cryptography` parses extensions only when asked, so a
    signed request can still carry one that does not decode, or the same extension twice."""
    try:
        return csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except x509.DuplicateExtension as e:
        raise CsrRefused("BAD_CSR", f"the request carries extension {e.oid.dotted_string} more than once") from e
    except ValueError as e:
        raise CsrRefused("BAD_CSR", f"the request's extensions cannot be read: {e}") from e


@dataclass(frozen=True)
class CertificateAuthority:
    """One consistent load of a CA directory. Immutable: a change of the files is a new object."""

    directory: Path
    trust_domain: str
    signing_certificate: x509.Certificate
    signing_key: object  # the private key matching signing_certificate
    chain: tuple[x509.Certificate, ...]  # cert-chain.pem without roots: served after each leaf
    roots: tuple[x509.Certificate, ...]  # root-cert.pem: the trust bundle
    files: Fingerprint
    created: bool = False  # this load made a new self-signed root
    warnings: tuple[str, ...] = ()  # usable, but worth the operator's attention (logged as ca_warning)

    # ---- loading

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str, *, now: datetime.datetime | None = None) -> "CertificateAuthority":
        """Load the CA directory's files; with none of them, make a self-signed root and write them."""
        directory = Path(directory)
        present = [name for name in CA_FILES if (directory / name).exists()]
        if not present:
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            certificate, key = new_root(trust_domain, now=now)
            write_atomic(directory / CA_KEY, private_key_pem(key), 0o600)
            for name in (CA_CERT, CERT_CHAIN, ROOT_CERT):
                write_atomic(directory / name, certificates_pem([certificate]))
            ca = cls.load(directory, trust_domain, now=now)
            return CertificateAuthority(**{**ca.__dict__, "created": True})
        return cls.load(directory, trust_domain, now=now)

    @classmethod
    def load(cls, directory: Path, trust_domain: str, *, now: datetime.datetime | None = None) -> "CertificateAuthority":
        """Load and check an existing CA directory (Istio plug-in CA files). Raises CaError."""
        directory = Path(directory)
        now = _utc(now)
        missing = [name for name in CA_FILES if not (directory / name).exists()]
        if missing:
            raise CaError(f"{directory}: incomplete CA directory: missing {', '.join(missing)} "
                          f"(a plug-in CA needs {', '.join(CA_FILES)}; an empty directory gets a new self-signed root)")
        files = fingerprint(directory)
        key_path = directory / CA_KEY
        warnings = key_mode_warnings(key_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise CaError(f"{key_path}: not an unencrypted PEM private key: {e}") from e
        if isinstance(key, ed25519.Ed25519PrivateKey):
            # RFC 5280 allows it, but the proxies' verifier (Web PKI profile) refuses every chain it signs
            raise CaError(f"{key_path}: an Ed25519 CA key signs certificates that workloads refuse; use EC "
                          f"(P-256 or P-384) or RSA (at least {MIN_RSA_BITS} bits)")
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CaError(f"{key_path}: unsupported key type {type(key).__name__} (EC or RSA)")
        ca_certificates = _pem_certificates(directory / CA_CERT)
        if len(ca_certificates) != 1:
            raise CaError(f"{directory / CA_CERT}: expected one certificate, found {len(ca_certificates)}")
        signing = ca_certificates[0]
        if public_key_der(signing.public_key()) != public_key_der(key.public_key()):
            raise CaError(f"{key_path}: the key does not match {directory / CA_CERT}")
        if not _is_ca(signing):
            raise CaError(f"{directory / CA_CERT}: not a CA certificate (basicConstraints CA:TRUE is required)")
        if not signing.not_valid_before_utc <= now <= signing.not_valid_after_utc:
            raise CaError(f"{directory / CA_CERT}: not valid now (valid from {signing.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
                          f"to {signing.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
        chain = _pem_certificates(directory / CERT_CHAIN)
        roots = _pem_certificates(directory / ROOT_CERT)
        if not roots:
            raise CaError(f"{directory / ROOT_CERT}: no certificate")
        for root in roots:
            if not _is_ca(root):
                raise CaError(f"{directory / ROOT_CERT}: {root.subject.rfc4514_string()} is not a CA certificate")
        if not chain or chain[0] != signing:
            # Istio's cert-chain.pem starts with ca-cert.pem; an operator's chain without it is completed
            chain = [signing, *chain]
        for child, parent in zip(chain, chain[1:]):
            if not _issued_by(child, parent):
                raise CaError(f"{directory / CERT_CHAIN}: {child.subject.rfc4514_string()} is not signed by the next "
                              f"certificate, {parent.subject.rfc4514_string()}")
        top = chain[-1]
        if not any(top == root or _issued_by(top, root) for root in roots):
            raise CaError(f"{directory / CERT_CHAIN}: the chain does not lead to a root in {directory / ROOT_CERT} "
                          f"(it ends at {top.subject.rfc4514_string()}, issued by {top.issuer.rfc4514_string()})")
        # roots travel in the trust bundle; the chain served after a leaf stops below them
        served = tuple(c for c in chain if c not in roots)
        ca = cls(directory, trust_domain, signing, key, served, tuple(roots), files, warnings=warnings)
        ca._check_issued_certificates_verify(now)
        return ca

    def _check_issued_certificates_verify(self, now: datetime.datetime) -> None:
        """Issue a throwaway certificate and verify it as proxies do (`verify_chain`), as istiod
        verifies its plug-in chain at load: the checks above cannot see everything that makes peers
        refuse a chain (an expired root or intermediate, a path length exceeded, a CA certificate
        without keyCertSign, a signature algorithm the verifier refuses)."""
        probe = SpiffeId.of(self.trust_domain, *PROBE_IDENTITY)
        issued = self._sign(ec.generate_private_key(ec.SECP256R1()).public_key(),
                            [x509.UniformResourceIdentifier(probe.uri)], PROBE_TTL_S, now=now)
        try:
            verify_chain(x509.load_pem_x509_certificates(issued.chain_pem), list(self.roots), at=now)
        except IdentityError as e:
            raise CaError(f"{self.directory}: certificates signed with {CA_CERT} and served with {CERT_CHAIN} would "
                          f"not be accepted by workloads trusting {ROOT_CERT}: {e}") from e

    # ---- what is served

    @property
    def trust_bundle_pem(self) -> bytes:
        return certificates_pem(self.roots)

    @property
    def root_fingerprints(self) -> list[str]:
        return [certificate_fingerprint(r) for r in self.roots]

    # ---- issuing

    def issue(self, csr_pem: bytes, identity: SpiffeId, ttl_s: float, *, now: datetime.datetime | None = None) -> IssuedCertificate:
        """Sign a workload CSR for `identity` (what the caller proved it may be). Raises CsrRefused."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise CsrRefused("BAD_CSR", f"not a PEM certificate signing request: {e}") from e
        if not csr.is_signature_valid:
            raise CsrRefused("BAD_CSR", "the request's signature does not verify with its own public key")
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise CsrRefused("BAD_CSR", f"the request's public key cannot be read: {e}") from e
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
            raise CsrRefused("BAD_CSR", f"RSA key of {public_key.key_size} bits (at least {MIN_RSA_BITS})")
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
            raise CsrRefused("BAD_CSR", f"unsupported key type {type(public_key).__name__}")
        requested = _requested_names(csr)
        if requested is not None:
            asked = [str(name.value) for name in requested]
            if asked != [identity.uri]:
                raise CsrRefused("PERMISSION_DENIED", f"the request asks for {', '.join(asked)}; this caller may only "
                                                      f"have {identity.uri}")
        return self._sign(public_key, [x509.UniformResourceIdentifier(identity.uri)], ttl_s, now=now)

    def issue_for_key(self, public_key, names: list[x509.GeneralName], ttl_s: float, *,
                      now: datetime.datetime | None = None) -> IssuedCertificate:
        """A certificate for a key this process made itself (the control plane's serving certificate)."""
        return self._sign(public_key, names, ttl_s, now=now)

    def _sign(self, public_key, names: list[x509.GeneralName], ttl_s: float, *, now: datetime.datetime | None) -> IssuedCertificate:
        now = _utc(now)
        signing = self.signing_certificate
        not_before = max(now - datetime.timedelta(seconds=BACKDATE_S), signing.not_valid_before_utc)
        not_after = min(now + datetime.timedelta(seconds=ttl_s), signing.not_valid_after_utc)
        try:
            ski = signing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            authority_key = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            # an operator's CA certificate without one: the identifier RFC 5280's method 1 would give
            # it, which is what the proxies' verifier requires in the leaf
            authority_key = x509.AuthorityKeyIdentifier.from_issuer_public_key(signing.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # the identity is the SAN alone, as Istio's workload certificates
            .issuer_name(signing.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            # critical: with an empty subject the SAN is the certificate's only name (RFC 5280 4.2.1.6)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        builder = builder.add_extension(authority_key, critical=False)
        certificate = builder.sign(self.signing_key, hashes.SHA256())
        return IssuedCertificate(certificates_pem([certificate, *self.chain]), certificate.serial_number,
                                 certificate.not_valid_before_utc, certificate.not_valid_after_utc)


def server_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SANs for the control plane's serving certificate: IP addresses as IP SANs, the rest as DNS names."""
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out
