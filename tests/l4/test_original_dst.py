"""SO_ORIGINAL_DST and the transparent listener: direct connections, and REDIRECTed ones in a real namespace."""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio

from proxy.l4.addrs import ClientAddr, LocalAddr, OrigDstAddr
from proxy.l4.capture import iptables
from proxy.l4.capture.lab import open_lab
from proxy.l4.errors import OriginalDstUnavailable
from proxy.l4.original_dst import TransparentConnection, open_listener, original_dst, serve_transparent

from .harness import needs_root, needs_tool



async def _accept_one(listener: socket.socket, connect) -> TransparentConnection:  # noqa: ANN001
    """Serve `listener`, run `connect()` (returns a connected client socket), return what the
    handler saw for that connection (with SO_ORIGINAL_DST read inside the handler too)."""
    seen: list[tuple[TransparentConnection, object]] = []

    async def handle(conn: TransparentConnection) -> None:
        try:
            direct: object = original_dst(conn.sock)
        except OriginalDstUnavailable as exc:
            direct = exc
        seen.append((conn, direct))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_transparent, listener, handle, max_connections=1))
            client = await connect()
            with client:
                while not seen:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    conn, direct = seen[0]
    conn.sock.close()
    if conn.redirected:
        assert direct == conn.orig_dst
    else:
        assert isinstance(direct, OriginalDstUnavailable) or direct == conn.orig_dst
    return conn


async def test_direct_connection_is_not_redirected() -> None:
    listener = open_listener("127.0.0.1", 0)

    async def connect() -> trio.socket.SocketType:
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        return client

    port = listener.getsockname()[1]
    with listener:
        conn = await _accept_one(listener, connect)
    assert conn.redirected is False
    assert conn.local == LocalAddr("127.0.0.1", port)
    assert conn.orig_dst == OrigDstAddr("127.0.0.1", port)  # its own address: an outbound proxy must refuse it
    assert isinstance(conn.client, ClientAddr) and conn.client.ip == "127.0.0.1"


@needs_root
@needs_tool("ip", "iproute2")
@needs_tool("iptables-restore", "iptables")
@pytest.mark.parametrize(
    "family, listener_af",
    [(4, socket.AF_INET), (6, socket.AF_INET6), (4, socket.AF_INET6)],
    ids=["ipv4", "ipv6", "ipv4-on-dual-stack-listener"],
)
async def test_redirected_connection_reports_original_destination(family: int, listener_af: int) -> None:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with open_lab(["app", "server"]) as lab:
        server_ip = lab.node("server").ipv4 if family == 4 else lab.node("server").ipv6
        app_ip = lab.node("app").ipv4 if family == 4 else lab.node("app").ipv6
        listener = lab.socket("app", listener_af)
        if listener_af == socket.AF_INET6:
            # IPv4 arrives as ::ffff:a.b.c.d; SO_ORIGINAL_DST must still be asked at the IPv4 level
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("0.0.0.0" if listener_af == socket.AF_INET else "::", 0))
        listener.listen(16)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        # the app's connection to server:8080 is diverted to our listener, as the sidecar capture does
        iptables.restore(
            f"*nat\n-A OUTPUT -p tcp -d {server_ip} --dport 8080 -j REDIRECT --to-ports {port}\nCOMMIT\n",
            netns=lab.node("app").netns,
            family=family,  # type: ignore[arg-type]
        )

        async def connect() -> trio.socket.SocketType:
            client = trio.socket.from_stdlib_socket(lab.socket("app", af))
            await client.connect((server_ip, 8080))
            return client

        with listener:
            conn = await _accept_one(listener, connect)
    assert conn.redirected is True
    assert conn.orig_dst == OrigDstAddr(server_ip, 8080)
    assert conn.local.port == port
    assert conn.client == ClientAddr(app_ip, conn.client.port)  # plain IPv4 text even on the dual-stack socket
