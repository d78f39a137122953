"""What the mutual TLS rows of `python -m bench` share: the certificates, and the TLS bulk client.

The certificates: one ECDSA P-256 CA (trustme), a server certificate for MTLS_SERVER_NAME and a client
certificate, written as PEM files that both proxies load. The bulk client uploads over mutual TLS to a
proxy terminating it into a tcp route to the counting sink (bench.l4_bench); it runs as its own process
(`python -m bench.mtls upload ...`) with an OpenSSL config that offers TLS 1.3's AES-128-GCM suite only,
the one nginx offers in the HTTP rows, because Python's ssl module cannot choose TLS 1.3 suites.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

from bench.l4_bench import MiB
from bench.targets import MTLS_SERVER_NAME

REPO = Path(__file__).resolve().parent.parent
TLS13_SUITE = "TLS_AES_128_GCM_SHA256"
_CHUNK = memoryview(os.urandom(MiB))
_IO_TIMEOUT_S = 60.0
# the OpenSSL config of the bulk client: its default contexts offer one TLS 1.3 suite
_OPENSSL_CONF = f"""\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_section
[ssl_section]
system_default = system_default_section
[system_default_section]
Ciphersuites = {TLS13_SUITE}
"""


@dataclass(frozen=True)
class MeshCertificates:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def client_context(self) -> ssl.SSLContext:
        """A TLS 1.3 client context presenting the client certificate and verifying the server's against
        the CA (the name is not checked: readiness probes dial 127.0.0.1)."""
        context = ssl.create_default_context(cafile=self.ca)
        context.check_hostname = False
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.client_cert, self.client_key)
        return context


def write_certificates(directory: Path) -> MeshCertificates:
    """A fresh ECDSA P-256 CA with a server and a client certificate, as PEM files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    ca.cert_pem.write_to_path(directory / "ca.crt")
    paths = []
    for name, identity in (("server", MTLS_SERVER_NAME), ("client", f"client.{MTLS_SERVER_NAME}")):
        leaf = ca.issue_cert(identity, key_type=trustme.KeyType.ECDSA)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(cert)
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(cert, append=True)
        leaf.private_key_pem.write_to_path(key)
        paths += [str(cert), str(key)]
    return MeshCertificates(str(directory / "ca.crt"), *paths)


def negotiated(port: int, certs: MeshCertificates) -> str:
    """What a TLS 1.3 client offering TLS13_SUITE (as the bench's clients do) gets from the server on
    `port`: protocol, suite and key exchange group, from `openssl s_client`'s own report."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", MTLS_SERVER_NAME,
           "-tls1_3", "-ciphersuites", TLS13_SUITE, "-cert", certs.client_cert, "-key", certs.client_key,
           "-CAfile", certs.ca, "-brief"]
    try:
        out = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=10).stderr
    except subprocess.TimeoutExpired:
        return "no answer from openssl s_client"
    wanted = ("Protocol version:", "Ciphersuite:", "Negotiated TLS1.3 group:", "Server Temp Key:",
              "Verification:")
    return "; ".join(line.strip() for line in out.splitlines() if line.strip().startswith(wanted))


def resumes(port: int, certs: MeshCertificates) -> bool:
    """Whether the server on `port` lets a client resume: a second connection offers the session of
    the first (a GET each; the tickets arrive ahead of the response) and says whether it resumed."""
    context = certs.client_context()
    session, reused = None, False
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=MTLS_SERVER_NAME, session=session) as tls:
                tls.sendall(b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):
                    pass
                reused, session = tls.session_reused, tls.session
    return reused


# --- the bulk client ------------------------------------------------------------------------------


def upload_tls(port: int, size: int, context: ssl.SSLContext) -> None:
    """One mutual TLS connection: send `size` bytes, then close_notify and FIN (the proxy passes the end
    on to the sink as a half-close), then read the sink's count through the same TLS connection (TLS 1.3
    lets the server go on sending after the client's close_notify). SSLObject over memory BIOs, since
    ssl.SSLSocket cannot send close_notify and keep reading."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=MTLS_SERVER_NAME)
    with socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT_S) as sock:

        def flush() -> None:
            if outgoing.pending:
                sock.sendall(outgoing.read())

        def receive() -> bool:
            data = sock.recv(256 * 1024)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                if not receive():
                    raise ConnectionError("the proxy closed the connection during the handshake") from None
        flush()
        left = size
        while left:
            n = min(left, len(_CHUNK))
            tls.write(_CHUNK[:n])
            flush()
            left -= n
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify sent; the server's comes after its count
        flush()
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            try:
                reply += tls.read(8 - len(reply))
            except ssl.SSLWantReadError:
                if not receive():
                    break
            except ssl.SSLZeroReturnError:
                break
    if int.from_bytes(reply, "big") != size:
        raise RuntimeError(f"sink counted {int.from_bytes(reply, 'big')} bytes, sent {size}")


@dataclass(frozen=True)
class BulkRun:
    bytes: int
    wall_s: float


def run_bulk_client(port: int, size: int, count: int, certs_dir: Path, *, cpus: str | None) -> BulkRun:
    """`count` sequential uploads of `size` bytes over mutual TLS through `port`, in a child process
    (pinned to `cpus`) whose OpenSSL offers TLS13_SUITE only; its own wall time of the uploads."""
    conf = certs_dir / "bulk-client-openssl.cnf"
    conf.write_text(_OPENSSL_CONF)
    cmd = (["taskset", "-c", cpus] if cpus else []) + [
        sys.executable, "-m", "bench.mtls", "upload", str(port), str(size), str(count), str(certs_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OPENSSL_CONF=str(conf)),
                         timeout=count * (_IO_TIMEOUT_S + 5) + 30)
    if out.returncode != 0:
        raise RuntimeError(f"bulk client failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return BulkRun(size * count, float(out.stdout.split()[-1]))


def certificates_in(directory: Path) -> MeshCertificates:
    """The files write_certificates wrote in `directory`."""
    return MeshCertificates(*(str(directory / name) for name in
                              ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mtls", description="the mutual TLS bulk client")
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="sequential uploads; prints the wall seconds they took")
    up.add_argument("port", type=int)
    up.add_argument("size", type=int)
    up.add_argument("count", type=int)
    up.add_argument("certs_dir", type=Path)
    args = ap.parse_args(argv)
    context = certificates_in(args.certs_dir).client_context()
    started = time.perf_counter()
    for _ in range(args.count):
        upload_tls(args.port, args.size, context)
    print(f"{time.perf_counter() - started:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
