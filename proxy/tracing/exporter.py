"""Spans leave the data path through a bounded in-memory queue per worker; a background task posts
them in batches as Zipkin v2 JSON (`POST /api/v2/spans`) to the collector. Queueing never blocks:
a full queue drops the span and counts it; a collector that fails or is slow costs only the batch
being sent (counted), never a request."""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec
import structlog
import trio

from proxy.stats import Stats
from proxy.tracing.spans import TracingSettings

log = structlog.get_logger("triomesh.tracing")

MAX_BATCH_SPANS = 1000  # spans per POST
EXPORT_TIMEOUT_S = 5.0

_encode = msgspec.json.Encoder().encode


class SpanQueue:
    """The worker's spans waiting for export, at most `max_spans` of them."""

    def __init__(self, max_spans: int, stats: Stats) -> None:
        self.max_spans = max_spans
        self._spans: deque[dict[str, Any]] = deque()
        self.dropped = stats.counter("triomesh_tracing_spans_dropped_total")
        self.sent = stats.counter("triomesh_tracing_spans_sent_total")
        self.export_failed = stats.counter("triomesh_tracing_export_failed_total")
        self.queued = stats.gauge("triomesh_tracing_spans_queued")

    def push_nowait(self, spans: list[dict[str, Any]]) -> None:
        queue = self._spans
        for span in spans:
            if len(queue) >= self.max_spans:
                self.dropped.value += 1
            else:
                queue.append(span)
        self.queued.value = len(queue)

    def take_batch(self) -> list[dict[str, Any]]:
        queue = self._spans
        batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH_SPANS))]
        self.queued.value = len(queue)
        return batch


async def post_spans(collector: tuple[str, int], body: bytes) -> int:
    """One HTTP/1.1 POST of a JSON span list; returns the collector's status code."""
    host, port = collector
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(
            b"POST /api/v2/spans HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (host.encode(), port, len(body), body))
        reply = b""
        while b"\r\n" not in reply:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"collector {host}:{port} answered no HTTP status line: {reply[:80]!r}")
    return int(status_line[1])


async def export_spans(queue: SpanQueue, settings: TracingSettings) -> None:
    """Forever: every flush interval, send what is queued, batch by batch."""
    while True:
        await trio.sleep(settings.flush_interval_s)
        while True:
            batch = queue.take_batch()
            if not batch:
                break
            try:
                with trio.fail_after(EXPORT_TIMEOUT_S):
                    status = await post_spans(settings.collector, _encode(batch))
            except (OSError, trio.TooSlowError) as e:
                queue.export_failed.value += 1
                log.warning("zipkin export failed", collector="%s:%d" % settings.collector, spans=len(batch),
                            error=repr(e))
                break
            if status // 100 != 2:
                queue.export_failed.value += 1
                log.warning("zipkin collector refused spans", collector="%s:%d" % settings.collector,
                            status=status, spans=len(batch))
                break
            queue.sent.value += len(batch)
