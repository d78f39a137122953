"""Real TCP endpoints on 127.0.0.1 for the L4 tests: a scripted upstream server and our proxy."""

from __future__ import annotations

import os
import shutil
from contextlib import asynccontextmanager
from functools import partial
from typing import AsyncIterator, Awaitable, Callable

import pytest
import trio

from proxy.l4.addrs import UpstreamAddr
from proxy.l4.original_dst import TransparentConnection, open_listener, serve_transparent
from proxy.l4.tcp_proxy import CopyMode, TcpProxyResult, TcpProxyStats, proxy_to_upstream

StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root")


def needs_tool(command: str, package: str) -> pytest.MarkDecorator:
    """Skip (saying why) when a client tool is missing on a developer's machine; in CI (CI set) never
    skip: the test runs and fails, because CI installs its tools and a silent skip would hide that."""
    missing = shutil.which(command) is None and not os.environ.get("CI")
    return pytest.mark.skipif(missing, reason=f"{command} is not installed (Debian package {package}; `make system-deps`)")


@asynccontextmanager
async def tcp_server(handler: StreamHandler) -> AsyncIterator[int]:
    """Serve `handler` on 127.0.0.1:0; yields the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def l4_proxy(
    upstream_port: int,
    *,
    mode: CopyMode,
    idle_timeout_s: float | None = 30.0,
    connect_timeout_s: float = 5.0,
    stats: TcpProxyStats | None = None,
    downstream_prefix: bytes = b"",
) -> AsyncIterator[tuple[int, trio.MemoryReceiveChannel[TcpProxyResult]]]:
    """Our TCP proxy on 127.0.0.1:0 forwarding to 127.0.0.1:upstream_port; yields (port, results)."""
    listener = open_listener("127.0.0.1", 0)
    send, receive = trio.open_memory_channel[TcpProxyResult](100)

    async def handle(conn: TransparentConnection) -> None:
        result = await proxy_to_upstream(
            conn.sock,
            UpstreamAddr("127.0.0.1", upstream_port),
            mode=mode,
            idle_timeout_s=idle_timeout_s,
            connect_timeout_s=connect_timeout_s,
            stats=stats,
            downstream_prefix=downstream_prefix,
        )
        send.send_nowait(result)

    with listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_transparent, listener, handle)
            yield listener.getsockname()[1], receive
            nursery.cancel_scope.cancel()


async def receive_all(stream: trio.abc.ReceiveStream, max_bytes: int = 1 << 30) -> bytes:
    """Everything until EOF (bounded)."""
    out = bytearray()
    while len(out) <= max_bytes:
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("more data than expected")
