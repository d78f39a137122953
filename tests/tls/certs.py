"""Certificates from a trustme CA written to files, as a gateway reads them; a TCP pair on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str
    ca: str


def write_cert(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> CertFiles:
    """A leaf certificate for `hosts` signed by `ca`, as files `<name>.crt`/`<name>.key` plus the CA."""
    leaf = ca.issue_cert(*hosts)
    cert, key, ca_file = directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt"
    leaf.cert_chain_pems[0].write_to_path(cert)
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(cert, append=True)
    leaf.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_file)
    return CertFiles(str(cert), str(key), str(ca_file))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair of TCP sockets on 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def stdlib_mesh_context(identity, *, server_side: bool, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """The other end of a mesh mTLS hop built with the stdlib (as another sidecar would be): the
    workload certificate presented, the trust bundle required of the peer, Istio's ALPN ids. The
    proxy's own contexts (proxy.tls.mesh) are the data path's library, not `ssl.SSLContext`s."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    identity.load_into(context)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(alpn))
    return context
