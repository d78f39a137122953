"""What an accept loop does when accept() fails (EMFILE and friends): wait, doubling from 5 ms
to 1 s while the failures go on (the back-off Go's net/http server uses), and log one line per
listener per interval with the number of failures it stands for, instead of a line per failure.

`AcceptBackoff` is pure bookkeeping with an injected clock; `wait_after_accept_error` is what both
accept loops (L7 listeners, L4 listeners) run in their `except OSError`.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import trio

from proxy.exhaustion import exhaustion_reason
from proxy.stats import HELP, Stats

HELP.setdefault("triomesh_listener_accept_errors_total",
                "accept() failures on a listener, by reason (emfile, enfile, enomem, enobufs, other).")

FIRST_DELAY_S = 0.005
MAX_DELAY_S = 1.0
LOG_INTERVAL_S = 10.0


class AcceptFailure(NamedTuple):
    delay_s: float  # how long to wait before accepting again
    log: bool  # whether to log this failure now
    suppressed: int  # failures since the last logged one that were not logged


class AcceptBackoff:
    __slots__ = ("delay_s", "_clock", "_next_log", "_suppressed")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay_s = 0.0
        self._clock = clock
        self._next_log = -float("inf")
        self._suppressed = 0

    def failed(self) -> AcceptFailure:
        self.delay_s = min(MAX_DELAY_S, self.delay_s * 2) if self.delay_s else FIRST_DELAY_S
        now = self._clock()
        if now < self._next_log:
            self._suppressed += 1
            return AcceptFailure(self.delay_s, False, self._suppressed)
        suppressed, self._suppressed = self._suppressed, 0
        self._next_log = now + LOG_INTERVAL_S
        return AcceptFailure(self.delay_s, True, suppressed)

    def succeeded(self) -> None:
        """An accept worked: the next failure starts again from the first delay."""
        self.delay_s = 0.0


async def wait_after_accept_error(backoff: AcceptBackoff, error: OSError, listener_name: str,
                                  stats: Stats | None, log) -> None:
    """Count the failure, log it if its interval allows, and wait the back-off."""
    reason = exhaustion_reason(error.errno) or "other"
    if stats is not None:
        stats.counter("triomesh_listener_accept_errors_total", listener=listener_name, reason=reason).value += 1
    failure = backoff.failed()
    if failure.log:
        log.warning("accept failed, backing off", listener=listener_name, error=str(error), reason=reason,
                    delay_s=failure.delay_s, suppressed=failure.suppressed)
    await trio.sleep(failure.delay_s)
