"""Plug-in CA directories checked at load on real files: a chain whose issued certificates no workload
would accept is refused with the proxies' verifier's reason; a CA certificate without a Subject Key
Identifier still issues certificates proxies accept; the CA key's file mode (a Kubernetes Secret
mount's 0644 or 0440 is named, not refused; writable by others is refused)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from controlplane.ca import CaError, CertificateAuthority
from proxy.identity.csr import new_key_and_request
from proxy.identity.spiffe import SpiffeId
from proxy.identity.workload import WorkloadIdentity

TD = "cluster.local"
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
CA_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)
NO_CERT_SIGN = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                             encipher_only=False, decipher_only=False)


def ca_certificate(name: str, key, issuer: x509.Certificate | None = None, issuer_key=None, *, path_length=None,
                   usage=CA_USAGE, subject_key_id=True, not_after=NOW + 365 * DAY) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "operator"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - 30 * DAY).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(usage, critical=True))
    if subject_key_id:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    signer = issuer_key if issuer_key is not None else key
    if issuer is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                                        critical=False)
    return builder.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def write_plugin(directory: Path, signer: x509.Certificate, key, chain: list[x509.Certificate],
                 roots: list[x509.Certificate], key_mode: int = 0o600) -> Path:
    directory.mkdir(parents=True)
    pem = lambda certificates: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    (directory / "ca-cert.pem").write_bytes(pem([signer]))
    (directory / "ca-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    os.chmod(directory / "ca-key.pem", key_mode)
    (directory / "cert-chain.pem").write_bytes(pem(chain))
    (directory / "root-cert.pem").write_bytes(pem(roots))
    return directory


@pytest.fixture(scope="module")
def keys():
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]


def intermediate_under(root, root_key, key, **kw):
    return ca_certificate("intermediate", key, root, root_key, path_length=0, **kw)


def expired_root(tmp_path, keys):
    root = ca_certificate("root", keys[0], not_after=NOW - DAY)
    inter = intermediate_under(root, keys[0], keys[1])
    return write_plugin(tmp_path / "ca", inter, keys[1], [inter, root], [root])


def expired_upper_intermediate(tmp_path, keys):
    root = ca_certificate("root", keys[0])
    upper = ca_certificate("upper", keys[2], root, keys[0], not_after=NOW - DAY)
    inter = ca_certificate("intermediate", keys[1], upper, keys[2], path_length=0)
    return write_plugin(tmp_path / "ca", inter, keys[1], [inter, upper, root], [root])


def root_path_length_zero_above_intermediate(tmp_path, keys):
    root = ca_certificate("root", keys[0], path_length=0)
    inter = intermediate_under(root, keys[0], keys[1])
    return write_plugin(tmp_path / "ca", inter, keys[1], [inter, root], [root])


def intermediate_without_key_cert_sign(tmp_path, keys):
    root = ca_certificate("root", keys[0])
    inter = intermediate_under(root, keys[0], keys[1], usage=NO_CERT_SIGN)
    return write_plugin(tmp_path / "ca", inter, keys[1], [inter, root], [root])


@pytest.mark.parametrize("build, reason", [
    (expired_root, "not valid at validation time"),
    (expired_upper_intermediate, "not valid at validation time"),
    (root_path_length_zero_above_intermediate, "path length constraint violated"),
    (intermediate_without_key_cert_sign, "keyCertSign must be asserted"),
], ids=lambda v: getattr(v, "__name__", "reason"))
def test_a_chain_workloads_would_refuse_is_refused_at_load_with_the_verifiers_reason(tmp_path, keys, build, reason):
    directory = build(tmp_path, keys)
    with pytest.raises(CaError) as refused:
        CertificateAuthority.load(directory, TD)
    message = str(refused.value)
    assert message.startswith(f"{directory}: certificates signed with ca-cert.pem and served with cert-chain.pem "
                              "would not be accepted by workloads trusting root-cert.pem")
    assert reason in message


def test_an_ed25519_ca_key_is_refused_naming_the_key_file(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    root = ca_certificate("ed25519 root", key)
    directory = write_plugin(tmp_path / "ca", root, key, [root], [root])
    with pytest.raises(CaError, match=r"ca-key.pem: an Ed25519 CA key signs certificates that workloads refuse"):
        CertificateAuthority.load(directory, TD)


def test_a_ca_certificate_without_subject_key_identifier_issues_certificates_proxies_accept(tmp_path, keys):
    root = ca_certificate("root", keys[0])
    inter = intermediate_under(root, keys[0], keys[1], subject_key_id=False)
    ca = CertificateAuthority.load(write_plugin(tmp_path / "ca", inter, keys[1], [inter, root], [root]), TD)
    reviews = SpiffeId.of(TD, "tutorial", "reviews")
    request = new_key_and_request(reviews)
    issued = ca.issue(request.csr_pem, reviews, 3600)
    leaf = x509.load_pem_x509_certificates(issued.chain_pem)[0]
    identifier = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert identifier == x509.AuthorityKeyIdentifier.from_issuer_public_key(keys[1].public_key())
    WorkloadIdentity.from_pem(issued.chain_pem, request.private_key_pem, ca.trust_bundle_pem)  # the proxies' check


def secret_mount(tmp_path, keys, mode: int) -> Path:
    """Kubernetes' layout of a mounted Secret: the files are symlinks into a `..data` directory."""
    root = ca_certificate("root", keys[0])
    inter = intermediate_under(root, keys[0], keys[1])
    data = write_plugin(tmp_path / "cacerts" / "..2026_01_01_data", inter, keys[1], [inter, root], [root], mode)
    mount = data.parent
    os.symlink(data.name, mount / "..data")
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
        os.chmod(data / name, mode)
        os.symlink(f"..data/{name}", mount / name)
    return mount


@pytest.mark.parametrize("mode, readers", [(0o644, "its group and others"), (0o440, "its group"), (0o404, "others")])
def test_a_secret_mount_readable_by_group_or_others_loads_with_a_warning_naming_the_mode(tmp_path, keys, mode, readers):
    mount = secret_mount(tmp_path, keys, mode)
    ca = CertificateAuthority.load(mount, TD)
    assert ca.warnings == (f"{mount / 'ca-key.pem'}: the CA key is readable by {readers} (mode {mode:04o}); chmod 600 "
                           "it, or for a Kubernetes Secret mount set defaultMode: 0400",)


def test_a_private_key_file_loads_without_warning_and_a_writable_one_is_refused(tmp_path, keys):
    assert CertificateAuthority.load(secret_mount(tmp_path / "a", keys, 0o400), TD).warnings == ()
    mount = secret_mount(tmp_path / "b", keys, 0o664)
    with pytest.raises(CaError, match=r"ca-key.pem: the CA key is writable by its group \(mode 0664\), who could replace"):
        CertificateAuthority.load(mount, TD)
