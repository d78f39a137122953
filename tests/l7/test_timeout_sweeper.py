"""The timeout sweeper wakes late connections one at a time, at most EXPIRE_CATCH_UP per scheduler batch."""

from __future__ import annotations

import math
from time import monotonic

import trio
from trio.lowlevel import checkpoint

from proxy.l7.timeouts import EXPIRE_CATCH_UP, EXPIRE_PACE_S, TimeoutSweeper, expiries_due, pace_start


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


def test_the_debt_after_a_stall_is_at_most_one_catch_up():
    start = 100.0
    # on time, or behind by up to one catch-up: the pacing keeps its start
    assert pace_start(start, start + 5 * EXPIRE_PACE_S, 3) == start
    assert pace_start(start, start + (3 + EXPIRE_CATCH_UP) * EXPIRE_PACE_S, 3) == start
    # 5 s behind with 3 done: moved so that 3 + EXPIRE_CATCH_UP are due, not 5,000
    moved = pace_start(start, start + 5.0, 3)
    assert math.isclose(5.0 + start - moved, (3 + EXPIRE_CATCH_UP) * EXPIRE_PACE_S)
    assert expiries_due(start + 5.0 - moved, 3) == EXPIRE_CATCH_UP
    # and never moved back
    assert pace_start(moved, moved + EXPIRE_PACE_S, 3 + EXPIRE_CATCH_UP) == moved


async def test_after_a_stall_the_sweeper_catches_up_once_then_paces_again(autojump_clock):
    """The worker stalls 5 s in the middle of a crowd's expiries (the clock jumps inside one): the
    wake-up after it catches up one batch, and the rest go one per EXPIRE_PACE_S again, not
    EXPIRE_CATCH_UP per wake-up for the thousands of wake-ups 5 s of debt would pay for."""
    woken_at: list[float] = []
    stall_after = 20

    class Stalling:
        def __init__(self, io_deadline: float) -> None:
            self.io_deadline = io_deadline

        def expire(self) -> None:
            woken_at.append(trio.current_time())
            if len(woken_at) == stall_after:
                autojump_clock.jump(5.0)

    crowd = 300
    sweeper = TimeoutSweeper(0.2, clock=trio.current_time)
    sweeper.watched.update(Stalling(trio.current_time() - 1) for _ in range(crowd))
    async with trio.open_nursery() as nursery:
        sweeper.ensure_running(nursery)
        while len(woken_at) < crowd:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    per_wake_up: dict[float, int] = {}
    for at in woken_at[stall_after:]:
        per_wake_up[at] = per_wake_up.get(at, 0) + 1
    counts = list(per_wake_up.values())
    # the catch-up (at most EXPIRE_CATCH_UP, and the one expiry left over after it), then one each
    assert max(counts) <= EXPIRE_CATCH_UP
    assert sum(1 for c in counts if c > 1) <= 2, counts
    # so the crowd's rest takes about its paced time after the stall, not 8 times less
    assert woken_at[-1] - woken_at[stall_after] >= (crowd - stall_after - 2 * EXPIRE_CATCH_UP) * EXPIRE_PACE_S
