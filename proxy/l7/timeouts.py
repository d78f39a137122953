"""Idle, header-read and stream-idle timeouts of a worker's connections, enforced by one sweeping task.

A cancel scope per wait would cost a deadline registration on every keep-alive request. Instead
each connection publishes the time.monotonic() by which its current wait must end (`io_deadline`,
infinity while it is not waiting), and one task looks at all of them a few times per timeout period
and wakes the late ones (ReadTimeout for a read, a connection error for a write). Precision is one sweep period, which is a
quarter of the shortest timeout (at most 1 s): plenty for timeouts of seconds to minutes.

Connections opened together time out together (thousands of slowloris connections reach their
header timeout in the same sweep). Each woken connection then answers 408 and closes, and a
slowloris client reconnects at once, so each expiry also brings an accept and a new connection:
about 120 µs of the worker's CPU in all (the kernel's part of the send and the close included).
Woken back to back, a thousand of them kept a worker busy for ~120 ms while its keep-alive clients'
requests queued behind them: their p99 went from 4 to 43 ms (`bench.slowloris`, 2,000 slow
connections on 2 workers). So a sweep paces them: one every EXPIRE_PACE_S (1,000 a second per
worker, about an eighth of the worker's time; a crowd of a thousand ends within a second), and the
worker's other sockets are polled and served in between, so a request that arrives meanwhile
waits behind one expiry at most. Batches of 8 every 8 ms (the same rate) made the others wait
behind batches of about a millisecond (`bench.scheduler_stalls`; docs/overload.md has the
figures). On a loaded machine the sweeper's 1 ms sleeps end late; it then catches up with up to
EXPIRE_CATCH_UP expiries at once, so the rate holds: one per wake-up, at whatever pace the timer
allowed, had left 17-26% of a crowd of 1,000 unanswered 5 s after their timeout (load average 10).
The debt is bounded (pace_start): after a stall of seconds the sweeper catches up one batch and then
paces again, instead of paying the stall back EXPIRE_CATCH_UP at a time for thousands of wake-ups.
A timeout is late by up to (late connections / 1,000) s: a slow client has nothing to lose by
waiting longer for its 408.
"""

from __future__ import annotations

from time import monotonic
from typing import Callable, Protocol

import trio

EXPIRE_PACE_S = 0.001  # one expiry per interval: at most 1,000 a second per worker (see the module docstring)
EXPIRE_CATCH_UP = 8  # most expiries in one scheduler batch, after a sleep that ended late


def expiries_due(paced_for_s: float, done: int) -> int:
    """How many expiries to do now, `paced_for_s` after a crowd's first and with `done` done: one per
    EXPIRE_PACE_S on average, at least one, at most EXPIRE_CATCH_UP after a late wake-up."""
    return max(1, min(EXPIRE_CATCH_UP, int(paced_for_s / EXPIRE_PACE_S) + 1 - done))


def pace_start(paced_from: float, now: float, done: int) -> float:
    """When a crowd's pacing counts from, given `done` expiries by `now`: moved forward so that at
    most EXPIRE_CATCH_UP expiries are owed (a stall is caught up once, not paid back for long)."""
    return max(paced_from, now - (done + EXPIRE_CATCH_UP) * EXPIRE_PACE_S)


class Watched(Protocol):
    io_deadline: float

    def expire(self) -> None: ...


class TimeoutSweeper:
    __slots__ = ("watched", "period_s", "running", "every_second", "clock")

    def __init__(self, shortest_timeout_s: float, every_second: Callable[[], None] | None = None,
                 clock: Callable[[], float] = monotonic) -> None:
        """`every_second`: housekeeping run about once a second by the same task (idle pools);
        `clock`: the one the connections' io_deadline values are read on."""
        self.clock = clock
        self.watched: set[Watched] = set()
        self.period_s = min(1.0, max(0.05, shortest_timeout_s / 4))
        self.running = False
        self.every_second = every_second

    def ensure_running(self, nursery: trio.Nursery) -> None:
        if not self.running:
            self.running = True
            nursery.start_soon(self._run)

    async def _run(self) -> None:
        clock = self.clock
        last_housekeeping = clock()
        try:
            while True:
                await trio.sleep(self.period_s)
                now = clock()
                if self.every_second is not None and now - last_housekeeping >= 1.0:
                    last_housekeeping = now  # before the expiries: a paced crowd must not hold it up
                    self.every_second()
                # paced (see the module docstring): a deadline passing meanwhile waits for the next
                # sweep, so in a crowd of N every timeout of the worker is late by up to N/1,000 s
                late = [w for w in self.watched if w.io_deadline <= now]
                paced_from = clock()
                done = 0
                while done < len(late):
                    if done:
                        await trio.sleep(EXPIRE_PACE_S)
                    woken = clock()
                    paced_from = pace_start(paced_from, woken, done)
                    batch = late[done:done + expiries_due(woken - paced_from, done)]
                    done += len(batch)
                    for w in batch:
                        if w.io_deadline <= now:  # not re-armed by bytes that came during a yield
                            w.io_deadline = float("inf")
                            w.expire()
        finally:
            self.running = False
