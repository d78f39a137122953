"""Readiness of a worker's HTTP connections: one edge-triggered epoll set under one Trio wait when
the worker is busy, Trio's own one-shot wait per connection when it is quiet.

Theory of operation
-------------------
Trio's own `wait_readable` registers the fd with EPOLLONESHOT on every wait: one `epoll_ctl` syscall
per wait, two per proxied request, and Trio's bookkeeping for each (Envoy registers a connection
once). Here every connection's fd is registered once, edge-triggered,
in a private epoll set; one task waits (through Trio) for that set's fd to become readable, collects
all ready fds with a non-blocking `poll(0)` and reschedules their waiting tasks.

Edge-triggered readiness is only reported when it changes, so an edge that arrives while nobody
waits is remembered (`read_ready`/`write_ready`) and the next wait returns at once. Such a flag may
be stale (the bytes were already read by a try-the-syscall-first path); the caller then sees EAGAIN
and waits again, which is always safe because IO here always retries the syscall after a wait.

A wait is a Trio checkpoint either way (cancellable, and it lets other tasks run), so callers keep
Trio's fairness and cancellation rules. `forget` must run before an fd is closed: fd numbers are
reused by the kernel.

Two modes: batching when busy, direct when quiet
-------------------------------------------------
The set pays off only when several fds are ready at once. Its task is woken first and then wakes the
connection's task: for a lone event that is two scheduler passes where Trio's own wait takes one, and
a lone request costs 35% more user-space instructions (313k against 231k per HTTP/1.1 request on one
connection). So the reactor watches what its polls return: a window (WINDOW_POLLS polls, or
WINDOW_S with at least two) that averaged fewer than MIN_BATCH events turns it **direct**: its task
sleeps, and reads and writes wait through Trio's `wait_readable`/`wait_writable` on the fd itself (one
pass per wake, one `epoll_ctl` per wait); tasks still parked on the set are woken once to wait again
that way (a spurious wake is safe, see above). A direct wait made PROBE_S after that turns it
**batching** again, and the next window decides anew, leaving out its first poll (the edges of the
direct period, not load): a load that grows is batched within a second. It goes direct at most once
per PROBE_S, so a load near the threshold costs at most one switch each way per second. Parked reads
need the set's dispatch: a parked wait turns batching on at once, and the reactor stays batching while
any is parked. The fds stay registered in the set in both modes, so edges that come while it is
direct are reported when it batches again (possibly stale: see above). Two tasks reading one fd are
refused within a mode (by the set, or by Trio for direct waits), not across a switch.

Parked reads
------------
A slow client (slowloris: a request head one byte every few seconds) would cost its task a wake-up
per byte, and thousands of them send their bytes in bursts: a burst of a thousand wake-ups stalls
every other connection of the worker for milliseconds. A task that expects a trickle instead waits
in `wait_parked` with a reader (`read_parked() -> bool`, which takes what the socket holds and says
whether its owner should wake). Readiness of a parked fd does not wake its task: the fd goes on a
queue, and one task (`_read_parked_queue`) calls the readers in a tight loop, PARKED_BATCH per
scheduler pass, then yields, so the worker's other connections are served between slices of a burst.
The task wakes only when its reader says so (or by `forget`/`interrupt`/cancellation, as any wait).
"""

from __future__ import annotations

import math
import select
from collections import deque
from time import monotonic
from typing import Protocol

import outcome
import trio
from trio.lowlevel import (Abort, checkpoint, current_task, notify_closing, reschedule, wait_readable,
                           wait_task_rescheduled, wait_writable)

from proxy.l7.resumed import RESUMED

_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_END_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_REGISTER = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# parked readers called per scheduler pass: a few µs each (one recv, an append, a head parse), so a
# pass stays around 0.1 ms however large the burst
PARKED_BATCH = 32
# readiness events taken per scheduler pass (about 0.5 µs each); more stay in the kernel's ready list
# (epoll reports an edge until it was returned once), the set's fd stays readable, and the next pass
# takes them: a burst of thousands is dispatched in slices too
POLL_EVENTS = 256
# batching pays when a poll returns about four ready fds or more: at one connection (one event per
# poll) direct waits cost 231k instructions per request against 313k batched, at eight (6.7 events
# per poll) 200.7k against 189.9k (bench.instructions)
MIN_BATCH = 4.0
WINDOW_POLLS = 16  # polls per decision under load (~1 ms)
WINDOW_S = 0.02  # or this long, at low rates (at 100 req/s 16 polls would take ~80 ms)
PROBE_S = 1.0  # how long the reactor stays direct before it looks at the load again


class ParkedReader(Protocol):
    def read_parked(self) -> bool:
        """Take what the socket holds (it said readable); whether the waiting task should wake now."""


class _Waiters:
    __slots__ = ("read_task", "write_task", "read_ready", "write_ready", "read_ended", "abort_read", "abort_write",
                 "parked", "parked_queued")

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
        self.parked: ParkedReader | None = None  # set while read_task waits in wait_parked
        self.parked_queued = False  # on the reactor's parked queue (once, however many edges came)
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
    __slots__ = ("_epoll", "_fds", "running", "_parked_ready", "_parked_idle_task", "_abort_parked_idle",
                 "parked_reads", "batching", "_probe_at", "_parked_waiters", "_window_polls", "_window_events",
                 "_window_end", "_direct_since", "_run_idle_task", "_abort_run_idle", "mode_changes", "probe_s",
                 "min_batch")

    def __init__(self, *, probe_s: float = PROBE_S, min_batch: float = MIN_BATCH) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, _Waiters] = {}
        self.running = False
        self._parked_ready: deque[_Waiters] = deque()  # parked fds that became readable, oldest first
        self._parked_idle_task = None  # the parked-queue task while it sleeps on an empty queue
        self.parked_reads = 0  # readers called by the parked-queue task (what a slow client cost no wake-up)
        # the mode ("Two modes" above): a new worker is quiet, so it starts direct and batches once its
        # first probe sees load
        self.batching = False
        self.probe_s = probe_s
        self.min_batch = min_batch
        self._probe_at = monotonic() + probe_s  # when a direct wait turns batching on to look at the load
        self._parked_waiters = 0  # tasks in wait_parked (they keep the reactor batching)
        self._window_polls = 0  # polls and the events they returned since the last decision (-1: the
        self._window_events = 0  # first poll after a switch to batching is left out)
        self._window_end = 0.0
        self._direct_since = -math.inf  # when it last went direct (at most once per probe_s)
        self._run_idle_task = None  # the set's task while it sleeps (direct mode)
        self.mode_changes = 0  # switches between batching and direct (what the load made it do)

        def abort_parked_idle(_):
            self._parked_idle_task = None
            return Abort.SUCCEEDED

        def abort_run_idle(_):
            self._run_idle_task = None
            return Abort.SUCCEEDED

        self._abort_parked_idle = abort_parked_idle
        self._abort_run_idle = abort_run_idle

    def ensure_running(self, nursery: trio.Nursery) -> None:
        if not self.running:
            nursery.start_soon(self._run)
            nursery.start_soon(self._read_parked_queue)
            self.running = True  # only once its tasks exist: batching relies on it

    def register(self, fd: int) -> None:
        stale = self._fds.get(fd)
        if stale is not None:  # closed without forget(): its number came back; never leave a waiter behind
            self._release(stale)
        self._fds[fd] = _Waiters()
        try:
            self._epoll.register(fd, _REGISTER)
        except FileExistsError:
            self._epoll.modify(fd, _REGISTER)

    def forget(self, fd: int) -> None:
        """Stop watching fd (before it is closed); its waiters on the set get ClosedResourceError. A
        direct wait is Trio's own: the owner's `notify_closing` before the close ends it, as it must
        for any Trio wait."""
        waiters = self._fds.pop(fd, None)
        if waiters is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        self._release(waiters)

    def interrupt(self, fd: int) -> None:
        """Wake fd's waiters with ClosedResourceError without unregistering (a timeout sweeper's
        notice; the owner closes the connection)."""
        waiters = self._fds.get(fd)
        if waiters is not None:
            self._fail(waiters)
            notify_closing(fd)  # a direct wait (Trio's own) ends the same way

    @classmethod
    def _release(cls, waiters: _Waiters) -> None:
        """Fail the waiters of an fd no longer watched, and break the reference cycle through their
        abort closures, so reference counting frees them with the connection: otherwise each closed
        connection left six objects for the garbage collector, whose passes land in a reconnection
        wave (bench.scheduler_stalls reports them)."""
        cls._fail(waiters)
        waiters.abort_read = waiters.abort_write = None

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
        if not self.batching and (monotonic() < self._probe_at or not self._batch()):
            await wait_readable(fd)
            return
        if waiters.read_task is not None:
            raise trio.BusyResourceError("another task is already reading this connection")
        waiters.read_task = current_task()
        await wait_task_rescheduled(waiters.abort_read)

    async def wait_parked(self, fd: int, reader: ParkedReader) -> None:
        """Wait until `reader.read_parked()`, called each time fd turns readable, returns True (or
        the peer's end or an error was already reported: the caller's own read then says which)."""
        waiters = self._fds[fd]
        if waiters.read_ended:
            await checkpoint()
            return
        if not self.batching and not self._batch():
            await wait_readable(fd)  # no set's task to read for it: wake on the first byte, as allowed
            return
        if waiters.read_task is not None:
            raise trio.BusyResourceError("another task is already reading this connection")
        waiters.parked = reader
        if waiters.read_ready:  # an edge nobody took yet: let the reader look
            waiters.read_ready = False
            self._queue_parked(waiters)
            self._wake_parked_queue()
        waiters.read_task = current_task()
        self._parked_waiters += 1
        try:
            await wait_task_rescheduled(waiters.abort_read)
        finally:
            waiters.parked = None
            self._parked_waiters -= 1

    def _batch(self) -> bool:
        """Turn batching on (a probe, or a parked wait); False when there is no set's task to do it."""
        if not self.running:
            return False
        self.batching = True
        self.mode_changes += 1
        self._window_polls = -1
        self._window_events = 0
        task = self._run_idle_task
        if task is not None:
            self._run_idle_task = None
            reschedule(task, RESUMED)
        return True

    def _go_direct(self) -> None:
        """Stop batching (lone events): tasks parked on the set are woken to wait again through Trio
        (a spurious wake: their retry sees EAGAIN and waits, now directly)."""
        self.batching = False
        self.mode_changes += 1
        self._direct_since = now = monotonic()
        self._probe_at = now + self.probe_s
        for waiters in self._fds.values():
            task = waiters.read_task
            if task is not None:
                waiters.read_task = None
                reschedule(task, RESUMED)
            task = waiters.write_task
            if task is not None:
                waiters.write_task = None
                reschedule(task, RESUMED)

    def _queue_parked(self, waiters: _Waiters) -> None:
        if not waiters.parked_queued:
            waiters.parked_queued = True
            self._parked_ready.append(waiters)

    def _wake_parked_queue(self) -> None:
        task = self._parked_idle_task
        if task is not None:
            self._parked_idle_task = None
            reschedule(task, RESUMED)

    async def _read_parked_queue(self) -> None:
        ready = self._parked_ready
        while True:
            if not ready:
                self._parked_idle_task = current_task()
                await wait_task_rescheduled(self._abort_parked_idle)
                continue
            for _ in range(min(len(ready), PARKED_BATCH)):
                waiters = ready.popleft()
                waiters.parked_queued = False
                reader = waiters.parked
                if reader is None or waiters.read_task is None:  # woken (timeout, close) or gone meanwhile
                    continue
                self.parked_reads += 1
                try:
                    if not reader.read_parked():
                        continue
                    result = RESUMED
                except Exception as error:  # a bug costs its own connection, not the worker's other parked ones
                    result = outcome.Error(error)
                task = waiters.read_task
                waiters.read_task = None
                waiters.parked = None
                reschedule(task, result)
            await checkpoint()  # the rest of a burst waits for the next pass: other connections run first

    async def wait_writable(self, fd: int) -> None:
        waiters = self._fds[fd]
        if waiters.write_ready:
            waiters.write_ready = False
            await checkpoint()
            return
        if not self.batching and (monotonic() < self._probe_at or not self._batch()):
            await wait_writable(fd)
            return
        if waiters.write_task is not None:
            raise trio.BusyResourceError("another task is already writing this connection")
        waiters.write_task = current_task()
        await wait_task_rescheduled(waiters.abort_write)

    async def _run(self) -> None:
        epoll, fds, parked_ready, poll_events = self._epoll, self._fds, self._parked_ready, POLL_EVENTS
        try:
            while True:
                if not self.batching:
                    self._run_idle_task = current_task()
                    await wait_task_rescheduled(self._abort_run_idle)
                    continue
                await wait_readable(epoll.fileno())
                ready = epoll.poll(0, poll_events)
                for fd, events in ready:
                    waiters = fds.get(fd)
                    if waiters is None:
                        continue
                    if events & _READ_EVENTS:
                        if events & _END_EVENTS:
                            waiters.read_ended = True
                        task = waiters.read_task
                        if task is None:
                            waiters.read_ready = True
                        elif waiters.parked is None:
                            waiters.read_task = None
                            reschedule(task, RESUMED)
                        else:
                            self._queue_parked(waiters)
                    if events & _WRITE_EVENTS:
                        task = waiters.write_task
                        if task is not None:
                            waiters.write_task = None
                            reschedule(task, RESUMED)
                        else:
                            waiters.write_ready = True
                if parked_ready:
                    self._wake_parked_queue()
                polls = self._window_polls + 1
                if polls == 0:  # the first poll after a switch: edges of the direct period, not load
                    self._window_polls, self._window_end = 0, monotonic() + WINDOW_S
                    continue
                self._window_polls = polls
                self._window_events += len(ready)
                if polls >= WINDOW_POLLS or (polls >= 2 and monotonic() >= self._window_end):
                    if (self._window_events < self.min_batch * polls and not self._parked_waiters
                            and monotonic() - self._direct_since >= self.probe_s):
                        self._go_direct()
                    self._window_polls = self._window_events = 0
                    self._window_end = monotonic() + WINDOW_S
        finally:
            self.running = False
            self.batching = False  # waits go direct while no set's task runs
            # nobody will wake the remaining waiters now: wake them to wait again directly (a parked
            # wait woken with nothing read makes its caller read for itself)
            for waiters in fds.values():
                for attr in ("read_task", "write_task"):
                    task = getattr(waiters, attr)
                    if task is not None:
                        setattr(waiters, attr, None)
                        reschedule(task, RESUMED)
