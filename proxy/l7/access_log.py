"""One access-log line per downstream request (Envoy-like fields), JSON or console, on stderr.

Theory of operation: the data plane calls `emit(ctx)` in a `finally` for every request. The JSON line
has the shape of our structlog JSON lines (event, level, timestamp, fields) but is rendered directly
with msgspec: going through structlog's processor chain costs ~4 us per request, more than the rest
of the line. Lines are appended to a small buffer that is written to the fd in whole lines, at most
PIPE_BUF bytes per write, so lines of several worker processes sharing stderr never interleave
mid-line; the worker calls `flush()` about once a second and at exit. With "off", `emit` is a no-op
and `enabled` is False so callers can skip building anything.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

import msgspec
import trio

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext

FORMATS = ("off", "json", "console")
PIPE_BUF = 4096  # writes up to this size to a pipe are atomic (POSIX)

_encode = msgspec.json.Encoder().encode


def _discard(ctx: RequestContext) -> None:
    return None


class _WallClockFormatter:
    """ISO-8601 UTC timestamps with milliseconds; the formatted second is cached (strftime per
    request would cost more than the JSON encoding)."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((wall - second) * 1000):03d}Z"


def fields(ctx: RequestContext, now_monotonic: float, timestamp: str, static: dict | None = None) -> dict:
    """The access-log record of one request. Field names follow Envoy's access log vocabulary;
    `static` fields (the worker index) are appended."""
    req = ctx.request
    flags = ctx.response_flags
    cluster = ctx.cluster
    record = {
        "event": "access",
        "level": "info",
        "timestamp": timestamp,
        "method": req.method.decode("latin-1"),
        "path": req.target.decode("latin-1"),
        "protocol": "HTTP/" + req.http_version.decode("latin-1"),
        "authority": req.authority.decode("latin-1"),
        "status": ctx.status,
        "response_flags": ",".join(flags) if flags else "-",
        "upstream_host": ctx.upstream_host or "-",
        "cluster": cluster.name if cluster is not None else "-",
        "bytes_received": ctx.bytes_received,
        "bytes_sent": ctx.bytes_sent,
        "duration_ms": round((now_monotonic - ctx.start_monotonic) * 1000.0, 3),
        "request_id": ctx.request_id.decode("latin-1") if ctx.request_id else "-",
        "downstream_remote_address": ctx.downstream_addr,
    }
    if static:
        record.update(static)
    return record


class AccessLog:
    """`fmt` is "off", "json" or "console". `clock` must be the clock `ctx.start_monotonic` was read
    from: the server reads trio.current_time() (so `emit` runs inside the Trio loop)."""

    def __init__(self, fmt: str = "json", *, fd: int = 2, clock: Callable[[], float] = trio.current_time,
                 worker: int | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, got {fmt!r}")
        self.format = fmt
        self.enabled = fmt != "off"
        self._fd = fd
        self._clock = clock
        self._wall = _WallClockFormatter()
        self._buf = bytearray()
        self._static = {"worker": worker} if worker is not None else None
        self.dropped_lines = 0
        if fmt == "off":
            self.emit = _discard  # type: ignore[method-assign]
        elif fmt == "console":
            import structlog

            self._console = structlog.dev.ConsoleRenderer(colors=False)
            self.emit = self._emit_console  # type: ignore[method-assign]

    def emit(self, ctx: RequestContext) -> None:
        """JSON line (replaced per instance for "off" and "console")."""
        self._append(_encode(fields(ctx, self._clock(), self._wall.format(ctx.start_wall), self._static)) + b"\n")

    def _emit_console(self, ctx: RequestContext) -> None:
        record = fields(ctx, self._clock(), self._wall.format(ctx.start_wall), self._static)
        line = self._console(None, "info", record)
        self._append(line.encode("utf-8", "replace") + b"\n")

    def _append(self, line: bytes) -> None:
        buf = self._buf
        if len(buf) + len(line) > PIPE_BUF and buf:
            self._write(buf)
            buf.clear()
        buf += line
        if len(buf) >= PIPE_BUF:
            self._write(buf)
            buf.clear()

    def flush(self) -> None:
        if self._buf:
            self._write(self._buf)
            self._buf.clear()

    def _write(self, data: bytes | bytearray) -> None:
        data = bytes(data)  # no memoryview export may outlive the call: the caller clears the buffer
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError:
            # a closed or full stderr must never take the data plane down; count what was lost
            self.dropped_lines += data.count(b"\n", done)
