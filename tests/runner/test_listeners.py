"""Listener reconciliation with real sockets: SO_REUSEPORT sharing, add/keep/remove, bind failures."""

from __future__ import annotations

import socket

import structlog
import trio

from proxy.config.snapshot import Listener, RouteTable, Snapshot
from proxy.runner.listeners import ListenerManager, open_reuseport_socket

LOG = structlog.get_logger("test")
EMPTY_ROUTES = RouteTable(exact={}, suffixes=(), catch_all=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(version: str, *ports: int, protocol: str = "HTTP") -> Snapshot:
    listeners = tuple(Listener(f"127.0.0.1_{p}", "127.0.0.1", p, protocol, EMPTY_ROUTES) for p in ports)
    return Snapshot(version=version, listeners=listeners, clusters={})


class NameServer:
    """A serve function that answers each connection with "<tag> <listener name>" and counts
    connections that were still open when the listener was cancelled."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.cancelled_listeners: list[str] = []

    async def __call__(self, sock, name, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            while True:
                conn, _ = await sock.accept()
                with conn:
                    await conn.send(f"{self.tag} {name}".encode())
        except trio.Cancelled:
            self.cancelled_listeners.append(name)
            raise


async def _ask(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        data = b""
        while chunk := await stream.receive_some(100):
            data += chunk
    return data.decode()


async def test_add_keep_remove() -> None:
    p1, p2 = _free_port(), _free_port()
    server = NameServer("w0")
    async with trio.open_nursery() as nursery:
        manager = ListenerManager(nursery, {"HTTP": server}, LOG)
        assert await manager.reconcile(_snapshot("1", p1)) == []
        assert manager.names == [f"127.0.0.1_{p1}"]
        assert await _ask(p1) == f"w0 127.0.0.1_{p1}"

        assert await manager.reconcile(_snapshot("2", p1, p2)) == []
        assert manager.names == sorted([f"127.0.0.1_{p1}", f"127.0.0.1_{p2}"])
        assert server.cancelled_listeners == []  # p1 kept its socket and task
        assert await _ask(p2) == f"w0 127.0.0.1_{p2}"

        assert await manager.reconcile(_snapshot("3", p2)) == []
        assert manager.names == [f"127.0.0.1_{p2}"]
        await trio.testing.wait_all_tasks_blocked()
        assert server.cancelled_listeners == [f"127.0.0.1_{p1}"]
        try:
            await trio.open_tcp_stream("127.0.0.1", p1)
        except OSError:
            pass
        else:
            raise AssertionError("removed listener still accepts")
        assert await _ask(p2) == f"w0 127.0.0.1_{p2}"
        nursery.cancel_scope.cancel()


async def test_two_workers_share_a_port_with_reuseport() -> None:
    port = _free_port()
    async with trio.open_nursery() as nursery:
        a = ListenerManager(nursery, {"HTTP": NameServer("a")}, LOG)
        b = ListenerManager(nursery, {"HTTP": NameServer("b")}, LOG)
        assert await a.reconcile(_snapshot("1", port)) == []
        assert await b.reconcile(_snapshot("1", port)) == []
        seen = {(await _ask(port)).split()[0] for _ in range(200)}
        assert seen == {"a", "b"}  # the kernel spread the 200 connections over both
        nursery.cancel_scope.cancel()


async def test_bind_failure_is_reported_and_others_still_serve() -> None:
    good = _free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # bound without SO_REUSEPORT: nobody may share it
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            manager = ListenerManager(nursery, {"HTTP": NameServer("w")}, LOG)
            errors = await manager.reconcile(_snapshot("1", taken, good))
            assert len(errors) == 1 and f"127.0.0.1_{taken}" in errors[0] and "in use" in errors[0]
            assert manager.names == [f"127.0.0.1_{good}"]
            assert await _ask(good) == f"w 127.0.0.1_{good}"
            blocker.close()
            # the next reconcile (a reload, or SIGHUP with the same config) retries the failed one
            assert await manager.reconcile(_snapshot("1", taken, good)) == []
            assert await _ask(taken) == f"w 127.0.0.1_{taken}"
            nursery.cancel_scope.cancel()
    finally:
        blocker.close()


async def test_each_protocol_gets_its_server_and_unknown_ones_are_errors() -> None:
    http_port, proxy_port, tcp_port = _free_port(), _free_port(), _free_port()
    snapshot = Snapshot("1", _snapshot("1", http_port).listeners + _snapshot("1", proxy_port, protocol="HTTP_PROXY").listeners
                        + _snapshot("1", tcp_port, protocol="TCP").listeners, {})
    async with trio.open_nursery() as nursery:
        manager = ListenerManager(nursery, {"HTTP": NameServer("h"), "HTTP_PROXY": NameServer("p")}, LOG)
        errors = await manager.reconcile(snapshot)
        assert errors == [f"127.0.0.1_{tcp_port}: no server for protocol TCP"]
        assert manager.names == sorted([f"127.0.0.1_{http_port}", f"127.0.0.1_{proxy_port}"])
        assert await _ask(http_port) == f"h 127.0.0.1_{http_port}"
        assert await _ask(proxy_port) == f"p 127.0.0.1_{proxy_port}"
        # same name and port, new protocol: the listener is replaced, served by the other server
        swapped = _snapshot("2", http_port, protocol="HTTP_PROXY")
        assert await manager.reconcile(swapped) == []
        assert await _ask(http_port) == f"p 127.0.0.1_{http_port}"
        nursery.cancel_scope.cancel()


async def test_open_reuseport_socket_ipv6_loopback() -> None:
    sock = await open_reuseport_socket("::1", 0)
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        sock.close()


async def test_prepare_binds_new_listeners_without_serving_and_fails_whole() -> None:
    p1, p2, held = _free_port(), _free_port(), _free_port()
    server = NameServer("w0")
    async with trio.open_nursery() as nursery:
        manager = ListenerManager(nursery, {"HTTP": server}, LOG)
        assert await manager.reconcile(_snapshot("1", p1)) == []
        with socket.socket() as holder:  # no SO_REUSEPORT: nobody can share it
            holder.bind(("127.0.0.1", held))
            holder.listen(1)
            bound, errors = await manager.prepare(_snapshot("2", p1, p2, held))
            assert bound == {} and len(errors) == 1
            assert errors[0].startswith(f"127.0.0.1_{held}: cannot listen on 127.0.0.1:{held}")
        assert manager.names == [f"127.0.0.1_{p1}"] and await _ask(p1) == f"w0 127.0.0.1_{p1}"
        with socket.socket() as probe:  # the aborted update left nothing bound on p2
            probe.bind(("127.0.0.1", p2))

        bound, errors = await manager.prepare(_snapshot("3", p1, p2))
        assert errors == [] and list(bound) == [f"127.0.0.1_{p2}"]  # p1 is served already
        with socket.socket() as client:  # bound, not listening: refused
            client.settimeout(2)
            assert client.connect_ex(("127.0.0.1", p2)) != 0
        assert await manager.reconcile(_snapshot("3", p1, p2), bound) == []
        assert await _ask(p2) == f"w0 127.0.0.1_{p2}"
        nursery.cancel_scope.cancel()
