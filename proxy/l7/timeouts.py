"""Idle, header-read and stream-idle timeouts of a worker's connections, enforced by one sweeping task.

A cancel scope per wait would cost a deadline registration on every keep-alive request. Instead
each connection publishes the time.monotonic() by which its current wait must end (`io_deadline`,
infinity while it is not waiting), and one task looks at all of them a few times per timeout period
and wakes the late ones (ReadTimeout for a read, a connection error for a write). Precision is one sweep period, which is a
quarter of the shortest timeout (at most 1 s): plenty for timeouts of seconds to minutes.

Connections opened together time out together (thousands of slowloris connections reach their
header timeout in the same sweep). Each woken connection then answers 408 and closes in the same
scheduler batch, and every other connection of the worker waits for the whole batch. So a sweep wakes
at most EXPIRE_BATCH connections, then yields: the worker's other sockets are polled and served
between batches. A 408 and its close cost about 50-90 µs of the worker's CPU (the kernel's part of the
send and the close included), so a batch of 8 holds the others up for well under a millisecond, and
a thousand late connections all end within about a tenth of a second of their sweep.
"""

from __future__ import annotations

from time import monotonic
from typing import Callable, Protocol

import trio
from trio.lowlevel import checkpoint

EXPIRE_BATCH = 8  # connections woken per scheduler batch (see the module docstring)


class Watched(Protocol):
    io_deadline: float

    def expire(self) -> None: ...


class TimeoutSweeper:
    __slots__ = ("watched", "period_s", "running", "every_second")

    def __init__(self, shortest_timeout_s: float, every_second: Callable[[], None] | None = None) -> None:
        """`every_second`: housekeeping run about once a second by the same task (idle pools)."""
        self.watched: set[Watched] = set()
        self.period_s = min(1.0, max(0.05, shortest_timeout_s / 4))
        self.running = False
        self.every_second = every_second

    def ensure_running(self, nursery: trio.Nursery) -> None:
        if not self.running:
            self.running = True
            nursery.start_soon(self._run)

    async def _run(self) -> None:
        last_housekeeping = monotonic()
        try:
            while True:
                await trio.sleep(self.period_s)
                now = monotonic()
                late = [w for w in self.watched if w.io_deadline <= now]
                for start in range(0, len(late), EXPIRE_BATCH):
                    if start:
                        await checkpoint()
                    for w in late[start:start + EXPIRE_BATCH]:
                        if w.io_deadline <= now:  # not re-armed by bytes that came during a yield
                            w.io_deadline = float("inf")
                            w.expire()
                if self.every_second is not None and now - last_housekeeping >= 1.0:
                    last_housekeeping = now
                    self.every_second()
        finally:
            self.running = False
