"""Hot restart: a new proxy takes over a running one's listening sockets, then the old one drains.

Theory of operation (docs/hot-restart.md for the operator's view). A proxy started with
`--hot-restart-socket PATH` listens on that Unix socket once it serves. The next proxy started with
the same PATH connects before it opens anything:

    new -> old   Hello(protocol_version)
    old -> new   Refused(reason)                       (an incompatible version, or already draining)
             or  Sockets(...) + fds, ..., SocketsEnd   (every worker's listening sockets, then admin)
    new          starts its workers with those sockets; each serves the inherited sockets of its
                 listeners' addresses (all of them: each SO_REUSEPORT socket has its own queue)
    new -> old   GetCounters, every COUNTERS_INTERVAL_S from now on (when SocketsEnd said `counters`)
    old -> new   Counters(rows)
    new -> old   DrainParent                           (once every new worker serves)
    old          stops accepting and drains as on SIGTERM; the new one listens on PATH
    old -> new   Counters(rows, final=True)            (once its workers exited)

A killed supervisor (kill -9) leaves its workers without a control channel. With a hot restart path
they do not exit: each goes on serving its last config and listens on `PATH.orphan-<index>-<pid>`
for ORPHAN_WAIT_S. The next proxy started with PATH finds PATH dead (nobody accepts), takes the
sockets of every orphan it finds there with the same exchange, and tells each to drain. An orphan
nobody takes over drains and exits after ORPHAN_WAIT_S: serving unsupervised (no reloads, no
restarts, no admin) is a bridge to the next supervisor, not a way of running.

The sockets travel as SCM_RIGHTS: the new process holds the same open file descriptions, so when the
old workers later close their fds on the drain the kernel sockets and their accept queues stay open,
and a connection queued in one is accepted by a new worker, never reset. Until DrainParent both
generations accept from the same queues; if the new proxy fails before it, the old one just goes on.

Counters survive the restart as Envoy's stats do. From the handover on, the new proxy shows its own
counters and histograms plus the old proxy's latest (polled), so a counter never goes down for a
scraper that switches processes. The latest replaces the previous (never added to it), and the final
values come when nothing of the old proxy can count any more (every worker drained and exited, each
having reported its last values): nothing counted twice, the drain's last requests included. Gauges
are not carried: they describe the live process. An orphaned worker answers with its own counts (its
supervisor, which held the older ones, is gone) and sends no final values: the last poll stands.

Messages are the control channel's length-prefixed msgpack frames with their own tagged union; a
different `PROTOCOL_VERSION` is refused by the old side and reported by the new one.
"""

from __future__ import annotations

import errno
import glob
import os
import socket
from dataclasses import dataclass, field

import msgspec
import trio

from proxy.runner.control import FrameChannel, FrameError, ListenerSocket, StatsRow

PROTOCOL_VERSION = 1
CONNECT_TIMEOUT_S = 5.0
EXPORT_TIMEOUT_S = 5.0  # for each old worker to hand its sockets over
HANDOVER_TIMEOUT_S = 30.0  # for the new proxy's workers to serve, before the old one is told to drain
COUNTERS_INTERVAL_S = 1.0  # how often the new proxy polls the old one's counters while it drains
ORPHAN_WAIT_S = 60.0  # how long workers of a killed supervisor serve on, waiting for the next proxy
ORPHAN_SUFFIX = ".orphan-"
# a dead proxy's path and no orphan beside it: look again after this long (its workers notice the
# closed control channel within milliseconds, but a proxy restarted at once may be quicker)
ORPHAN_DISCOVERY_S = 0.5
# of the drain duration: when the drain of a hot restart's old side closes idle keep-alive connections
# (before that they get `connection: close` on their next response: no close races a request)
IDLE_CLOSE_SHARE = 0.5


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
    counters: bool = False  # the old side answers GetCounters (a proxy from before it leaves it False)


class DrainParent(msgspec.Struct, tag="drain_parent"):
    pass


class GetCounters(msgspec.Struct, tag="get_counters"):
    pass


class Counters(msgspec.Struct, tag="counters"):
    """The old proxy's counters and histograms (no gauges) so far; `final` once it is exiting."""

    rows: list[StatsRow]
    final: bool = False


Message = Hello | Refused | Sockets | SocketsEnd | DrainParent | GetCounters | Counters
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
    channels to tell the old proxy (or the orphaned workers of a killed one) to drain."""

    channels: list[FrameChannel] = field(default_factory=list)
    parent_pids: list[int] = field(default_factory=list)
    answers_counters: list[bool] = field(default_factory=list)  # per channel: it answers GetCounters
    listeners: list[tuple[ListenerSocket, socket.socket]] = field(default_factory=list)
    admin: socket.socket | None = None

    async def drain_parent(self) -> None:
        """Tell the old processes to drain; the channels stay open for their counters (follow_counters
        closes them), or are closed here when nobody follows them."""
        for channel in self.channels:
            try:
                await channel.send(DrainParent())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # that process is gone already
        if not any(self.answers_counters):
            await self.close()

    async def close(self) -> None:
        """Without DrainParent: the old processes serve on."""
        for channel in self.channels:
            await channel.aclose()
        self.channels = []

    def merge(self, other: Handover) -> None:
        self.channels += other.channels
        self.parent_pids += other.parent_pids
        self.answers_counters += other.answers_counters
        self.listeners += other.listeners
        if other.admin is not None:
            self.close_unused()
            self.admin = other.admin

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


class _Nobody(Exception):
    """No process accepts on that path (none, or one that died: `stale`)."""

    def __init__(self, stale: bool) -> None:
        super().__init__()
        self.stale = stale


async def take_over(path: str, log) -> Handover | None:
    """Receive the listening sockets of the proxy serving `path`, or, when it is dead, those of its
    orphaned workers. None when nobody is there (stale paths are removed); raises HotRestartError
    when the proxy refuses or breaks off."""
    try:
        return await _receive_from(path)
    except _Nobody as e:
        stale = e.stale
        if stale:
            _unlink_socket(path)
    orphans = _orphan_paths(path)
    if stale and not orphans:
        # a proxy died there just now: its workers may not have noticed yet
        await trio.sleep(ORPHAN_DISCOVERY_S)
        orphans = _orphan_paths(path)
    handover = Handover()
    for orphan in orphans:
        try:
            handover.merge(await _receive_from(orphan))
        except _Nobody as e:
            if e.stale:
                _unlink_socket(orphan)
        except HotRestartError as e:  # the others can still be taken over
            log.warning("hot_restart_orphan_failed", path=orphan, error=str(e))
    if handover.channels:
        log.info("hot_restart_from_orphans", path=path, workers=handover.parent_pids)
        return handover
    log.info("hot_restart_none", path=path, detail="no proxy listens there; starting afresh")
    return None


def _orphan_paths(path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(path) + ORPHAN_SUFFIX + "*"))


async def _receive_from(path: str) -> Handover:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise _Nobody(stale=isinstance(e, ConnectionRefusedError)) from e
    except (OSError, trio.TooSlowError) as e:
        sock.close()
        raise HotRestartError(f"cannot reach the running proxy at {path}: {e}") from e
    channel = FrameChannel(sock, _decoder)
    handover = Handover([channel])
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
                    handover.parent_pids.append(message.pid)
                    handover.answers_counters.append(message.counters)
                    return handover
    except BaseException as e:
        for _, s in handover.listeners:
            s.close()
        handover.close_unused()
        await handover.close()
        if isinstance(e, trio.TooSlowError):
            raise HotRestartError(f"the running proxy at {path} did not hand over in {HANDOVER_TIMEOUT_S}s") from e
        raise


@dataclass(frozen=True)
class Batch:
    """Sockets to hand over with one message: `kind` "listener" or "admin", an fd per entry."""

    kind: str
    sockets: list[ListenerSocket]
    fds: list[int]


async def hand_over(channel: FrameChannel, *, draining: bool, collect, counters, log) -> bool:
    """The old side of one hot restart (a supervisor, or an orphaned worker): answer the new proxy's
    hello, send what `collect()` returns (a list of Batch; the fds stay the caller's), answer
    GetCounters with `await counters()` meanwhile, and wait for DrainParent. True when the caller must
    now drain (and answer GetCounters with serve_counters); False when it serves on (refused, or the
    new proxy went away before it served)."""
    hello = await channel.receive()
    refusal = check_hello(hello, draining=draining)
    if refusal is not None:
        log.warning("hot_restart_refused", reason=refusal.reason)
        await channel.send(refusal)
        return False
    log.info("hot_restart_handing_over", child_pid=hello.pid)
    for batch in await collect():
        await channel.send(Sockets(batch.kind, batch.sockets), fds=batch.fds)
    await channel.send(SocketsEnd(os.getpid(), counters=True))
    message = None
    with trio.move_on_after(HANDOVER_TIMEOUT_S + 5.0):  # the new proxy's own timeout is shorter
        while isinstance(message := await channel.receive(), GetCounters):
            await channel.send(Counters(await counters()))
    if not isinstance(message, DrainParent):
        log.warning("hot_restart_abandoned", child_pid=hello.pid,
                    error="the new proxy went away before it served; serving on")
        return False
    log.info("hot_restart_draining", child_pid=hello.pid)
    return True


async def serve_counters(channel: FrameChannel, counters) -> None:
    """The old side after the handover: answer the new proxy's GetCounters until it goes away or the
    caller closes the channel (after sending the final counters)."""
    try:
        while isinstance(await channel.receive(), GetCounters):
            await channel.send(Counters(await counters()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError, OSError):
        pass  # the new proxy is gone; nobody to tell


async def follow_counters(channel: FrameChannel, report, log) -> None:
    """The new side: poll an old process's counters every COUNTERS_INTERVAL_S until it sends its final
    ones or goes away; `report(rows, final)` for each answer (final also when it went away: its last
    answer stands). Closes the channel."""
    final = False
    try:
        while not final:
            try:
                await channel.send(GetCounters())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # it exited: what it sent before (its final counters) is still to be read
            while not isinstance(message := await channel.receive(), Counters | None):
                pass  # nothing else is sent on this channel now; tolerate it
            if message is None:
                break
            final = message.final
            report(message.rows, final)
            if not final:
                await trio.sleep(COUNTERS_INTERVAL_S)
    except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError, OSError) as e:
        log.info("hot_restart_counters_ended", error=f"{type(e).__name__}: {e}")
    finally:
        if not final:
            report(None, True)
        await channel.aclose()


# what a hand_over raises when the new proxy breaks off or speaks garbage: nothing was handed over
HAND_OVER_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, FrameError, OSError)


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
