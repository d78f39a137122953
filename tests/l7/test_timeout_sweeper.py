"""The timeout sweeper wakes late connections one at a time, at most EXPIRE_CATCH_UP per scheduler batch."""

from __future__ import annotations

import math
from time import monotonic

import trio
from trio.lowlevel import checkpoint

from proxy.l7.timeouts import EXPIRE_CATCH_UP, EXPIRE_PACE_S, TimeoutSweeper, expiries_due


class Waiting:
    """A connection whose wait ends at `io_deadline`; records the ticker's count when it was woken."""

    def __init__(self, io_deadline: float, ticks: list[int]) -> None:
        self.io_deadline = io_deadline
        self.ticks = ticks
        self.woken_at_tick: int | None = None

    def expire(self) -> None:
        self.woken_at_tick = self.ticks[0]


async def test_late_connections_are_woken_in_bounded_batches_with_others_running_between():
    ticks = [0]
    sweeper = TimeoutSweeper(0.2)
    late = [Waiting(monotonic() - 1, ticks) for _ in range(5 * EXPIRE_CATCH_UP + 3)]
    on_time = [Waiting(math.inf, ticks) for _ in range(10)]
    sweeper.watched.update(late + on_time)

    async def ticker() -> None:  # another task of the worker: how often it ran while the sweep went on
        while True:
            ticks[0] += 1
            await checkpoint()

    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            sweeper.ensure_running(nursery)
            while any(w.woken_at_tick is None for w in late):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert all(w.woken_at_tick is not None and w.io_deadline == math.inf for w in late)
    assert all(w.woken_at_tick is None for w in on_time)
    per_tick: dict[int, int] = {}
    for w in late:
        per_tick[w.woken_at_tick] = per_tick.get(w.woken_at_tick, 0) + 1
    # Trio may run the two tasks in either order within a scheduler batch, so between two steps of the
    # sweeper the other task ran zero to two times: never more than two batches share a tick, and the
    # expiries span many ticks (all at once would be one tick; six of the largest batches, six)
    assert max(per_tick.values()) <= 2 * EXPIRE_CATCH_UP
    assert max(per_tick) - min(per_tick) >= 6


def test_expiries_are_one_per_interval_and_catch_up_after_a_late_wake_up_within_a_bound():
    assert expiries_due(0.0, 0) == 1  # a crowd's first
    assert expiries_due(EXPIRE_PACE_S * 1.1, 1) == 1  # on time: one per interval
    assert expiries_due(EXPIRE_PACE_S * 1.1, 2) == 1  # ahead (a sleep that ended early): still one
    assert expiries_due(EXPIRE_PACE_S * 4.5, 2) == 3  # 4.5 intervals in, 2 done: 5 due
    assert expiries_due(EXPIRE_PACE_S * 100, 10) == EXPIRE_CATCH_UP  # far behind: bounded
    # wake-ups `late_by` intervals apart: the rate holds up to EXPIRE_CATCH_UP intervals late
    for late_by in (1, 3, EXPIRE_CATCH_UP, 3 * EXPIRE_CATCH_UP):
        done = 1
        for wake_up in range(1, 50):
            done += expiries_due(EXPIRE_PACE_S * (late_by * wake_up + 0.5), done)
        assert done == 1 + 49 * min(late_by, EXPIRE_CATCH_UP)
