"""User-space instructions a server spends per mutual TLS handshake through `TlsConn`, counted by
callgrind, and how many of them are OpenSSL's own (`SSL_do_handshake`):

    python -m bench.tls_handshake_instructions [--gateway] [--source DIR] [--keep-output DIR]

The server (bench.tls_handshake's contexts: a sidecar's mesh mTLS, or with `--gateway` a MUTUAL
Gateway server; both send OpenSSL's two stateless tickets, the mesh one since its sessions resume,
proxy/tls/sessions.py) accepts connections one after another,
handshakes, reads the peer's SPIFFE ID and closes, with the worker's reactor and timeout sweeper as
the data path has them, under callgrind; the client (the stdlib's TLS with
its workload certificate) is another process, so only the server is counted. Two runs of 5 and 55
handshakes; the difference of their totals divided by 50 is one handshake's cost. Unlike
bench.tls_handshake's CPU time, the count hardly moves with the machine's load (the interleaving
with the client moves it by about 0.5%). `--source DIR` measures another checkout's `proxy/`.
`--keep-output DIR` keeps callgrind's two output files there (`callgrind.5`, `callgrind.55`, under a
directory per checkout when there are several), to read one handshake by function: `callgrind_annotate
--inclusive=yes` (and without it, self) on each, and the difference of the two divided by 50.
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

FIRST, SECOND = 5, 55
HERE = Path(__file__).resolve()


def _prepare(directory: Path) -> None:
    """The CA's server and client identities as PEM files (made once, read by both processes)."""
    from bench.tls_handshake import _identity, write_identity
    from controlplane.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(directory / "ca", "cluster.local")
    for name, namespace in (("server", "foo"), ("client", "bar")):
        write_identity(directory, name, _identity(ca, namespace, name))


def _client(directory: Path, port: int, handshakes: int) -> None:
    from proxy.tls.mesh import ISTIO_HTTP1

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(str(directory / "client.chain"), str(directory / "client.key"))
    context.load_verify_locations(str(directory / "trust.pem"))
    context.check_hostname = False
    context.set_alpn_protocols([ISTIO_HTTP1])
    for _ in range(handshakes):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with context.wrap_socket(raw, server_hostname="outbound_.8080_._.server") as tls:
                tls.recv(1)  # the server's close


def _serve(directory: Path, handshakes: int, gateway: bool) -> None:
    """The process callgrind counts."""
    import trio

    from bench.tls_handshake import IDLE_TIMEOUT_S, data_path_io, server_context_from_files
    from proxy.tls.conn import TlsConn
    from proxy.tls.listener import HANDSHAKE_TIMEOUT_S

    context = server_context_from_files(directory, gateway)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = subprocess.Popen([sys.executable, str(HERE), "--client", str(directory), str(listener.getsockname()[1]),
                               str(handshakes)])

    async def serve() -> str | None:
        principal = None
        async with trio.open_nursery() as nursery:
            reactor, sweeper = data_path_io(nursery)
            for _ in range(handshakes):
                await trio.lowlevel.wait_readable(listener)
                sock, _ = listener.accept()
                conn = TlsConn(sock, context, server_side=True, reactor=reactor, sweeper=sweeper,
                               idle_s=IDLE_TIMEOUT_S)
                await conn.handshake(HANDSHAKE_TIMEOUT_S)
                principal = conn.peer_principal()
                conn.close()
            nursery.cancel_scope.cancel()
        return principal

    principal = trio.run(serve)
    if client.wait(60) != 0 or principal != "cluster.local/ns/bar/sa/client":
        raise SystemExit(f"the handshakes failed (client exit {client.returncode}, principal {principal})")


def _inclusive(callgrind_file: Path, function: str) -> int:
    shown = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(callgrind_file)],
                           capture_output=True, text=True, check=True).stdout
    for line in shown.splitlines():
        match = re.match(r"\s*([\d,]+) \(.*?\)\s+\S*:" + re.escape(function) + r" ", line)
        if match:
            return int(match.group(1).replace(",", ""))
    return 0


def measure(source: Path, directory: Path, gateway: bool, keep_output: Path | None = None) -> tuple[float, float]:
    """(instructions per handshake, of which SSL_do_handshake) for the checkout `source`; callgrind's
    files are left in `keep_output` when given."""
    from bench.tls_instructions import count_instructions

    counts = {}
    for handshakes in (FIRST, SECOND):
        out = (keep_output or directory) / f"callgrind.{handshakes}"
        total = count_instructions([str(HERE), "--serve", str(directory), str(handshakes)]
                                   + (["--gateway"] if gateway else []), source, out)
        counts[handshakes] = (total, _inclusive(out, "SSL_do_handshake"))
    per = SECOND - FIRST
    return ((counts[SECOND][0] - counts[FIRST][0]) / per, (counts[SECOND][1] - counts[FIRST][1]) / per)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        _client(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        _serve(Path(sys.argv[2]), int(sys.argv[3]), "--gateway" in sys.argv[4:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.tls_handshake_instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="store_true", help="a MUTUAL Gateway server instead of a sidecar's")
    parser.add_argument("--source", type=Path, action="append", default=[],
                        help="another checkout to measure as well (repeatable)")
    parser.add_argument("--keep-output", type=Path, metavar="DIR", help="keep callgrind's output files in DIR")
    args = parser.parse_args()
    sources = [HERE.parent.parent] + [s.resolve() for s in args.source]
    kind = "MUTUAL gateway" if args.gateway else "mesh mTLS"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _prepare(directory)
        for i, source in enumerate(sources):
            keep = None
            if args.keep_output is not None:
                keep = args.keep_output.resolve() if len(sources) == 1 else args.keep_output.resolve() / str(i)
                keep.mkdir(parents=True, exist_ok=True)
            total, openssl = measure(source, directory, args.gateway, keep)
            print(f"{source}: {total:,.0f} instructions per {kind} handshake (server, callgrind, user space), "
                  f"of which OpenSSL's SSL_do_handshake {openssl:,.0f}, the rest {total - openssl:,.0f}")


if __name__ == "__main__":
    main()
