"""The pure-Python RequestTable: the same API and the same counts as the native one
(native/request_metrics.c, whose comment explains the design), for a machine without a C compiler
and as the other side of the differential tests."""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter
from typing import Any, Callable

from proxy.telemetry.buckets import DEFAULT_BUCKETS

BUCKETS = len(DEFAULT_BUCKETS) + 1  # the last is +Inf
_HISTOGRAMS = 3  # duration, request bytes, response bytes


class RequestTable:
    """One worker's Istio request metrics: `capacity` slots (label sets), at most `max_keys`
    remembered request keys, read from contexts of exactly `context_type`."""

    __slots__ = ("_counts", "_sums", "_messages", "_keys", "_max_keys", "_snapshot", "_context_type", "_clock",
                 "_clock_offset", "_clock_set")

    def __init__(self, capacity: int, max_keys: int, context_type: type) -> None:
        if capacity < 1 or max_keys < 1 or max_keys > 1 << 24:
            raise ValueError("capacity and max_keys must be positive (max_keys at most 2**24)")
        self._counts = [[[0] * BUCKETS for _ in range(_HISTOGRAMS)] for _ in range(capacity)]
        self._sums = [[0.0] * _HISTOGRAMS for _ in range(capacity)]
        self._messages = [[0, 0] for _ in range(capacity)]
        # key (by the identity of its objects) -> (slot, the objects, kept alive so no id is reused)
        self._keys: dict[tuple, tuple[int, tuple]] = {}
        self._max_keys = max_keys
        self._snapshot: Any = None
        self._context_type = context_type
        self._clock: Callable[[], float] | None = None
        self._clock_offset = 0.0
        self._clock_set = False

    @property
    def capacity(self) -> int:
        return len(self._counts)

    @property
    def remembered(self) -> int:
        return len(self._keys)

    def _key(self, ctx: Any) -> tuple | None:
        """What the fast path counts a request by (the native table's read_key), or None."""
        if type(ctx) is not self._context_type or ctx.snapshot is not self._snapshot or not self._clock_set:
            return None
        flags = ctx.response_flags
        if type(flags) is not list or flags:
            return None
        extra = ctx.extra
        peer = None
        if extra is not None:  # the peer facts are part of the key; gRPC facts decide labels and counts
            if type(extra) is not dict or "grpc_status" in extra or "grpc_messages" in extra:
                return None
            peer = extra.get("peer")
        status = ctx.status
        if type(status) is not int:
            return None
        return ctx.listener, ctx.cluster, ctx.endpoint, peer, status

    def record_known(self, ctx: Any) -> bool:
        key = self._key(ctx)
        if key is None:
            return False
        found = self._keys.get((id(key[0]), id(key[1]), id(key[2]), id(key[3]), key[4]))
        start, received, sent = ctx.start_monotonic, ctx.bytes_received, ctx.bytes_sent
        if (found is None or type(start) is not float or type(received) is not int or type(sent) is not int
                or received < 0 or sent < 0 or max(received, sent) >= 1 << 63):
            return False
        self._count(found[0], (self._now() - start) * 1000.0, received, sent)
        return True

    def remember(self, ctx: Any, slot: int) -> bool:
        self._check(slot)
        key = self._key(ctx)
        if key is None:
            return False
        identity = (id(key[0]), id(key[1]), id(key[2]), id(key[3]), key[4])
        if identity not in self._keys and len(self._keys) >= self._max_keys:
            return False
        self._keys[identity] = (slot, key)
        return True

    def forget(self, snapshot: Any) -> None:
        self._keys.clear()
        self._snapshot = snapshot

    def set_clock(self, offset: float, clock: Callable[[], float] | None = None) -> None:
        if clock is not None and not callable(clock):
            raise TypeError("clock must be callable")
        self._clock = clock
        self._clock_offset = float(offset)
        self._clock_set = True

    def record(self, slot: int, start: float, request_bytes: int, response_bytes: int, request_messages: int = 0,
               response_messages: int = 0) -> None:
        if not self._clock_set:
            raise RuntimeError("record() before set_clock()")
        self._check(slot)
        for value in (request_bytes, response_bytes, request_messages, response_messages):
            if value < 0:
                raise ValueError("sizes and message counts are never negative")
            if value >= 1 << 63:
                raise OverflowError("a size beyond 64 bits")
        self._count(slot, (self._now() - float(start)) * 1000.0, request_bytes, response_bytes)
        messages = self._messages[slot]
        messages[0] += request_messages
        messages[1] += response_messages

    def histogram(self, slot: int, which: int) -> tuple[list[int], float]:
        self._check(slot)
        if not 0 <= which < _HISTOGRAMS:
            raise IndexError(f"histogram {which} of {_HISTOGRAMS}")
        return list(self._counts[slot][which]), self._sums[slot][which]

    def messages(self, slot: int) -> tuple[int, int]:
        self._check(slot)
        return self._messages[slot][0], self._messages[slot][1]

    def _check(self, slot: int) -> None:
        if not -(1 << 63) <= slot < 1 << 63:
            raise OverflowError("a slot beyond 64 bits")
        if not 0 <= slot < len(self._counts):
            raise IndexError(f"slot {slot} out of the table's {len(self._counts)}")

    def _now(self) -> float:
        clock = self._clock
        return (clock() if clock is not None else perf_counter()) + self._clock_offset

    def _count(self, slot: int, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        counts, sums = self._counts[slot], self._sums[slot]
        counts[0][bisect_left(DEFAULT_BUCKETS, duration_ms)] += 1
        sums[0] += duration_ms
        counts[1][bisect_left(DEFAULT_BUCKETS, request_bytes)] += 1
        sums[1] += float(request_bytes)
        counts[2][bisect_left(DEFAULT_BUCKETS, response_bytes)] += 1
        sums[2] += float(response_bytes)
