"""Helpers for control-plane tests: an in-process control plane on 127.0.0.1:0, raw protocol peers,
and a proxy-side callback that compiles like the runner does."""

from __future__ import annotations

import struct
from typing import Any, Callable

import structlog
import trio

from controlplane.framed import FramedStream
from controlplane.server import ControlPlane, ServerOptions
from controlplane.store import ConfigStore
from controlplane.wire import Hello, Message, Snapshot, Welcome
from proxy.config.compile import compile_resources

FAST = dict(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0, grace_period_s=0.5, debounce_quiet_s=0.05,
            debounce_max_s=0.5, poll_interval_s=0.1, push_concurrency=8)


async def start_plane(nursery: trio.Nursery, store: ConfigStore, *, port: int = 0, **options: Any) -> tuple[ControlPlane, int]:
    plane = ControlPlane(store, ServerOptions(**{**FAST, **options}), structlog.get_logger("test.controlplane"))
    port = await nursery.start(plane.serve, "127.0.0.1", port)
    return plane, port


async def wait_for(predicate: Callable[[], Any], timeout_s: float = 5.0, what: str = "condition") -> Any:
    with trio.move_on_after(timeout_s):
        while True:
            try:
                value = predicate()
            except KeyError:  # e.g. a proxy not registered yet
                value = None
            if value:
                return value
            await trio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def raw_connect(port: int) -> FramedStream:
    return FramedStream(await trio.open_tcp_stream("127.0.0.1", port))


async def raw_proxy(port: int, node_id: str = "raw", **hello: Any) -> tuple[FramedStream, Snapshot]:
    """A protocol-level proxy: Hello, Welcome, and the first (full) Snapshot, not yet answered."""
    framed = await raw_connect(port)
    await framed.send(Hello(node_id=node_id, **hello))
    welcome = await framed.receive()
    assert isinstance(welcome, Welcome), welcome
    snap = await next_snapshot(framed)
    assert snap.full
    return framed, snap


async def next_snapshot(framed: FramedStream, timeout_s: float = 5.0) -> Snapshot:
    """The next Snapshot, skipping heartbeats."""
    with trio.fail_after(timeout_s):
        while True:
            m: Message = await framed.receive()
            if isinstance(m, Snapshot):
                return m


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Compiling:
    """The runner's reload path in miniature: compile with the proxy's labels, record what it serves."""

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.labels = labels or {}
        self.applied: list[str] = []
        self.snapshot = None
        self.resources = []

    def __call__(self, resources, version: str) -> None:
        snapshot = compile_resources(resources, version=version, proxy_labels=self.labels)
        self.snapshot = snapshot
        self.resources = resources
        self.applied.append(version)
