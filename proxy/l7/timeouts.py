"""Downstream idle and header-read timeouts of a worker, enforced by one sweeping task.

A cancel scope per wait would cost a deadline registration on every keep-alive request. Instead
each connection publishes the time.monotonic() by which its next read must arrive (`read_deadline`,
infinity while a request is being served), and one task looks at all of them a few times per
timeout period and wakes the late ones with ReadTimeout. Precision is one sweep period, which is a
quarter of the shortest timeout (at most 1 s): plenty for timeouts of seconds to minutes.
"""

from __future__ import annotations

from time import monotonic
from typing import Protocol

import trio


class Watched(Protocol):
    read_deadline: float

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
                late = [w for w in self.watched if w.read_deadline <= now]
                for w in late:
                    w.read_deadline = float("inf")
                    w.expire()
        finally:
            self.running = False
