"""A worker's listening sockets: one SO_REUSEPORT socket per snapshot listener, reconciled on reload.

Every worker binds the same address:port with SO_REUSEPORT, so the kernel spreads new connections
over the workers. On a reload, listeners whose name and address are unchanged keep their socket
(connections in flight and queued in the backlog continue); new ones are bound; removed ones stop.
Virtual listeners (bind_to_port False) get no socket: the capture listeners hand them connections.

Hot restart (docs/hot-restart.md): a worker of a proxy that took over from another one starts with
some of the old proxy's listening sockets (`inherited`, by address and port). A listener of its
config on such an address serves those sockets, every one of them (each SO_REUSEPORT socket has its
own accept queue, and a queue nobody accepts from would hold its connections until they time out),
and binds none of its own. Inherited sockets no listener claims are closed once the first config is
served: a listener the new config removed loses its queued connections as a reload removing it does.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable, Mapping

import trio

from proxy.config.snapshot import Listener, Snapshot

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn

# serve(sock, listener_name, task_status=...) runs until cancelled
ServeFn = Callable[..., Awaitable[None]]
# the server key of capture listeners (use_original_dst), whatever their protocol
ORIGINAL_DST = "ORIGINAL_DST"


def server_key(listener: Listener) -> str:
    return ORIGINAL_DST if listener.use_original_dst else listener.protocol


async def bind_reuseport_socket(address: str, port: int) -> trio.socket.SocketType:
    """Bound, not listening: the kernel sends it no connection yet, so closing it loses none; a port
    another process holds fails here (EADDRINUSE)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_reuseport_socket(address: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> trio.socket.SocketType:
    sock = await bind_reuseport_socket(address, port)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class BoundSockets(dict):
    """Sockets a prepared update bound, by listener name; `close()` when the update is aborted."""

    def close(self) -> None:
        for sock in self.values():
            sock.close()
        self.clear()


@dataclass
class _Active:
    address: str
    port: int
    protocol: str
    scope: trio.CancelScope
    closed: trio.Event
    sockets: list  # one, or the several a hot restart handed this worker
    # their fds, read before serving starts: the L7 server takes a trio socket's fd over (detach)
    filenos: list[int]


@dataclass(frozen=True)
class ExportedSocket:
    name: str
    protocol: str
    address: str
    port: int
    fileno: int


Endpoint = tuple[str, int]  # (address, port) a listening socket is bound to


class ListenerManager:
    """Owns the serving tasks of one worker's listeners, inside the worker's nursery. `servers` maps
    a listener protocol to the function that serves it (HTTP -> the L7 server)."""

    def __init__(self, nursery: trio.Nursery, servers: Mapping[str, ServeFn], log: Any,
                 inherited: Mapping[Endpoint, list[trio.socket.SocketType]] | None = None) -> None:
        self._nursery = nursery
        self._servers = servers
        self._log = log
        self._active: dict[str, _Active] = {}
        # listening sockets a hot restart handed over, until a listener claims them or the first
        # config is served without claiming them
        self._inherited: dict[Endpoint, list[trio.socket.SocketType]] = {k: list(v) for k, v in (inherited or {}).items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._active)

    def _unchanged(self, name: str, listener: Listener) -> bool:
        active = self._active.get(name)
        return active is not None and (active.address, active.port, active.protocol) == (
            listener.address, listener.port, server_key(listener))

    async def prepare(self, snapshot: Snapshot) -> tuple[BoundSockets, list[str]]:
        """Bind (without listening) a socket for every listener of `snapshot` this worker does not
        serve yet, while the current ones go on serving. Returns the sockets and the errors; on any
        error nothing stays bound, so the caller can reject the whole update."""
        bound = BoundSockets()
        errors: list[str] = []
        for listener in snapshot.listeners:
            if not listener.bind_to_port or self._unchanged(listener.name, listener):
                continue
            if (listener.address, listener.port) in self._inherited:
                continue  # already bound and listening: reconcile serves them
            if server_key(listener) not in self._servers:
                errors.append(f"{listener.name}: no server for protocol {server_key(listener)}")
                continue
            try:
                bound[listener.name] = await bind_reuseport_socket(listener.address, listener.port)
            except OSError as e:
                errors.append(f"{listener.name}: cannot listen on {listener.address}:{listener.port}: {e.strerror or e}")
        if errors:
            bound.close()
        return bound, errors

    async def reconcile(self, snapshot: Snapshot, prepared: BoundSockets | None = None) -> list[str]:
        """Make the open sockets match the snapshot's listeners, listening on `prepared` sockets
        (from `prepare`) where there are some and binding the others. Returns errors (one per
        listener that could not be opened); the others serve regardless."""
        prepared = prepared if prepared is not None else BoundSockets()
        wanted: dict[str, Listener] = {}
        errors: list[str] = []
        for listener in snapshot.listeners:
            if not listener.bind_to_port:
                continue
            if server_key(listener) in self._servers:
                wanted[listener.name] = listener
            else:  # the compiler should not emit it; say so loudly rather than serve it wrongly
                msg = f"{listener.name}: no server for protocol {server_key(listener)}"
                self._log.error("listener_protocol_not_served", listener=listener.name, error=msg)
                errors.append(msg)
        stopping: list[_Active] = []
        for name, active in list(self._active.items()):
            listener = wanted.get(name)
            if listener is None or (listener.address, listener.port, server_key(listener)) != (
                    active.address, active.port, active.protocol):
                # stops accepting; its open connections live in the worker-wide nursery and finish
                active.scope.cancel()
                stopping.append(active)
                del self._active[name]
                self._log.info("listener_removed", listener=name)
        for active in stopping:  # closed before anything binds again (or reconcile returns)
            await active.closed.wait()
        for name, listener in wanted.items():
            if name in self._active:
                continue
            inherited = self._inherited.pop((listener.address, listener.port), None)
            if inherited:
                sockets = inherited
                prepared.pop(name, None)  # bound before the handover; closed below
            else:
                try:
                    sock = prepared.pop(name, None)
                    if sock is None:
                        sock = await open_reuseport_socket(listener.address, listener.port)
                    else:
                        try:
                            sock.listen(LISTEN_BACKLOG)
                        except BaseException:
                            sock.close()
                            raise
                except OSError as e:
                    msg = f"{name}: cannot listen on {listener.address}:{listener.port}: {e.strerror or e}"
                    self._log.error("listener_bind_failed", listener=name, error=msg)
                    errors.append(msg)
                    continue
                sockets = [sock]
            key = server_key(listener)
            active = _Active(listener.address, listener.port, key, trio.CancelScope(), trio.Event(), sockets,
                             [sock.fileno() for sock in sockets])
            self._active[name] = active
            await self._nursery.start(self._run, self._servers[key], sockets, name, active)
            self._log.info("listener_added", listener=name, address=f"{listener.address}:{listener.port}",
                           inherited_sockets=len(inherited) if inherited else 0)
        prepared.close()  # bound for a listener the snapshot no longer opens (none in practice)
        self._close_unclaimed_inherited()
        return errors

    def _close_unclaimed_inherited(self) -> None:
        for (address, port), sockets in self._inherited.items():
            self._log.warning("inherited_socket_closed", address=f"{address}:{port}", sockets=len(sockets),
                              detail="no listener of the config served here")
            for sock in sockets:
                sock.close()
        self._inherited.clear()

    def export(self) -> list[ExportedSocket]:
        """Every listening socket served now, for a hot restart to hand over (the fds stay ours)."""
        return [ExportedSocket(name, active.protocol, active.address, active.port, fileno)
                for name, active in sorted(self._active.items()) for fileno in active.filenos]

    async def close_all(self) -> None:
        """Stop accepting on every listener (a drain); returns once their sockets are closed. Their
        connections live in the worker-wide nursery and go on."""
        self._close_unclaimed_inherited()
        closing = list(self._active.items())
        self._active.clear()
        for _, active in closing:
            active.scope.cancel()
        for name, active in closing:
            await active.closed.wait()
            self._log.info("listener_closed", listener=name, reason="drain")

    async def _run(self, serve: ServeFn, sockets: list[trio.socket.SocketType], name: str, active: _Active,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with active.scope:
                async with trio.open_nursery() as nursery:
                    for sock in sockets:
                        await nursery.start(partial(serve, sock, name))
                    task_status.started()
        finally:
            # closed here, after the serving tasks are gone, never under a task blocked in accept().
            # A socket handed to the next proxy stays open in the kernel: that proxy holds it too.
            for sock in sockets:
                sock.close()
            active.closed.set()
