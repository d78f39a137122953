"""Istio's TCP metrics for a Gateway TCP route: real sockets on 127.0.0.1, an echo backend, a
client that sends, reads the echo back and closes."""

from __future__ import annotations

import socket
from functools import partial

import trio

from proxy.l4.gateway_tcp import GatewayTcpServer
from proxy.l7.dataplane import DataPlane
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats, merge
from proxy.telemetry.istio_metrics import IstioMetrics
from proxy.telemetry.peer import identity_from_labels
from tests.config.helpers import compile_docs, doc

GATEWAY = identity_from_labels("istio-system", {"app": "istio-ingressgateway"}, "istio-ingressgateway")


async def _echo(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def test_tcp_connections_and_bytes(nursery) -> None:
    [echo] = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    echo_port = echo.socket.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    snapshot = compile_docs(
        doc("Gateway", "gw", {"servers": [{"port": {"number": port, "name": "tcp", "protocol": "TCP"}, "hosts": ["*"]}]},
            namespace="shop"),
        doc("ServiceEntry", "echo", {"hosts": ["tcp-echo"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                     "ports": [{"number": 9000, "name": "tcp", "protocol": "TCP"}],
                                     "endpoints": [{"address": "127.0.0.1", "ports": {"tcp": echo_port},
                                                    "labels": {"app": "tcp-echo", "version": "v1"}}]},
            namespace="shop"),
        doc("VirtualService", "echo", {"hosts": ["*"], "gateways": ["gw"],
                                       "tcp": [{"route": [{"destination": {"host": "tcp-echo", "port": {"number": 9000}}}]}]},
            namespace="shop"))
    stats = Stats()
    plane = DataPlane(SnapshotHolder(snapshot), stats, telemetry=IstioMetrics(stats, GATEWAY))
    server = GatewayTcpServer(plane, stats, nursery)
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", port))
    sock.listen(16)
    [listener] = snapshot.listeners
    await nursery.start(server.serve, sock, listener.name)
    for size in (10, 1000):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"x" * size)
        got = b""
        while len(got) < size:
            got += await stream.receive_some(65536)
        await stream.aclose()
    with trio.fail_after(5):
        while True:  # the proxy counts a connection once both of its sides are closed
            merged = merge([stats.export()])
            closed = [v for (_, name, _), v in merged.items() if name == "istio_tcp_connections_closed_total"]
            if closed == [2]:
                break
            await trio.sleep(0.02)
    rows = {name: (dict(labels), value) for (_, name, labels), value in merged.items() if name.startswith("istio_tcp")}
    labels, opened = rows["istio_tcp_connections_opened_total"]
    assert opened == 2
    assert rows["istio_tcp_received_bytes_total"][1] == 1010 and rows["istio_tcp_sent_bytes_total"][1] == 1010
    assert {k: labels[k] for k in ("reporter", "source_workload", "source_workload_namespace", "destination_app",
                                   "destination_version", "destination_workload", "destination_service",
                                   "request_protocol", "connection_security_policy")} == {
        "reporter": "source", "source_workload": "istio-ingressgateway", "source_workload_namespace": "istio-system",
        "destination_app": "tcp-echo", "destination_version": "v1", "destination_workload": "unknown",
        "destination_service": "tcp-echo.shop.svc.cluster.local", "request_protocol": "tcp",
        "connection_security_policy": "unknown"}
