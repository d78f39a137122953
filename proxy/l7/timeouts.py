"""Idle, header-read and stream-idle timeouts of a worker's connections, enforced by one sweeping task.

A cancel scope per wait would cost a deadline registration on every keep-alive request. Instead
each connection publishes the time.monotonic() by which its current wait must end (`io_deadline`,
infinity while it is not waiting), and one task looks at all of them a few times per timeout period
and wakes the late ones (ReadTimeout for a read, a connection error for a write). Precision is one sweep period, which is a
quarter of the shortest timeout (at most 1 s): plenty for timeouts of seconds to minutes.
"""

from __future__ import annotations

from time import monotonic
from typing import Protocol

import trio


class Watched(Protocol):
    io_deadline: float

    def expire(self) -> None: ...


class TimeoutSweeper:
    __slots__ = ("watched", "period_s", "running")

    def __init__(self, shortest_timeout_s: float) -> None:
        self.watched: set[Watched] = set()
        self.period_s = min(1.0, max(0.05, shortest_timeout_s / 4))
        self.running = False

    def ensure_running(self, nursery: trio.Nursery) -> None:
        if not self.running:
            self.running = True
            nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            while True:
                await trio.sleep(self.period_s)
                now = monotonic()
                late = [w for w in self.watched if w.io_deadline <= now]
                for w in late:
                    w.io_deadline = float("inf")
                    w.expire()
        finally:
            self.running = False
