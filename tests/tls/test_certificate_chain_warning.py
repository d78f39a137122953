"""A certificate file is sent as it is (no automatic chain): one that ends with its leaf without the
leaf's issuer is logged once per load, naming the file and the issuer, and whether caCertificates
has that issuer; a complete chain, a leaf issued by a root in caCertificates, or a leaf loaded with
no CA file to tell its issuer by, is not."""

from __future__ import annotations

import structlog
import trustme

from proxy.tls.context import client_context, server_context


def _files(directory, *, with_intermediate: bool):
    """(leaf certificate file, key file, root file, root + intermediate file, the intermediate's name)."""
    directory.mkdir(exist_ok=True)
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("example.com")
    cert, key = directory / "leaf.crt", directory / "leaf.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    if with_intermediate:
        intermediate.cert_pem.write_to_path(cert, append=True)
    leaf.private_key_pem.write_to_path(key)
    root_only, root_and_intermediate = directory / "root.crt", directory / "root-and-intermediate.crt"
    root.cert_pem.write_to_path(root_only)
    root.cert_pem.write_to_path(root_and_intermediate)
    intermediate.cert_pem.write_to_path(root_and_intermediate, append=True)
    issuer = intermediate._certificate.subject.rfc4514_string()
    return str(cert), str(key), str(root_only), str(root_and_intermediate), issuer


def _chain_warnings(logs):
    return [entry for entry in logs if "does not hold its issuer" in entry["event"]]


def test_a_leaf_only_file_is_named_with_its_issuer_once_per_load(tmp_path):
    cert, key, root_only, root_and_intermediate, issuer = _files(tmp_path, with_intermediate=False)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):  # the config check, the listener, /certs: one warning for the one file
            server_context(cert, key, ca_file=root_and_intermediate, require_client_certificate=True)
    warnings = _chain_warnings(logs)
    assert len(warnings) == 1, logs
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["certificate"] == cert and warnings[0]["field"] == "serverCertificate"
    assert warnings[0]["missing_issuer"] == issuer
    assert warnings[0]["issuer_in_ca_certificates"] is True

    # a changed file is a new load: said again (a client certificate, its issuer not in the CA file)
    with open(cert, "ab") as f:
        f.write(b"\n")
    with structlog.testing.capture_logs() as logs:
        client_context(ca_file=root_only, cert_file=cert, key_file=key)
    warnings = _chain_warnings(logs)
    assert len(warnings) == 1 and warnings[0]["field"] == "clientCertificate", logs
    assert warnings[0]["missing_issuer"] == issuer
    assert warnings[0]["issuer_in_ca_certificates"] is False


def test_a_complete_chain_or_a_leaf_of_a_trusted_root_is_not_warned_about(tmp_path, ca):
    cert, key, root_only, _, _ = _files(tmp_path / "chain", with_intermediate=True)
    leaf = ca.issue_cert("example.com")  # issued by the root itself
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "leaf.crt")
    leaf.private_key_pem.write_to_path(tmp_path / "leaf.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    with structlog.testing.capture_logs() as logs:
        server_context(cert, key, ca_file=root_only, require_client_certificate=True)
        client_context(ca_file=root_only, cert_file=cert, key_file=key)
        server_context(str(tmp_path / "leaf.crt"), str(tmp_path / "leaf.key"), ca_file=str(tmp_path / "ca.crt"),
                       require_client_certificate=True)
        # no CA file to tell a root by: a leaf of a root (a private CA's usual chain) is taken as complete
        server_context(str(tmp_path / "leaf.crt"), str(tmp_path / "leaf.key"))
    assert _chain_warnings(logs) == [], logs
