"""The CA (controlplane/ca.py) on real files: a self-signed root made once and reused, Istio plug-in CA
files used as given, issued certificates checked with `cryptography`'s verifier and `openssl verify`,
CSR checks, root rotation; and the token decisions (controlplane/tokens.py)."""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from controlplane.ca import CA_FILES, CaError, CertificateAuthority, CsrRefused
from controlplane.ca_rotation import add_new_root, drop_old_roots, switch_signer
from controlplane.tokens import Authorized, Refused, TokenBook, authorize, create_token
from proxy.identity.csr import new_key_and_request
from proxy.identity.spiffe import SpiffeId
from proxy.identity.workload import WorkloadIdentity

TD = "cluster.local"
REVIEWS = SpiffeId.of(TD, "tutorial", "reviews")


@pytest.fixture(scope="module")
def request_for_reviews():
    return new_key_and_request(REVIEWS)  # one key for the module: key generation stays out of the tests


def verify_with_cryptography(chain_pem: bytes, roots: list[x509.Certificate]) -> x509.Certificate:
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, intermediates)  # raises VerificationError
    assert verified.subjects is not None
    return leaf


def openssl_verify(tmp: Path, chain_pem: bytes, roots_pem: bytes, purpose: str = "sslclient") -> subprocess.CompletedProcess:
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp / "untrusted.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in intermediates))
    (tmp / "roots.pem").write_bytes(roots_pem)
    args = ["openssl", "verify", "-purpose", purpose, "-CAfile", str(tmp / "roots.pem")]
    if intermediates:
        args += ["-untrusted", str(tmp / "untrusted.pem")]
    return subprocess.run([*args, str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30)


def test_first_start_makes_a_root_with_a_private_key_and_a_restart_reuses_it(tmp_path):
    ca_dir = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(ca_dir, TD)
    assert first.created
    assert sorted(os.listdir(ca_dir)) == sorted(CA_FILES)
    assert stat.S_IMODE(os.stat(ca_dir / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    again = CertificateAuthority.load_or_create(ca_dir, TD)
    assert not again.created
    assert again.roots == first.roots and again.signing_certificate == first.signing_certificate


def test_issued_certificate_is_the_entitled_spiffe_id_for_mtls_both_ways(tmp_path, request_for_reviews):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    before = datetime.datetime.now(datetime.timezone.utc)
    issued = ca.issue(request_for_reviews.csr_pem, REVIEWS, 3600)
    leaf = verify_with_cryptography(issued.chain_pem, list(ca.roots))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.critical and [str(n.value) for n in sans.value] == ["spiffe://cluster.local/ns/tutorial/sa/reviews"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_before_utc < before - datetime.timedelta(seconds=60)  # backdated
    lifetime_from_now = leaf.not_valid_after_utc - before
    assert datetime.timedelta(minutes=59) < lifetime_from_now <= datetime.timedelta(hours=1, seconds=5)
    # the certificate is for the key the proxy made (its public half came in the CSR)
    key = serialization.load_pem_private_key(request_for_reviews.private_key_pem, None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert leaf.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)
    # random serials: two issues never share one
    assert ca.issue(request_for_reviews.csr_pem, REVIEWS, 3600).serial != issued.serial
    for purpose in ("sslclient", "sslserver"):
        result = openssl_verify(tmp_path, issued.chain_pem, ca.trust_bundle_pem, purpose)
        assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_default_ttl_is_24h_and_never_outlives_the_signer(tmp_path, request_for_reviews):
    from controlplane.ca import DEFAULT_WORKLOAD_CERT_TTL_S

    assert DEFAULT_WORKLOAD_CERT_TTL_S == 24 * 3600
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    issued = ca.issue(request_for_reviews.csr_pem, REVIEWS, 100 * 365 * 24 * 3600)
    assert issued.not_after == ca.signing_certificate.not_valid_after_utc


def test_a_csr_for_another_identity_is_refused_not_rewritten(tmp_path, request_for_reviews):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    other = SpiffeId.of(TD, "finance", "billing")
    with pytest.raises(CsrRefused) as e:
        ca.issue(request_for_reviews.csr_pem, other, 3600)
    assert e.value.code == "PERMISSION_DENIED"
    assert "spiffe://cluster.local/ns/tutorial/sa/reviews" in e.value.message
    assert "spiffe://cluster.local/ns/finance/sa/billing" in e.value.message


def test_a_csr_whose_signature_does_not_verify_is_refused(tmp_path, request_for_reviews):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    der = bytearray(x509.load_pem_x509_csr(request_for_reviews.csr_pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    import base64

    tampered = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der))
                + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CsrRefused) as e:
        ca.issue(tampered, REVIEWS, 3600)
    assert e.value.code == "BAD_CSR"
    with pytest.raises(CsrRefused) as e:
        ca.issue(b"not a csr", REVIEWS, 3600)
    assert e.value.code == "BAD_CSR" and "not a PEM certificate signing request" in e.value.message


def write_plugin_ca(directory: Path) -> tuple[trustme.CA, trustme.CA]:
    """Istio's plug-in CA layout from an operator's root and intermediate."""
    root = trustme.CA(organization_name="operator root")
    intermediate = root.create_child_ca()
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(intermediate.cert_pem.bytes())
    key = directory / "ca-key.pem"
    key.write_bytes(intermediate.private_key_pem.bytes())
    key.chmod(0o600)
    (directory / "root-cert.pem").write_bytes(root.cert_pem.bytes())
    (directory / "cert-chain.pem").write_bytes(intermediate.cert_pem.bytes() + root.cert_pem.bytes())
    return root, intermediate


def test_plugin_ca_files_are_used_as_given(tmp_path, request_for_reviews):
    root, intermediate = write_plugin_ca(tmp_path / "ca")
    files_before = {n: (tmp_path / "ca" / n).read_bytes() for n in CA_FILES}
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    assert not ca.created
    assert {n: (tmp_path / "ca" / n).read_bytes() for n in CA_FILES} == files_before  # nothing rewritten
    assert ca.signing_certificate.public_bytes(serialization.Encoding.PEM) == intermediate.cert_pem.bytes()
    issued = ca.issue(request_for_reviews.csr_pem, REVIEWS, 3600)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert chain[0].issuer == ca.signing_certificate.subject
    assert chain[1].public_bytes(serialization.Encoding.PEM) == intermediate.cert_pem.bytes()  # the chain is served
    root_certificate = x509.load_pem_x509_certificate(root.cert_pem.bytes())
    verify_with_cryptography(issued.chain_pem, [root_certificate])
    result = openssl_verify(tmp_path, issued.chain_pem, root.cert_pem.bytes())
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_plugin_ca_directories_are_refused_naming_the_file(tmp_path):
    _, _ = write_plugin_ca(tmp_path / "ca")
    other = trustme.CA().create_child_ca()
    (tmp_path / "ca" / "ca-key.pem").write_bytes(other.private_key_pem.bytes())
    with pytest.raises(CaError, match=r"ca-key.pem: the key does not match .*ca-cert.pem"):
        CertificateAuthority.load(tmp_path / "ca", TD)
    (tmp_path / "ca" / "cert-chain.pem").unlink()
    with pytest.raises(CaError, match="missing cert-chain.pem"):
        CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    write_plugin_ca(tmp_path / "ca2")
    (tmp_path / "ca2" / "root-cert.pem").write_bytes(trustme.CA().cert_pem.bytes())  # a root the chain does not reach
    with pytest.raises(CaError, match="does not lead to a root in"):
        CertificateAuthority.load(tmp_path / "ca2", TD)
    write_plugin_ca(tmp_path / "ca3")
    (tmp_path / "ca3" / "ca-key.pem").chmod(0o646)
    with pytest.raises(CaError, match=r"the CA key is writable by others \(mode 0646\)"):
        CertificateAuthority.load(tmp_path / "ca3", TD)


def test_root_rotation_adds_the_root_then_switches_the_signer_then_drops_the_old(tmp_path, request_for_reviews):
    ca_dir = tmp_path / "ca"
    old = CertificateAuthority.load_or_create(ca_dir, TD)
    from_old = old.issue(request_for_reviews.csr_pem, REVIEWS, 3600)
    new_root = add_new_root(ca_dir, TD)
    added = CertificateAuthority.load(ca_dir, TD)
    # step 1 only publishes the new root: the old signer goes on signing
    assert added.roots == (old.roots[0], new_root) and added.signing_certificate == old.signing_certificate
    switch_signer(ca_dir, TD)
    new = CertificateAuthority.load(ca_dir, TD)
    assert new.roots == added.roots and new.signing_certificate == new_root
    from_new = new.issue(request_for_reviews.csr_pem, REVIEWS, 3600)
    # during the overlap both certificates verify against the bundle workloads now receive
    for issued in (from_old, from_new):
        verify_with_cryptography(issued.chain_pem, list(new.roots))
        assert openssl_verify(tmp_path, issued.chain_pem, new.trust_bundle_pem).returncode == 0
    assert x509.load_pem_x509_certificates(from_new.chain_pem)[0].issuer == new_root.subject
    # once the old root is dropped, only the new chain verifies, and the old key is gone
    assert drop_old_roots(ca_dir, TD) == [old.roots[0]]
    after = CertificateAuthority.load(ca_dir, TD)
    assert after.roots == (new_root,)
    assert openssl_verify(tmp_path, from_new.chain_pem, after.trust_bundle_pem).returncode == 0
    assert openssl_verify(tmp_path, from_old.chain_pem, after.trust_bundle_pem).returncode != 0
    old_key = old.signing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    assert not [p for p in ca_dir.rglob("*.pem") if p.is_file() and p.read_bytes() == old_key]


def test_rotation_steps_out_of_order_are_refused_precisely(tmp_path):
    ca_dir = tmp_path / "ca"
    CertificateAuthority.load_or_create(ca_dir, TD)
    with pytest.raises(CaError, match="no new root waits to sign; `triomesh controlplane ca rotate` adds one"):
        switch_signer(ca_dir, TD)
    add_new_root(ca_dir, TD)
    with pytest.raises(CaError, match="already in root-cert.pem and waits to sign: run `triomesh controlplane ca switch-signer`"):
        add_new_root(ca_dir, TD)
    with pytest.raises(CaError, match="does not sign yet; dropping the others now"):
        drop_old_roots(ca_dir, TD)
    assert len(CertificateAuthority.load(ca_dir, TD).roots) == 2


def test_workload_identity_loads_into_an_ssl_context_from_memory(tmp_path, request_for_reviews):
    import ssl

    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    issued = ca.issue(request_for_reviews.csr_pem, REVIEWS, 3600)
    identity = WorkloadIdentity.from_pem(issued.chain_pem, request_for_reviews.private_key_pem, ca.trust_bundle_pem)
    assert identity.spiffe_id == REVIEWS.uri and identity.serial == format(issued.serial, "x")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    identity.load_into(context)
    assert len(context.get_ca_certs()) == 1
    assert "PRIVATE KEY" not in str(identity.dump())


# ---- tokens


def test_tokens_file_keeps_hashes_and_authorize_is_precise(tmp_path):
    path = tmp_path / "tokens.json"
    namespace_token = create_token(path, namespace="tutorial")
    reviews_token = create_token(path, namespace="tutorial", service_account="reviews")
    admin_token = create_token(path, admin=True)
    text = path.read_text()
    assert namespace_token not in text and reviews_token not in text and admin_token not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    book = TokenBook(path)
    ratings = SpiffeId.of(TD, "tutorial", "ratings")
    billing = SpiffeId.of(TD, "finance", "billing")

    def decide(requested, token="", peer=None):
        return authorize(requested, peer=peer, token=token, grant=book.lookup(token))

    assert decide(REVIEWS, namespace_token) == Authorized(REVIEWS, "token")
    assert decide(ratings, namespace_token) == Authorized(ratings, "token")
    assert decide(REVIEWS, reviews_token) == Authorized(REVIEWS, "token")
    refused = decide(ratings, reviews_token)
    assert isinstance(refused, Refused) and refused.code == "PERMISSION_DENIED" and "tutorial/reviews" in refused.message
    refused = decide(billing, namespace_token)
    assert refused == Refused("PERMISSION_DENIED", "the bootstrap token grants namespace 'tutorial', not 'finance'")
    assert decide(REVIEWS, "wrong").code == "UNAUTHENTICATED"
    assert decide(REVIEWS).code == "UNAUTHENTICATED"
    assert decide(REVIEWS, admin_token).code == "PERMISSION_DENIED"
    # a renewal: the certificate proves the identity it names, and only that one
    assert decide(REVIEWS, peer=REVIEWS) == Authorized(REVIEWS, "certificate")
    assert decide(ratings, peer=REVIEWS).code == "PERMISSION_DENIED"
    # a token removed from the file no longer works, without a restart
    create_token(path, namespace="other")  # rewrite, then drop the namespace token by hand
    import json

    data = json.loads(path.read_text())
    data["tokens"] = [t for t in data["tokens"] if t.get("namespace") != "tutorial" or t.get("service_account")]
    path.write_text(json.dumps(data))
    assert decide(REVIEWS, namespace_token).code == "UNAUTHENTICATED"
    # a file that stops parsing keeps the last good grants
    path.write_text("{not json")
    assert decide(REVIEWS, reviews_token) == Authorized(REVIEWS, "token")
    assert "not JSON" in book.last_error
