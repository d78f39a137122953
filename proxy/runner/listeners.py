"""A worker's listening sockets: one SO_REUSEPORT socket per snapshot listener, reconciled on reload.

Every worker binds the same address:port with SO_REUSEPORT, so the kernel spreads new connections
over the workers. On a reload, listeners whose name and address are unchanged keep their socket
(connections in flight and queued in the backlog continue); new ones are bound; removed ones stop.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from proxy.config.snapshot import Listener, Snapshot

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
SERVED_PROTOCOLS = frozenset({"HTTP"})  # what the L7 server speaks in this release

# serve(sock, listener_name, task_status=...) runs until cancelled
ServeFn = Callable[..., Awaitable[None]]


async def open_reuseport_socket(address: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((address, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Active:
    address: str
    port: int
    scope: trio.CancelScope


class ListenerManager:
    """Owns the serving tasks of one worker's listeners, inside the worker's nursery."""

    def __init__(self, nursery: trio.Nursery, serve: ServeFn, log: Any) -> None:
        self._nursery = nursery
        self._serve = serve
        self._log = log
        self._active: dict[str, _Active] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._active)

    async def reconcile(self, snapshot: Snapshot) -> list[str]:
        """Make the open sockets match the snapshot's listeners. Returns errors (one per listener
        that could not be opened); the others serve regardless."""
        wanted: dict[str, Listener] = {}
        errors: list[str] = []
        for listener in snapshot.listeners:
            if listener.protocol.upper() in SERVED_PROTOCOLS:
                wanted[listener.name] = listener
            else:
                self._log.warning("listener_protocol_not_served", listener=listener.name, protocol=listener.protocol)
        for name, active in list(self._active.items()):
            listener = wanted.get(name)
            if listener is None or (listener.address, listener.port) != (active.address, active.port):
                # stops accepting; its open connections live in the worker-wide nursery and finish
                active.scope.cancel()
                del self._active[name]
                self._log.info("listener_removed", listener=name)
        for name, listener in wanted.items():
            if name in self._active:
                continue
            try:
                sock = await open_reuseport_socket(listener.address, listener.port)
            except OSError as e:
                msg = f"{name}: cannot listen on {listener.address}:{listener.port}: {e.strerror or e}"
                self._log.error("listener_bind_failed", listener=name, error=msg)
                errors.append(msg)
                continue
            scope = trio.CancelScope()
            self._active[name] = _Active(listener.address, listener.port, scope)
            await self._nursery.start(self._run, sock, name, scope)
            self._log.info("listener_added", listener=name, address=f"{listener.address}:{listener.port}")
        return errors

    async def _run(self, sock: trio.socket.SocketType, name: str, scope: trio.CancelScope,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await self._serve(sock, name, task_status=task_status)
        finally:
            # closed here, after the serving task is gone, never under a task blocked in accept()
            sock.close()
