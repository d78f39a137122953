"""Hot restart: a new proxy takes over a running one's listening sockets, then the old one drains.

Theory of operation (docs/hot-restart.md for the operator's view). A proxy started with
`--hot-restart-socket PATH` listens on that Unix socket once it serves. The next proxy started with
the same PATH connects before it opens anything:

    new -> old   Hello(protocol_version)
    old -> new   Refused(reason)                       (an incompatible version, or already draining)
             or  Sockets(...) + fds, ..., SocketsEnd   (every worker's listening sockets, then admin)
    new          starts its workers with those sockets; each serves the inherited sockets of its
                 listeners' addresses (all of them: each SO_REUSEPORT socket has its own queue)
    new -> old   DrainParent                           (once every new worker serves)
    old          stops accepting and drains as on SIGTERM; the new one listens on PATH

The sockets travel as SCM_RIGHTS: the new process holds the same open file descriptions, so when the
old workers later close their fds on the drain the kernel sockets and their accept queues stay open,
and a connection queued in one is accepted by a new worker, never reset. Until DrainParent both
generations accept from the same queues; if the new proxy fails before it, the old one just goes on.

Messages are the control channel's length-prefixed msgpack frames with their own tagged union; a
different `PROTOCOL_VERSION` is refused by the old side and reported by the new one.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

import msgspec
import trio

from proxy.runner.control import FrameChannel, ListenerSocket

PROTOCOL_VERSION = 1
CONNECT_TIMEOUT_S = 5.0
EXPORT_TIMEOUT_S = 5.0  # for each old worker to hand its sockets over
HANDOVER_TIMEOUT_S = 30.0  # for the new proxy's workers to serve, before the old one is told to drain


class Hello(msgspec.Struct, tag="hello"):
    protocol_version: int
    pid: int


class Refused(msgspec.Struct, tag="refused"):
    reason: str
    protocol_version: int = PROTOCOL_VERSION


class Sockets(msgspec.Struct, tag="sockets"):
    """One fd per entry of `sockets` travels with it. `kind` is "listener" (one old worker's) or
    "admin" (the admin listener; name "admin")."""

    kind: str
    sockets: list[ListenerSocket]


class SocketsEnd(msgspec.Struct, tag="sockets_end"):
    pid: int


class DrainParent(msgspec.Struct, tag="drain_parent"):
    pass


Message = Hello | Refused | Sockets | SocketsEnd | DrainParent
_decoder = msgspec.msgpack.Decoder(Message)


class HotRestartError(Exception):
    """The handover cannot happen (refused, or the old proxy broke off); the message says why."""


def check_hello(message: object, *, draining: bool) -> Refused | None:
    """The old side's verdict on a new proxy's first message: None to hand over, else why not."""
    if not isinstance(message, Hello):
        return Refused(f"expected hello, got {type(message).__name__}")
    if message.protocol_version != PROTOCOL_VERSION:
        return Refused(f"hot restart protocol version {message.protocol_version} is not supported: "
                       f"the running proxy speaks version {PROTOCOL_VERSION}")
    if draining:
        return Refused("the running proxy is draining")
    return None


@dataclass
class Handover:
    """What a new proxy received: listening sockets (stdlib sockets, owned by the caller) and the
    channel to tell the old proxy to drain."""

    channel: FrameChannel
    parent_pid: int
    listeners: list[tuple[ListenerSocket, socket.socket]] = field(default_factory=list)
    admin: socket.socket | None = None

    async def drain_parent(self) -> None:
        try:
            await self.channel.send(DrainParent())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the old proxy is gone already
        await self.channel.aclose()

    def close_unused(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None


def assign_to_workers(listeners: list[tuple[ListenerSocket, socket.socket]],
                      concurrency: int) -> list[list[tuple[ListenerSocket, socket.socket]]]:
    """Spread the inherited sockets over `concurrency` workers: the i-th socket of an address goes
    to worker i mod concurrency, so every socket is served (a worker may serve several, when fewer
    workers follow more) and workers without one bind their own."""
    out: list[list] = [[] for _ in range(concurrency)]
    seen: dict[tuple[str, int], int] = {}
    for info, sock in listeners:
        key = (info.address, info.port)
        i = seen.get(key, 0)
        seen[key] = i + 1
        out[i % concurrency].append((info, sock))
    return out


async def take_over(path: str, log) -> Handover | None:
    """Connect to the proxy serving `path` and receive its sockets. None when no proxy listens
    there (a stale path is removed); raises HotRestartError when it refuses or breaks off."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        if isinstance(e, ConnectionRefusedError):  # a proxy that died left it: nobody to take over from
            _unlink_socket(path)
        log.info("hot_restart_none", path=path, detail="no proxy listens there; starting afresh")
        return None
    except (OSError, trio.TooSlowError) as e:
        sock.close()
        raise HotRestartError(f"cannot reach the running proxy at {path}: {e}") from e
    channel = FrameChannel(sock, _decoder)
    handover = Handover(channel, parent_pid=0)
    try:
        with trio.fail_after(HANDOVER_TIMEOUT_S):
            await channel.send(Hello(PROTOCOL_VERSION, os.getpid()))
            while True:
                message = await channel.receive()
                if message is None:
                    raise HotRestartError(f"the running proxy at {path} closed the hot restart connection")
                if isinstance(message, Refused):
                    raise HotRestartError(f"the running proxy at {path} refused the hot restart: {message.reason}")
                if isinstance(message, Sockets):
                    fds = channel.take_fds(len(message.sockets))
                    received = [(info, socket.socket(fileno=fd)) for info, fd in zip(message.sockets, fds)]
                    if message.kind == "admin" and received:
                        handover.close_unused()
                        handover.admin = received[0][1]
                    else:
                        handover.listeners.extend(received)
                elif isinstance(message, SocketsEnd):
                    handover.parent_pid = message.pid
                    return handover
    except BaseException as e:
        for _, s in handover.listeners:
            s.close()
        handover.close_unused()
        await channel.aclose()
        if isinstance(e, trio.TooSlowError):
            raise HotRestartError(f"the running proxy at {path} did not hand over in {HANDOVER_TIMEOUT_S}s") from e
        raise


def _unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class HotRestartListener:
    """The old side: the Unix socket a next proxy connects to. Owns the path while it is ours."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: trio.socket.SocketType | None = None
        self._inode: int | None = None

    async def open(self) -> None:
        _unlink_socket(self.path)  # what a previous proxy left (it handed over or died)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
            os.chmod(self.path, 0o600)  # the listening sockets are the proxy's: its user only
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._inode = os.stat(self.path).st_ino

    async def accept(self) -> FrameChannel:
        conn, _ = await self.sock.accept()
        return FrameChannel(conn, _decoder)

    def close(self) -> None:
        """Stop listening; the path is removed only if it is still ours (a new proxy rebinds it)."""
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
