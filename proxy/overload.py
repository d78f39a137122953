"""The overload manager of one worker, in Envoy's spirit: limits past which new work is shed
before the process suffers.

- `max_downstream_connections` (Envoy's downstream_connections resource monitor): a connection
  accepted while the worker already holds that many HTTP connections is closed at once, counted.
- `max_rss_bytes` (Envoy's fixed_heap monitor with stop_accepting_requests): a sampler reads the
  worker's resident memory from /proc/self/statm every REFRESH_INTERVAL_S; while it is above the
  limit, new requests are answered 503 with `x-envoy-overloaded: true` (flag OM) without going
  upstream, and requests already running continue.

The data path reads one attribute per request (`shedding`, folded into the drain check) and one
comparison per accepted connection; the rest runs in the sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from proxy.stats import HELP, Stats

REFRESH_INTERVAL_S = 0.25  # Envoy's overload manager refresh_interval default
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

HELP.setdefault("triomesh_downstream_cx_overload_reject_total",
                "Connections closed right after accept: the worker held --max-downstream-connections.")
HELP.setdefault("triomesh_overload_memory_active", "1 while the worker's RSS is above --max-worker-rss (requests shed).")
HELP.setdefault("triomesh_overload_rq_shed_total", "Requests answered 503 OM (x-envoy-overloaded) for memory pressure.")


@dataclass(frozen=True, slots=True)
class OverloadLimits:
    max_downstream_connections: int | None = None  # per worker
    max_rss_bytes: int | None = None  # per worker


def rss_bytes() -> int:
    """The resident set size of this process (the second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


class MemoryWatermark:
    """Whether the worker is over its RSS limit; `update` is the pure decision for one sample."""

    __slots__ = ("limit_bytes", "active", "_gauge")

    def __init__(self, limit_bytes: int, stats: Stats) -> None:
        self.limit_bytes = limit_bytes
        self.active = False
        self._gauge = stats.gauge("triomesh_overload_memory_active")

    def update(self, rss: int) -> bool:
        self.active = rss > self.limit_bytes
        self._gauge.value = int(self.active)
        return self.active


async def watch_memory(watermark: MemoryWatermark, on_change, log, *, read=rss_bytes) -> None:
    """Sample the RSS until cancelled; `on_change(active)` runs when the watermark is crossed."""
    active = False
    while True:
        rss = read()
        if watermark.update(rss) != active:
            active = watermark.active
            log.warning("overload_memory", active=active, rss_bytes=rss, limit_bytes=watermark.limit_bytes)
            on_change(active)
        await trio.sleep(REFRESH_INTERVAL_S)
