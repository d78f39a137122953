"""Runs the real data plane (DataPlane + serve_listener on a real 127.0.0.1 socket) inside a test's
Trio loop, with a hand-built Snapshot so these tests exercise the HTTP pipeline and nothing else."""

from __future__ import annotations

import socket

import trio

from proxy.config.snapshot import (
    Cluster,
    Endpoint,
    Listener,
    Route,
    RouteDestination,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from proxy.l7.dataplane import DataPlane, HttpSettings
from proxy.l7.reactor import Reactor
from proxy.l7.server import serve_listener
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats

LISTENER = "127.0.0.1_test"


def prefix_route(prefix: bytes, clusters: dict[str, int], *, timeout_s: float | None = None) -> Route:
    """A route on a path prefix to weighted clusters {name: weight}."""
    dests = tuple(RouteDestination(name, w) for name, w in clusters.items())
    cumulative, total = [], 0
    for d in dests:
        total += d.weight
        cumulative.append(total)
    return Route(name=f"prefix {prefix!r}", virtual_service="test/vs",
                 matches=lambda head, p=prefix: head.path.startswith(p),
                 destinations=dests, cumulative_weights=tuple(cumulative), timeout_s=timeout_s)


def make_snapshot(clusters: dict[str, list[int]], routes: list[Route], *, domains=("*",), version="1",
                  lb_policy="ROUND_ROBIN", connect_timeout_s=1.0) -> Snapshot:
    built = {
        name: Cluster(name=name, service_host=name, port=80, subset="",
                      endpoints=tuple(Endpoint("127.0.0.1", p) for p in ports), lb_policy=lb_policy,
                      connect_timeout_s=connect_timeout_s)
        for name, ports in clusters.items()
    }
    vh = VirtualHost(name="vh", domains=tuple(domains), routes=tuple(routes))
    exact = {d.encode(): vh for d in domains if d != "*"}
    table = RouteTable(exact=exact, suffixes=(), catch_all=vh if "*" in domains else None)
    listener = Listener(name=LISTENER, address="127.0.0.1", port=0, protocol="HTTP", route_table=table)
    return Snapshot(version=version, listeners=(listener,), clusters=built)


class RunningProxy:
    def __init__(self, plane: DataPlane, port: int) -> None:
        self.plane = plane
        self.port = port

    @property
    def stats(self) -> Stats:
        return self.plane.stats

    def counter(self, name: str, **labels: str) -> int:
        return self.plane.stats.counter(name, **labels).value


async def start_proxy(nursery: trio.Nursery, snapshot: Snapshot, settings: HttpSettings | None = None,
                      access_log=None, reactor: Reactor | None = None) -> RunningProxy:
    """`reactor`: one made with other mode settings than the plane's own (tests of its modes)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    plane = DataPlane(SnapshotHolder(snapshot), Stats(), access_log, settings)
    if reactor is not None:
        plane.reactor = reactor
    await nursery.start(serve_listener, sock, LISTENER, plane)
    return RunningProxy(plane, port)


async def raw_exchange(port: int, data: bytes, *, read_timeout_s: float = 5.0, until_close: bool = True) -> bytes:
    """Send raw bytes, read until the proxy closes (or the timeout). For malformed-input tests."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(read_timeout_s):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    out += b"<RESET>"
                    break
                if not chunk:
                    break
                out += chunk
                if not until_close and b"\r\n\r\n" in out:
                    break
    return out


async def curl(*args: str, timeout_s: float = 20.0) -> tuple[int, str, str]:
    """Run the real curl; returns (exit code, stdout, stderr)."""
    with trio.fail_after(timeout_s):
        proc = await trio.run_process(["curl", "-sS", *args], capture_stdout=True, capture_stderr=True, check=False)
    return proc.returncode, proc.stdout.decode("latin-1"), proc.stderr.decode("latin-1")
