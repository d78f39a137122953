"""Certificates from a trustme CA written to files, as a gateway reads them; a TCP pair on 127.0.0.1."""

from __future__ import annotations

import socket
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
