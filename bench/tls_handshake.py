"""Server-side CPU of one mesh mutual TLS handshake through the data path's own `TlsConn`:

    python -m bench.tls_handshake [--handshakes N] [--rounds R] [--gateway] [--source DIR ...]

A sidecar's inbound context (`proxy.tls.mesh.server_context`, a workload certificate from the mesh
CA: ECDSA P-256 with a SPIFFE URI SAN, client certificate required) terminates N handshakes on
127.0.0.1, one connection after another, each followed by reading the peer's SPIFFE ID (what an
inbound connection does before its first request), on the worker's reactor and timeout sweeper as
the data path runs its connections. `--gateway`: a Gateway server in MUTUAL mode
instead (`proxy.tls.context.server_context` from the same certificate files, TLS 1.3, client
certificate required). Both send OpenSSL's default two TLS 1.3 session tickets, as the `make
bench` mtls rows' server does (the mesh context since its sessions resume: proxy/tls/sessions.py). The client is the stdlib's TLS with its own
workload certificate, in another thread: only the server thread's CPU is counted
(`time.thread_time`), so the figure is what the proxy pays per new connection for TLS, Python and
library together. `--source DIR` measures another checkout's `proxy/` too (for instance the
version before a change, exported with `git archive`); rounds alternate the checkouts, each round a
fresh process, and the median of the rounds is printed per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _identity(ca, namespace: str, service_account: str):
    from proxy.identity.csr import new_key_and_request
    from proxy.identity.spiffe import SpiffeId
    from proxy.identity.workload import WorkloadIdentity

    spiffe = SpiffeId("cluster.local", namespace, service_account)
    request = new_key_and_request(spiffe)
    issued = ca.issue(request.csr_pem, spiffe, 3600)
    return WorkloadIdentity.from_pem(issued.chain_pem, request.private_key_pem, ca.trust_bundle_pem)


def write_identity(directory: Path, name: str, identity) -> None:
    """A workload identity as the PEM files `<name>.chain`, `<name>.key` and `trust.pem`."""
    (directory / f"{name}.chain").write_bytes(identity.certificate_chain_pem)
    (directory / f"{name}.key").write_bytes(identity.private_key_pem)
    (directory / "trust.pem").write_bytes(identity.trust_bundle_pem)


def server_context_from_files(directory: Path, gateway: bool):
    """The measured server's context from `server.chain`, `server.key` and `trust.pem`: a sidecar's
    inbound mesh context, or with `gateway` a MUTUAL Gateway server's (TLS 1.3, HTTP/1.1, OpenSSL's
    two session tickets)."""
    from proxy.identity.workload import WorkloadIdentity
    from proxy.tls import mesh
    from proxy.tls.context import ProtocolVersions, server_context as gateway_context

    chain, key, trust = directory / "server.chain", directory / "server.key", directory / "trust.pem"
    if gateway:
        return gateway_context(str(chain), str(key), ca_file=str(trust), require_client_certificate=True,
                               versions=ProtocolVersions("TLSV1_3", "TLSV1_3"), alpn=("http/1.1",))
    return mesh.server_context(WorkloadIdentity.from_pem(chain.read_bytes(), key.read_bytes(), trust.read_bytes()))


# the data path's connections: a stream idle timeout, the default
IDLE_TIMEOUT_S = 300.0


def data_path_io(nursery):
    """(reactor, sweeper) as a worker runs its connections on (proxy/l7/dataplane.py), started in `nursery`."""
    from proxy.l7.reactor import Reactor
    from proxy.l7.timeouts import TimeoutSweeper

    reactor, sweeper = Reactor(), TimeoutSweeper(IDLE_TIMEOUT_S)
    reactor.ensure_running(nursery)
    sweeper.ensure_running(nursery)
    return reactor, sweeper


def measure(handshakes: int, gateway: bool = False) -> dict:
    """One run in this process: µs of server-thread CPU per handshake (+ principal)."""
    import trio

    from controlplane.ca import CertificateAuthority
    from proxy.tls import mesh
    from proxy.tls.conn import TlsConn
    from proxy.tls.listener import HANDSHAKE_TIMEOUT_S

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp) / "ca", "cluster.local")
        client_identity = _identity(ca, "bar", "client")
        write_identity(Path(tmp), "server", _identity(ca, "foo", "server"))
        server_context = server_context_from_files(Path(tmp), gateway)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_identity.load_into(client_context)
    client_context.check_hostname = False
    client_context.set_alpn_protocols([mesh.ISTIO_HTTP1])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    principals: list = []

    def clients() -> None:
        for _ in range(handshakes + 1):  # the first one warms up (imports, first-use paths)
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with client_context.wrap_socket(raw, server_hostname="outbound_.8080_._.server") as tls:
                    tls.recv(1)  # the server's close

    async def serve() -> float:
        total = 0.0
        async with trio.open_nursery() as nursery:
            reactor, sweeper = data_path_io(nursery)
            for i in range(handshakes + 1):
                sock, _ = await trio.to_thread.run_sync(listener.accept)
                start = time.thread_time()
                conn = TlsConn(sock, server_context, server_side=True, reactor=reactor, sweeper=sweeper,
                               idle_s=IDLE_TIMEOUT_S)
                await conn.handshake(HANDSHAKE_TIMEOUT_S)
                principals.append(conn.peer_principal())
                conn.close()
                if i:
                    total += time.thread_time() - start
            nursery.cancel_scope.cancel()
        return total

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    total = trio.run(serve)
    thread.join(10)
    listener.close()
    assert principals[-1] == "cluster.local/ns/bar/sa/client", principals[-1]
    return {"us_per_handshake": 1e6 * total / handshakes, "library": _library_name()}


def _library_name() -> str:
    try:
        from proxy.tls.openssl import library
    except ImportError:
        return ssl.OPENSSL_VERSION + " (stdlib ssl)"
    return library().version_text


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_handshake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gateway", action="store_true", help="a MUTUAL Gateway server instead of a sidecar's")
    parser.add_argument("--source", type=Path, action="append", default=[],
                        help="another checkout to measure as well (repeatable)")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # one measured process
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(args.handshakes, args.gateway)))
        return
    here = Path(__file__).resolve().parent.parent
    sources = [here] + [s.resolve() for s in args.source]
    results: dict[Path, list[dict]] = {s: [] for s in sources}
    for round_ in range(args.rounds):
        for source in sources if round_ % 2 == 0 else list(reversed(sources)):
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run",
                                   "--handshakes", str(args.handshakes)] + (["--gateway"] if args.gateway else []),
                                  env=dict(os.environ, PYTHONPATH=str(source)), capture_output=True, text=True,
                                  timeout=600, cwd=source)
            if done.returncode != 0:
                raise SystemExit(f"{source}: {done.stderr[-2000:]}")
            results[source].append(json.loads(done.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()[0]
    for source, runs in results.items():
        figures = sorted(r["us_per_handshake"] for r in runs)
        kind = "MUTUAL gateway" if args.gateway else "mesh mTLS"
        print(f"{source}: {statistics.median(figures):.0f} µs server CPU per {kind} handshake "
              f"(median of {len(figures)} runs of {args.handshakes}; runs {figures[0]:.0f}-{figures[-1]:.0f}; "
              f"{runs[0]['library']}; load average {load:.1f})")


if __name__ == "__main__":
    main()
