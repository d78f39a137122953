"""The counters exchange of a hot restart over a real socket pair: the new side's polls, the old side's
answers, the final values, and an old side that goes away without them."""

from __future__ import annotations

import itertools

import structlog
import trio

from proxy.runner import hot_restart
from proxy.runner.control import FrameChannel

LOG = structlog.get_logger("test")


def _row(value: int) -> tuple:
    return ("counter", "istio_requests_total", (("response_code", "200"),), value)


def _pair() -> tuple[FrameChannel, FrameChannel]:
    old, new = trio.socket.socketpair()
    return FrameChannel(old, hot_restart._decoder), FrameChannel(new, hot_restart._decoder)


async def test_each_answer_replaces_the_last_and_the_final_one_ends_the_polls(monkeypatch):
    monkeypatch.setattr(hot_restart, "COUNTERS_INTERVAL_S", 0.01)
    old, new = _pair()
    reports = []
    answers = itertools.count(1)  # the old proxy's total grows between polls

    async def counters():
        return [_row(next(answers))]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hot_restart.follow_counters, new, lambda rows, final: reports.append((rows, final)), LOG)
            nursery.start_soon(hot_restart.serve_counters, old, counters)
            while len(reports) < 2:
                await trio.sleep(0.01)
            await old.send(hot_restart.Counters([_row(100)], final=True))  # as the old proxy exits
            while not reports[-1][1]:
                await trio.sleep(0.01)
            await old.aclose()
    assert reports[:2] == [([_row(1)], False), ([_row(2)], False)]
    assert reports[-1] == ([_row(100)], True) and [final for _, final in reports].count(True) == 1


async def test_an_old_side_that_goes_away_without_final_values_leaves_its_last_answer():
    old, new = _pair()
    reports = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hot_restart.follow_counters, new, lambda rows, final: reports.append((rows, final)), LOG)
            assert isinstance(await old.receive(), hot_restart.GetCounters)
            await old.send(hot_restart.Counters([_row(3)]))
            await old.aclose()  # an orphaned worker closes after the handover; a killed proxy too
    assert reports == [([_row(3)], False), (None, True)]
