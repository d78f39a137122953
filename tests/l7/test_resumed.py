"""RESUMED, the one outcome our wake-ups hand a parked task: None every time, reusable (Trio's own
Value(None) may be used once), and cancellation of a parked task still arrives as Trio's Cancelled."""

from __future__ import annotations

import outcome
import pytest
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled
from trio.testing import wait_all_tasks_blocked

from proxy.l7.resumed import RESUMED


def _abort(_) -> Abort:
    return Abort.SUCCEEDED


async def test_one_object_wakes_a_parked_task_again_and_again():
    assert isinstance(RESUMED, outcome.Outcome)
    got = []
    parked = []

    async def sleeper() -> None:
        parked.append(current_task())
        for _ in range(3):
            got.append(await wait_task_rescheduled(_abort))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        for _ in range(3):
            await wait_all_tasks_blocked()
            reschedule(parked[0], RESUMED)
    assert got == [None, None, None]
    used = outcome.Value(None)
    used.unwrap()
    with pytest.raises(outcome.AlreadyUsedError):  # what sharing Trio's default would do
        used.unwrap()


async def test_a_parked_task_is_still_cancelled_by_trio():
    with trio.move_on_after(0.01) as scope:
        await wait_task_rescheduled(_abort)
    assert scope.cancelled_caught
