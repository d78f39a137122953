"""Idle, header-read and stream-idle timeouts of a worker's connections, enforced by one sweeping task.

A cancel scope per wait would cost a deadline registration on every keep-alive request. Instead
each connection publishes the time.monotonic() by which its current wait must end (`io_deadline`,
infinity while it is not waiting), and one task looks at all of them a few times per timeout period
and wakes the late ones (ReadTimeout for a read, a connection error for a write). Precision is one sweep period, which is a
quarter of the shortest timeout (at most 1 s): plenty for timeouts of seconds to minutes.

Connections opened together time out together (thousands of slowloris connections reach their
header timeout in the same sweep). Each woken connection then answers 408 and closes in the same
scheduler batch, and every other connection of the worker waits for the whole batch. So a sweep wakes
at most EXPIRE_BATCH connections, then sleeps EXPIRE_PACE_S: the worker's other sockets are polled and
served between batches. A 408 and its close cost about 50-90 µs of the worker's CPU (the kernel's part
of the send and the close included), and a slowloris client reconnects at once, so each expiry brings
an accept and a new connection too (about 120 µs in all). Woken back to back (a checkpoint between
batches), a thousand of them kept a worker busy for ~120 ms while its keep-alive clients' requests
queued behind them in the ready list: their p99 went from 4 to 43 ms (`bench.slowloris`, 2,000 slow
connections on 2 workers). Paced at 8 every 8 ms (1,000 a second per worker, about an eighth of the
worker's time) the same crowd ends within a second and that p99 stayed at 2.2 ms (0.77 ms quiet;
Envoy beside it 3.2 ms). A timeout is then late by up to (late connections / 1,000) s: a slow client
has nothing to lose by waiting longer for its 408.
"""

from __future__ import annotations

from time import monotonic
from typing import Callable, Protocol

import trio

EXPIRE_BATCH = 8  # connections woken per scheduler batch (see the module docstring)
EXPIRE_PACE_S = 0.008  # between two batches: at most 1,000 expiries a second per worker


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
                if self.every_second is not None and now - last_housekeeping >= 1.0:
                    last_housekeeping = now  # before the expiries: a paced crowd must not hold it up
                    self.every_second()
                # paced (see the module docstring): a deadline passing meanwhile waits for the next
                # sweep, so in a crowd of N every timeout of the worker is late by up to N/1,000 s
                late = [w for w in self.watched if w.io_deadline <= now]
                for start in range(0, len(late), EXPIRE_BATCH):
                    if start:
                        await trio.sleep(EXPIRE_PACE_S)
                    for w in late[start:start + EXPIRE_BATCH]:
                        if w.io_deadline <= now:  # not re-armed by bytes that came during a yield
                            w.io_deadline = float("inf")
                            w.expire()
        finally:
            self.running = False
