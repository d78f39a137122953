"""What mesh mTLS costs a TCP connection between two sidecars, plaintext beside it, on loopback:

    python -m bench.mesh_tcp [--connections 200] [--bulk-mib 32] [--rounds 3]

Both sidecars run in this process as the tests run them (proxy/l4/transparent.py's capture server,
handed each accepted connection with the original destination iptables would have recorded), with
a TCP echo app behind the server sidecar and the client in the same Trio run. Two setups:

- `plaintext`: the endpoint has no `security.istio.io/tlsMode` label, so the client sidecar splices
  in plaintext and the server sidecar (PeerAuthentication DISABLE) passes it through;
- `mtls`: auto mTLS (label set, STRICT on the server): TLS handshake with workload certificates
  from a mesh CA, the TCP peer exchange, and the copy pump through OpenSSL on both sidecars.

Reported per setup: process CPU (time.process_time: both sidecars, the app and the client
together, so the difference between setups is what mTLS adds) per connection (connect, 100 bytes
echoed, close) and per MiB of a bulk transfer echoed back; wall time per connection. Rounds
alternate the setups; the median is reported. Bounded: `--connections` and `--bulk-mib` per round.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import trio

from controlplane.ca import CertificateAuthority
from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.identity.csr import new_key_and_request
from proxy.identity.holder import IdentityHolder
from proxy.identity.spiffe import SpiffeId
from proxy.identity.workload import WorkloadIdentity
from proxy.l4.addrs import ClientAddr, LocalAddr, OrigDstAddr
from proxy.l4.original_dst import TransparentConnection
from proxy.l4.transparent import CaptureServer
from proxy.l7.dataplane import DataPlane
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from proxy.telemetry.istio_metrics import IstioMetrics
from proxy.telemetry.peer import identity_from_labels

MiB = 1 << 20

SIDECAR = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {app}, namespace: bench}}
spec:
  workloadSelector: {{labels: {{app: {app}}}}}
  ingress:
  - port: {{number: 9000, protocol: HTTP, name: main}}
    defaultEndpoint: 127.0.0.1:{app_port}
    captureMode: IPTABLES
  egress: [{{hosts: ["*/*"], captureMode: IPTABLES}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {app}, namespace: bench}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  mtls: {{mode: {mode}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: bench}}
spec:
  hosts: [echo.bench]
  addresses: [240.0.0.10]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {server_port}}}, labels: {{app: echo{tls_label}}}}}]
"""


def _issue(ca: CertificateAuthority, service_account: str) -> WorkloadIdentity:
    spiffe = SpiffeId("cluster.local", "bench", service_account)
    request = new_key_and_request(spiffe)
    return WorkloadIdentity.from_pem(ca.issue(request.csr_pem, spiffe, 3600).chain_pem, request.private_key_pem,
                                     ca.trust_bundle_pem)


def _listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _hand_over(listener: socket.socket, server: CaptureServer, name: str, orig_dst: OrigDstAddr,
                     nursery: trio.Nursery) -> None:
    while True:
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
        sock.setblocking(False)
        conn = TransparentConnection(sock, ClientAddr.from_sockaddr(sock.getpeername()),
                                     LocalAddr.from_sockaddr(sock.getsockname()), orig_dst, redirected=True)
        nursery.start_soon(server._handle, name, conn)


def _sidecar(app: str, text: str, identity: WorkloadIdentity, nursery: trio.Nursery) -> CaptureServer:
    labels = {"app": app, "version": "v1"}
    snapshot = compile_resources(load_bytes(text, f"{app}.yaml"), version="1", proxy_labels=labels,
                                 proxy_namespace="bench")
    stats = Stats()
    plane = DataPlane(SnapshotHolder(snapshot), stats,
                      telemetry=IstioMetrics(stats, identity_from_labels("bench", labels, f"{app}-v1")))
    plane.workload_identity = IdentityHolder()
    plane.workload_identity.swap(identity)
    return CaptureServer(plane, stats, nursery)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(256 * 1024):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def _run_setup(mtls: bool, ca: CertificateAuthority, connections: int, bulk_mib: int) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        app = (await nursery.start(trio.serve_tcp, _echo, 0))[0].socket.getsockname()[1]
        server_listener, client_listener = _listener(), _listener()
        server_port, client_port = server_listener.getsockname()[1], client_listener.getsockname()[1]
        text = SIDECAR.format(app="{app}", app_port=app, mode="STRICT" if mtls else "DISABLE", server_port=server_port,
                              tls_label=", security.istio.io/tlsMode: istio" if mtls else "")
        server = _sidecar("echo", text.replace("{app}", "echo"), _issue(ca, "echo"), nursery)
        client = _sidecar("sleep", text.replace("{app}", "sleep"), _issue(ca, "sleep"), nursery)
        nursery.start_soon(_hand_over, server_listener, server, "virtualInbound", OrigDstAddr("127.0.0.1", 9000),
                           nursery)
        nursery.start_soon(_hand_over, client_listener, client, "virtualOutbound", OrigDstAddr("240.0.0.10", 7000),
                           nursery)
        message = b"x" * 100
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(connections):
            async with await trio.open_tcp_stream("127.0.0.1", client_port) as stream:
                await stream.send_all(message)
                got = b""
                while len(got) < len(message):
                    got += await stream.receive_some(4096)
        per_connection_cpu = (time.process_time() - cpu) / connections
        per_connection_wall = (time.perf_counter() - wall) / connections
        chunk = b"y" * (256 * 1024)
        total = bulk_mib * MiB
        async with await trio.open_tcp_stream("127.0.0.1", client_port) as stream:
            cpu = time.process_time()

            async def upload() -> None:
                for _ in range(total // len(chunk)):
                    await stream.send_all(chunk)

            async with trio.open_nursery() as transfer:
                transfer.start_soon(upload)
                received = 0
                while received < total:
                    received += len(await stream.receive_some(1 << 20))
            per_mib_cpu = (time.process_time() - cpu) / bulk_mib
        nursery.cancel_scope.cancel()
    server_listener.close()
    client_listener.close()
    return {"cpu_ms_per_connection": per_connection_cpu * 1e3, "wall_ms_per_connection": per_connection_wall * 1e3,
            "cpu_ms_per_mib": per_mib_cpu * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--bulk-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp) / "ca", "cluster.local")
        results: dict[str, list[dict[str, float]]] = {"plaintext": [], "mtls": []}
        for _ in range(args.rounds):
            for name in ("plaintext", "mtls"):
                results[name].append(trio.run(_run_setup, name == "mtls", ca, args.connections, args.bulk_mib))
    print(f"TCP between two in-process sidecars, {args.connections} connections + {args.bulk_mib} MiB echoed, "
          f"median of {args.rounds} rounds (CPU: both sidecars, the app and the client together)")
    for name, rounds in results.items():
        medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"  {name:9}  {medians['cpu_ms_per_connection']:7.3f} ms CPU/connection  "
              f"{medians['wall_ms_per_connection']:7.3f} ms wall/connection  {medians['cpu_ms_per_mib']:7.3f} ms CPU/MiB")


if __name__ == "__main__":
    main()
