"""tcp_proxy on real sockets on 127.0.0.1, on both the splice and the recv/send paths."""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest
import trio

from proxy.l4 import tcp_proxy
from proxy.l4.addrs import UpstreamAddr
from proxy.l4.errors import ConnectFailure, ConnectTimeout, DownstreamReset, IdleTimeout, UpstreamReset
from proxy.l4.tcp_proxy import CopyMode, TcpProxyStats, connect_upstream, proxy_sockets
from proxy.stats import Stats

from .harness import l4_proxy, receive_all, tcp_server

MODES = [
    pytest.param(CopyMode.SPLICE, marks=pytest.mark.skipif(not tcp_proxy.SPLICE_AVAILABLE, reason="no os.splice here")),
    CopyMode.COPY,
]
pytestmark = pytest.mark.parametrize("mode", MODES)

BULK_BYTES = 24 * 1024 * 1024 + 12345  # not a multiple of any buffer size


async def _send_random(stream: trio.abc.SendStream, total: int, seed: int) -> str:
    """Send `total` pseudo-random bytes in uneven chunks; returns their sha256."""
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    sent = 0
    chunk_sizes = [1, 1000, 65536, 1 << 20, 7777]
    i = seed
    while sent < total:
        size = min(chunk_sizes[i % len(chunk_sizes)], total - sent)
        start = (i * 4099) % (len(block) - size + 1)
        piece = block[start : start + size]
        digest.update(piece)
        await stream.send_all(piece)
        sent += size
        i += 1
    return digest.hexdigest()


async def _hash_until_eof(stream: trio.abc.ReceiveStream) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while chunk := await stream.receive_some(1 << 18):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total


async def test_bulk_both_directions_byte_exact(mode: CopyMode) -> None:
    upstream_view: dict[str, object] = {}

    async def upstream(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:

            async def send_side() -> None:
                upstream_view["sent"] = await _send_random(stream, BULK_BYTES, seed=3)
                await stream.send_eof()

            nursery.start_soon(send_side)
            upstream_view["received"] = await _hash_until_eof(stream)

    stats = Stats()
    cluster = TcpProxyStats(stats, "bulk")
    with trio.fail_after(60):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode, stats=cluster) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                async with trio.open_nursery() as nursery:
                    sent: dict[str, str] = {}

                    async def client_send() -> None:
                        sent["hash"] = await _send_random(client, BULK_BYTES, seed=0)
                        await client.send_eof()

                    nursery.start_soon(client_send)
                    got_hash, got_bytes = await _hash_until_eof(client)
            result = await results.receive()
    assert got_bytes == BULK_BYTES and got_hash == upstream_view["sent"]
    assert upstream_view["received"] == (sent["hash"], BULK_BYTES)
    assert result.error is None and result.mode is mode
    assert result.bytes_downstream_to_upstream == result.bytes_upstream_to_downstream == BULK_BYTES
    assert cluster.bytes_downstream_to_upstream.value == BULK_BYTES
    assert cluster.bytes_upstream_to_downstream.value == BULK_BYTES
    assert cluster.downstream_cx_total.value == 1 and cluster.downstream_cx_active.value == 0
    labels = {(name, dict(lbl).get("direction")) for _, name, lbl, _ in stats.export()}
    assert ("triomesh_tcp_bytes_total", "downstream_to_upstream") in labels


async def test_half_close_from_downstream(mode: CopyMode) -> None:
    async def upstream(stream: trio.SocketStream) -> None:
        request = await receive_all(stream)  # only ends when the client's FIN came through
        await stream.send_all(b"got " + request)

    with trio.fail_after(10):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                await client.send_all(b"request body")
                await client.send_eof()
                assert await receive_all(client) == b"got request body"
            result = await results.receive()
    assert result.error is None
    assert (result.bytes_downstream_to_upstream, result.bytes_upstream_to_downstream) == (12, 16)


async def test_half_close_from_upstream(mode: CopyMode) -> None:
    late: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner")  # server-first, then done talking
        await stream.send_eof()
        late.append(await receive_all(stream))  # but still listening

    with trio.fail_after(10):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                assert await receive_all(client) == b"banner"  # EOF reached us...
                await client.send_all(b"late data")  # ...and our direction still works
                await client.send_eof()
                result = await results.receive()
    assert late == [b"late data"]
    assert result.error is None


async def test_idle_timeout_closes_both_sides(mode: CopyMode) -> None:
    upstream_saw: list[bytes] = []
    upstream_done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        upstream_saw.append(await receive_all(stream))
        upstream_done.set()

    stats = TcpProxyStats(Stats(), "idle")
    with trio.fail_after(10):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode, idle_timeout_s=0.5, stats=stats) as (
            port,
            results,
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                # traffic every 0.1 s keeps a 0.5 s idle timer from firing
                for _ in range(6):
                    await client.send_all(b".")
                    await trio.sleep(0.1)
                started = trio.current_time()
                assert await receive_all(client) == b""  # then silence: the proxy closes us
                waited = trio.current_time() - started
            result = await results.receive()
            await upstream_done.wait()  # the upstream side saw its EOF too
    assert isinstance(result.error, IdleTimeout) and result.error.response_flag == "SI"
    assert result.bytes_downstream_to_upstream == 6
    assert upstream_saw == [b"......"]
    # the timer runs from the last byte, ~0.1 s before `started`: ~0.4 s, with slack for a busy host
    assert 0.25 < waited < 3.0
    assert stats.idle_timeout_total.value == 1


async def test_connect_refused(mode: CopyMode) -> None:
    holder = socket.socket()  # bound, never listening: connects to its port are refused
    holder.bind(("127.0.0.1", 0))
    stats = TcpProxyStats(Stats(), "refused")
    with holder, trio.fail_after(10):
        async with l4_proxy(holder.getsockname()[1], mode=mode, stats=stats) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                assert await receive_all(client) == b""
            result = await results.receive()
    assert type(result.error) is ConnectFailure
    assert (result.error.status, result.error.response_flag, result.error.retryable) == (503, "UF", True)
    assert stats.upstream_cx_connect_fail_total.value == 1 and stats.upstream_cx_connect_timeout_total.value == 0


async def test_connect_timeout(mode: CopyMode) -> None:
    # a listener whose accept queue is full drops further SYNs: the handshake never completes
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname())
    with full, filler, trio.fail_after(10):
        with pytest.raises(ConnectTimeout):
            await connect_upstream(UpstreamAddr(*full.getsockname()), connect_timeout_s=0.2)
        stats = TcpProxyStats(Stats(), "slow")
        async with l4_proxy(full.getsockname()[1], mode=mode, connect_timeout_s=0.2, stats=stats) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                assert await receive_all(client) == b""
            result = await results.receive()
    assert isinstance(result.error, ConnectTimeout)
    assert stats.upstream_cx_connect_timeout_total.value == 1


async def test_upstream_reset_is_passed_on(mode: CopyMode) -> None:
    async def upstream(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST

    with trio.fail_after(10):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                await client.send_all(b"hello")
                with pytest.raises(trio.BrokenResourceError) as broken:
                    await receive_all(client)
                assert isinstance(broken.value.__cause__, ConnectionResetError)
            result = await results.receive()
    assert isinstance(result.error, UpstreamReset) and result.error.response_flag == "UC"


async def test_downstream_reset_is_passed_on(mode: CopyMode) -> None:
    upstream_error: list[BaseException | None] = []
    upstream_done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        try:
            await receive_all(stream)
        except trio.BrokenResourceError as exc:
            upstream_error.append(exc.__cause__)
        finally:
            upstream_done.set()

    with trio.fail_after(10):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode) as (port, results):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"hello")
            await trio.sleep(0.05)
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
            result = await results.receive()
            await upstream_done.wait()
    assert isinstance(result.error, DownstreamReset) and result.error.source == "downstream"
    assert len(upstream_error) == 1 and isinstance(upstream_error[0], ConnectionResetError)


async def test_sniffed_prefix_goes_upstream_first(mode: CopyMode) -> None:
    async def upstream(stream: trio.SocketStream) -> None:
        await stream.send_all(await receive_all(stream))

    with trio.fail_after(10):
        async with tcp_server(upstream) as up_port, l4_proxy(up_port, mode=mode, downstream_prefix=b"GET / ") as (
            port,
            results,
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                await client.send_all(b"HTTP/1.1\r\n\r\n")
                await client.send_eof()
                assert await receive_all(client) == b"GET / HTTP/1.1\r\n\r\n"
            result = await results.receive()
    assert result.bytes_downstream_to_upstream == len(b"GET / HTTP/1.1\r\n\r\n")


async def test_proxy_sockets_on_socketpairs(mode: CopyMode) -> None:
    # the core without listeners: unix socketpairs splice just like TCP
    client, downstream = socket.socketpair()
    upstream, server = socket.socketpair()
    client.settimeout(5)  # the blocking ends run in threads: bound them, a cancel cannot reach them
    server.settimeout(5)
    with client, server, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            done: list[tcp_proxy.TcpProxyResult] = []

            async def run() -> None:
                done.append(await proxy_sockets(downstream, upstream, mode=mode, idle_timeout_s=None))

            nursery.start_soon(run)
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert await trio.to_thread.run_sync(server.recv, 10) == b"ping"
            assert await trio.to_thread.run_sync(server.recv, 10) == b""  # the FIN came through
            server.sendall(b"pong")
            server.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b"pong"
    assert done[0].error is None
    assert (done[0].bytes_downstream_to_upstream, done[0].bytes_upstream_to_downstream) == (4, 4)
    assert downstream.fileno() == -1 and upstream.fileno() == -1  # the proxy closed its sockets
