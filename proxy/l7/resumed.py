"""RESUMED: the outcome our own `trio.lowlevel.reschedule` calls hand a task parked in
`wait_task_rescheduled` when they have nothing to tell it but "run again" (a stream worker given a
stream, a router whose response head arrived, a writer with frames to send).

Trio's default, `reschedule(task)`, makes an `outcome.Value(None)` for every wake-up: a frozen attrs
object whose creation and use-once check (its `unwrap` sets a flag through `object.__setattr__`) are
a good part of what a wake-up costs in Python (a ping-pong of two tasks: ~21 -> ~15 µs per round trip
of two wake-ups, on a loaded machine). A wake-up that carries no value and no error needs none of
it: RESUMED is an Outcome that gives None every time, so one object serves every wake-up.
Cancellation and errors still travel in Trio's own outcomes (an abort callback, `reschedule(task,
outcome.Error(...))`).
"""

from __future__ import annotations

import outcome


class _Resumed(outcome.Outcome):
    __slots__ = ()

    def unwrap(self) -> None:
        return None

    def send(self, gen):
        return gen.send(None)

    async def asend(self, agen):
        return await agen.asend(None)


RESUMED = _Resumed()

__all__ = ["RESUMED"]
