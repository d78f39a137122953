"""Push scheduling, pure: debounce config changes, and queue proxies for a push at most once each.

Theory of operation (the shape of Istio's pilot debounce + PushQueue). Config changes arrive in
bursts (an editor saving several files, a script applying twenty resources). `Debouncer` turns a burst
into one recompute: it is due once no change has arrived for `quiet_s`, or `max_delay_s` after the
first change of the burst, whichever comes first, so a steady stream of changes still gets pushed.
The recompute enqueues every proxy whose view changed. `PushQueue` holds each proxy at most once
(coalescing: a second enqueue of a waiting proxy is a no-op, and its push sends the newest view when
it is taken), hands them out in FIFO order to a bounded number of senders, and re-queues a proxy
enqueued again while its push was in flight, once that push is `done`.
Clocks are injected (`now` arguments), so the tests need no sleeping.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

DEFAULT_QUIET_S = 0.1
DEFAULT_MAX_DELAY_S = 1.0


class Debouncer:
    def __init__(self, quiet_s: float = DEFAULT_QUIET_S, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> None:
        self.quiet_s = quiet_s
        self.max_delay_s = max_delay_s
        self._first: float | None = None
        self._last = 0.0
        self.events = 0  # changes in the pending burst

    def event(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now
        self.events += 1

    @property
    def pending(self) -> bool:
        return self._first is not None

    def due_at(self) -> float | None:
        if self._first is None:
            return None
        return min(self._last + self.quiet_s, self._first + self.max_delay_s)

    def take(self, now: float) -> int:
        """The number of changes merged into this push if one is due now, else 0."""
        due = self.due_at()
        if due is None or now < due:
            return 0
        n, self.events, self._first = self.events, 0, None
        return n


class PushQueue:
    def __init__(self) -> None:
        self._waiting: OrderedDict[Hashable, None] = OrderedDict()
        self._in_flight: set[Hashable] = set()
        self._again: set[Hashable] = set()  # enqueued while in flight

    def enqueue(self, proxy: Hashable) -> None:
        if proxy in self._in_flight:
            self._again.add(proxy)
        else:
            self._waiting[proxy] = None  # already waiting: stays where it is (coalesced)

    def pop(self) -> Hashable | None:
        if not self._waiting:
            return None
        proxy, _ = self._waiting.popitem(last=False)
        self._in_flight.add(proxy)
        return proxy

    def done(self, proxy: Hashable) -> None:
        self._in_flight.discard(proxy)
        if proxy in self._again:
            self._again.discard(proxy)
            self._waiting[proxy] = None

    def remove(self, proxy: Hashable) -> None:
        """The proxy went away: forget it wherever it is."""
        self._waiting.pop(proxy, None)
        self._again.discard(proxy)
        self._in_flight.discard(proxy)

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
