"""Where server certificates come from, what they say, and whether their files changed.

A Gateway names its certificate as files (serverCertificate/privateKey/caCertificates) or as a
`credentialName`, resolved in the proxy's credentials directory (`--credentials-dir DIR`):
`DIR/<credentialName>/` holds a Kubernetes TLS secret's keys as files, `tls.crt`, `tls.key` and,
for MUTUAL, `ca.crt` (Istio's generic-secret names `cert`, `key`, `cacert` are accepted too); a CA
may also come from a separate `DIR/<credentialName>-cacert/` as Istio allows.

Both become `CertificateFiles` (proxy/config/snapshot.py). `certificate_source()` turns that
description into a `CertificateSource`: something with a `fingerprint()` that changes when the
certificate does, and files to build a context from. Files are the only source today; the mesh
CA's workload certificate (ISTIO_MUTUAL) will be another kind of source with the same two methods.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


from proxy.config.snapshot import CertificateFiles

CERT_KEYS = ("tls.crt", "cert")
KEY_KEYS = ("tls.key", "key")
CA_KEYS = ("ca.crt", "cacert")


class CredentialError(ValueError):
    """A credentialName that does not resolve to usable files."""


def _first_present(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def resolve_credential(credentials_dir: str | None, name: str, *, need_ca: bool) -> CertificateFiles:
    """The files of `credentialName: name` (Istio's secret keys as file names)."""
    if not credentials_dir:
        raise CredentialError(f"credentialName {name!r} needs the proxy's --credentials-dir (a directory "
                              f"holding {name}/tls.crt and {name}/tls.key)")
    if "/" in name or name in ("", ".", ".."):
        raise CredentialError(f"credentialName {name!r} is not a secret name")
    directory = Path(credentials_dir) / name
    if not directory.is_dir():
        raise CredentialError(f"credentialName {name!r}: no directory {directory}")
    cert = _first_present(directory, CERT_KEYS)
    key = _first_present(directory, KEY_KEYS)
    if cert is None or key is None:
        missing = " or ".join(CERT_KEYS if cert is None else KEY_KEYS)
        raise CredentialError(f"credentialName {name!r}: {directory} has no {missing}")
    ca = _first_present(directory, CA_KEYS)
    if ca is None and need_ca:
        ca = _first_present(Path(credentials_dir) / f"{name}-cacert", CA_KEYS)
        if ca is None:
            raise CredentialError(f"credentialName {name!r}: MUTUAL needs a CA: no {directory}/ca.crt "
                                  f"(or cacert), nor {name}-cacert/ca.crt")
    return CertificateFiles(str(cert), str(key), str(ca) if ca is not None else "",
                            origin=f"credentialName {name}")


class CertificateSource(Protocol):
    """Where a server's certificate is now: `files` to build its context from (OpenSSL loads
    certificates and keys from files; a source holding them in memory writes them to a private
    directory), and a `fingerprint()` that changes whenever they do (the reload check)."""

    files: CertificateFiles

    def fingerprint(self) -> tuple: ...


@dataclass(frozen=True, slots=True)
class FileSource:
    """Certificate files on disk; the fingerprint is each file's identity, size and modification time,
    so a rewrite in place, a rename over it and a Kubernetes secret volume's symlink swap all show."""

    files: CertificateFiles

    def fingerprint(self) -> tuple:
        out = []
        for path in (self.files.cert_file, self.files.key_file, self.files.ca_file):
            if not path:
                continue
            try:
                st = os.stat(path)
                out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError as e:
                out.append((path, e.errno))
        return tuple(out)


def certificate_source(description: CertificateFiles) -> CertificateSource:
    return FileSource(description)


# CertificateFiles.origin of a Gateway server in ISTIO_MUTUAL: no files, the workload certificate
WORKLOAD_CERTIFICATE = "workload certificate"


@dataclass(frozen=True, slots=True)
class WorkloadSource:
    """The proxy's workload certificate (an IdentityHolder, swapped on renewal); the fingerprint is
    its serial and trust bundle, so a renewal or a new bundle (root rotation) reloads the context
    like a rewritten file."""

    files: CertificateFiles
    holder: Any

    def fingerprint(self) -> tuple:
        identity = self.holder.current if self.holder is not None else None
        return (identity.serial, identity.trust_bundle_pem) if identity is not None else ()


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What /certs shows of one certificate of a chain."""

    path: str
    subject: str
    subject_alt_names: tuple[str, ...]
    serial_number: str
    valid_from: str
    expiration_time: str
    days_until_expiration: int

    def as_dict(self) -> dict:
        return {
            "path": self.path, "subject": self.subject, "subject_alt_names": list(self.subject_alt_names),
            "serial_number": self.serial_number, "valid_from": self.valid_from,
            "expiration_time": self.expiration_time, "days_until_expiration": self.days_until_expiration,
        }


def describe_chain(path: str) -> list[CertificateInfo]:
    """Each certificate in a PEM file; ValueError when it holds none."""
    return describe_chain_pem(Path(path).read_bytes(), path)


def describe_chain_pem(data: bytes, path: str = WORKLOAD_CERTIFICATE) -> list[CertificateInfo]:
    """Each certificate of PEM bytes (`path`: where they come from, as /certs shows it)."""
    # cryptography costs each process ~9 MiB: imported only where a certificate is described
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    certificates = x509.load_pem_x509_certificates(data)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = []
    for cert in certificates:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)) + tuple(
                f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)) + tuple(
                f"URI:{n}" for n in san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            names = ()
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        out.append(CertificateInfo(
            path=path,
            subject=cert.subject.rfc4514_string() or (common[0].value if common else ""),
            subject_alt_names=names,
            serial_number=format(cert.serial_number, "x"),
            valid_from=cert.not_valid_before_utc.isoformat(),
            expiration_time=cert.not_valid_after_utc.isoformat(),
            days_until_expiration=(cert.not_valid_after_utc - now).days,
        ))
    return out


def certificates_report(listeners) -> dict:
    """Envoy's /certs, for the terminating Gateway servers of `listeners` (a snapshot's): each
    certificate chain and CA with subject, SANs and expiry as the files hold them now, and whether
    they load (`error`: why not; the proxy then keeps serving the last good certificate)."""
    from proxy.tls.context import TlsSettingsError, context_for_server

    out = []
    for listener in listeners:
        for server in listener.tls_servers:
            files = server.certificate
            entry: dict = {"listener": listener.name, "server": server.owner, "server_names": list(server.server_names),
                           "mode": server.mode, "origin": files.origin, "cert_chain": [], "ca_cert": [], "error": ""}
            try:
                entry["cert_chain"] = [info.as_dict() for info in describe_chain(files.cert_file)]
                if files.ca_file:
                    entry["ca_cert"] = [info.as_dict() for info in describe_chain(files.ca_file)]
                context_for_server(server)
            except (TlsSettingsError, OSError, ValueError) as e:
                entry["error"] = str(e)
            out.append(entry)
    return {"certificates": out}
