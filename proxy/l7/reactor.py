"""Readiness of a worker's HTTP connections from one edge-triggered epoll set, under one Trio wait.

Theory of operation
-------------------
Trio's own `wait_readable` registers the fd with EPOLLONESHOT on every wait and changes the
registration again when it fires: two `epoll_ctl` syscalls per wait, about four per proxied request
(Envoy registers a connection once). Here every connection's fd is registered once, edge-triggered,
in a private epoll set; one task waits (through Trio) for that set's fd to become readable, collects
all ready fds with a non-blocking `poll(0)` and reschedules their waiting tasks.

Edge-triggered readiness is only reported when it changes, so an edge that arrives while nobody
waits is remembered (`read_ready`/`write_ready`) and the next wait returns at once. Such a flag may
be stale (the bytes were already read by a try-the-syscall-first path); the caller then sees EAGAIN
and waits again, which is always safe because IO here always retries the syscall after a wait.

A wait is a Trio checkpoint either way (cancellable, and it lets other tasks run), so callers keep
Trio's fairness and cancellation rules. `forget` must run before an fd is closed: fd numbers are
reused by the kernel.
"""

from __future__ import annotations

import select

import outcome
import trio
from trio.lowlevel import Abort, checkpoint, current_task, reschedule, wait_readable, wait_task_rescheduled

_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_END_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_REGISTER = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class _Waiters:
    __slots__ = ("read_task", "write_task", "read_ready", "write_ready", "read_ended", "abort_read", "abort_write")

    def __init__(self) -> None:
        self.read_task = None
        self.write_task = None
        self.read_ready = False
        self.write_ready = False
        # the peer's FIN (or an error) was reported: reads return at once from now on, so a wait
        # must too. Edge-triggered epoll reports it once, possibly together with the last data,
        # which a reader then takes with one recv and goes back to waiting for an edge that never
        # comes (a request followed at once by a half-close would wait out the idle timeout).
        self.read_ended = False
        # made once per connection rather than as a closure per wait

        def abort_read(_):
            self.read_task = None
            return Abort.SUCCEEDED

        def abort_write(_):
            self.write_task = None
            return Abort.SUCCEEDED

        self.abort_read = abort_read
        self.abort_write = abort_write


class Reactor:
    __slots__ = ("_epoll", "_fds", "running")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, _Waiters] = {}
        self.running = False

    def ensure_running(self, nursery: trio.Nursery) -> None:
        if not self.running:
            self.running = True
            nursery.start_soon(self._run)

    def register(self, fd: int) -> None:
        stale = self._fds.get(fd)
        if stale is not None:  # closed without forget(): its number came back; never leave a waiter behind
            self._fail(stale)
        self._fds[fd] = _Waiters()
        try:
            self._epoll.register(fd, _REGISTER)
        except FileExistsError:
            self._epoll.modify(fd, _REGISTER)

    def forget(self, fd: int) -> None:
        """Stop watching fd (before it is closed); its waiters get ClosedResourceError."""
        waiters = self._fds.pop(fd, None)
        if waiters is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        self._fail(waiters)

    def interrupt(self, fd: int) -> None:
        """Wake fd's waiters with ClosedResourceError without unregistering (a timeout sweeper's
        notice; the owner closes the connection)."""
        waiters = self._fds.get(fd)
        if waiters is not None:
            self._fail(waiters)

    @staticmethod
    def _fail(waiters: _Waiters) -> None:
        error = outcome.Error(trio.ClosedResourceError("connection closed while waiting"))
        for attr in ("read_task", "write_task"):
            task = getattr(waiters, attr)
            if task is not None:
                setattr(waiters, attr, None)
                reschedule(task, error)

    async def wait_readable(self, fd: int) -> None:
        waiters = self._fds[fd]
        if waiters.read_ready or waiters.read_ended:
            waiters.read_ready = False
            await checkpoint()
            return
        if waiters.read_task is not None:
            raise trio.BusyResourceError("another task is already reading this connection")
        waiters.read_task = current_task()
        await wait_task_rescheduled(waiters.abort_read)

    async def wait_writable(self, fd: int) -> None:
        waiters = self._fds[fd]
        if waiters.write_ready:
            waiters.write_ready = False
            await checkpoint()
            return
        if waiters.write_task is not None:
            raise trio.BusyResourceError("another task is already writing this connection")
        waiters.write_task = current_task()
        await wait_task_rescheduled(waiters.abort_write)

    async def _run(self) -> None:
        epoll, fds = self._epoll, self._fds
        try:
            while True:
                await wait_readable(epoll.fileno())
                for fd, events in epoll.poll(0):
                    waiters = fds.get(fd)
                    if waiters is None:
                        continue
                    if events & _READ_EVENTS:
                        if events & _END_EVENTS:
                            waiters.read_ended = True
                        task = waiters.read_task
                        if task is not None:
                            waiters.read_task = None
                            reschedule(task)
                        else:
                            waiters.read_ready = True
                    if events & _WRITE_EVENTS:
                        task = waiters.write_task
                        if task is not None:
                            waiters.write_task = None
                            reschedule(task)
                        else:
                            waiters.write_ready = True
        finally:
            self.running = False
            # nobody will wake the remaining waiters now: fail them rather than leave them hanging
            for waiters in list(fds.values()):
                self._fail(waiters)
