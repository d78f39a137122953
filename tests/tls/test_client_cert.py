"""The x-forwarded-client-cert element a server-side TlsConn writes for its client's certificate,
checked against independent printings of the same certificate: the Subject as OpenSSL's own
`openssl x509 -nameopt RFC2253` prints it (Envoy prints it with BoringSSL's same function), including
attribute types no library names, an e-mail address, non-ASCII text and RFC 2253's special
characters; the Hash as the SHA-256 of the DER; the URI and DNS SANs in order."""

from __future__ import annotations

import datetime
import hashlib
import subprocess

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.tls.conn import TlsConn
from proxy.tls.context import client_context, server_context
from tests.tls.certs import tcp_pair

SUBJECT = x509.Name([
    x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Zoë & Co, \"Quoted\" + more"),
    x509.NameAttribute(x509.ObjectIdentifier("1.2.3.4"), "custom"),
    x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.com"),
    x509.NameAttribute(NameOID.SERIAL_NUMBER, "42"),
    x509.NameAttribute(NameOID.COMMON_NAME, "#client "),
])


def _certificate(tmp_path, name: str, subject: x509.Name, issuer_key, issuer: x509.Name, sans, *, ca: bool, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    certificate = builder.sign(issuer_key or key, hashes.SHA256())
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return certificate, str(cert_file), str(key_file), key


async def test_the_element_matches_independent_printings_of_the_certificate(tmp_path):
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert, ca_file, _, ca_key = _certificate(tmp_path, "ca", ca_name, None, ca_name, [], ca=True)
    _, server_cert, server_key, _ = _certificate(
        tmp_path, "server", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]), ca_key, ca_name,
        [x509.DNSName("example.com"), x509.UniformResourceIdentifier("spiffe://example.org/ns/a/sa/server")], ca=False)
    client, client_cert, client_key, _ = _certificate(
        tmp_path, "client", SUBJECT, ca_key, ca_name,
        [x509.UniformResourceIdentifier("spiffe://example.org/ns/b/sa/one"),
         x509.UniformResourceIdentifier("spiffe://example.org/ns/b/sa/two"), x509.DNSName("client.example.com")],
        ca=False)
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_cert, server_key, ca_file=ca_file,
                                                 require_client_certificate=True), server_side=True)
    peer = TlsConn(client_sock, client_context(ca_file=ca_file, cert_file=client_cert, key_file=client_key),
                   server_side=False, server_hostname="example.com")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake, 5.0)
        nursery.start_soon(peer.handshake, 5.0)
    element = server.client_cert_element(with_cert=False).decode("ascii")
    printed = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", client_cert],
                             capture_output=True, text=True, check=True).stdout.strip().removeprefix("subject=")
    der = client.public_bytes(serialization.Encoding.DER)
    assert element == (f"By=spiffe://example.org/ns/a/sa/server;Hash={hashlib.sha256(der).hexdigest()};"
                       f'Subject="{printed}";URI=spiffe://example.org/ns/b/sa/one;'
                       "URI=spiffe://example.org/ns/b/sa/two;DNS=client.example.com")
    assert "1.2.3.4=#0C06637573746F6D" in printed and "emailAddress=ops@example.com" in printed  # what is compared
    server.close()
    peer.close()
