"""One access-log line per downstream request or TCP connection, as JSON, Envoy's default text
format, or console, on stderr.

Theory of operation: the data plane calls `emit(ctx)` in a `finally` for every request, and the TCP
proxy `emit_connection(entry)` once when a connection closes. The JSON line
has the shape of our structlog JSON lines (event, level, timestamp, fields) but is encoded directly
from a msgspec Struct into a buffer: structlog's processor chain costs ~4 us per request, several
times the rest of the line. The buffer is written to the fd in whole lines, at most PIPE_BUF bytes
per write, so the lines of several worker processes sharing stderr never interleave mid-line; the
worker calls `flush()` about once a second and at exit. With "off", `emit` is a no-op and `enabled`
is False, so callers can skip it entirely. "text" is the line Istio's sidecars print with
`meshConfig.accessLogFile` (`ENVOY_TEXT_FORMAT`, docs/access-log.md); fields we do not know print
"-", as Envoy prints an unset field.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

import msgspec
import trio

from proxy.l7.errors import UpstreamTlsFailure

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext

FORMATS = ("off", "json", "text", "console")

# Istio's default TEXT access-log format for its sidecars and gateways (Envoy's own default format
# plus the response code details, termination details, transport failure reason, cluster and
# addresses); `text_line` and `connection_text_line` fill it in this order
ENVOY_TEXT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% '
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
    '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% '
    '%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n'
)
PIPE_BUF = 4096  # writes up to this size to a pipe are atomic (POSIX)

_encode_into = msgspec.json.Encoder().encode_into


def _discard(ctx: RequestContext) -> None:
    return None


def _discard_connection(entry: ConnectionEntry, *, text: bool = False) -> None:
    return None


class _WallClockFormatter:
    """ISO-8601 UTC timestamps with milliseconds. The formatted second and the last millisecond's
    string are cached: at thousands of requests per second most lines share them."""

    __slots__ = ("_second", "_prefix", "_milli", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._milli = -1
        self._text = ""

    def format(self, wall: float) -> str:
        milli = int(wall * 1000)
        if milli == self._milli:
            return self._text
        second = milli // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._text = f"{self._prefix}.{milli - second * 1000:03d}Z"
        return self._text


class AccessRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """One access-log line. Field names follow Envoy's access-log vocabulary; the first three match
    our structlog lines. A Struct encodes in about half the time of a dict with the same keys."""

    event: str
    level: str
    timestamp: str
    method: str
    path: str
    protocol: str
    authority: str
    status: int  # 0 when no response went out (reset, client gone)
    response_flags: str  # "-" when none, else Envoy's short flags joined by ","
    upstream_host: str
    cluster: str
    bytes_received: int
    bytes_sent: int
    duration_ms: float
    request_id: str
    downstream_remote_address: str
    worker: int | None = None  # the worker process index (omitted when not set)
    grpc_status: str | None = None  # a gRPC response's grpc-status (Envoy's %GRPC_STATUS_NUMBER%)
    # why the proxy answered itself, where Envoy says it: an authorization denial's
    # rbac_access_denied_matched_policy[...] (Envoy's %RESPONSE_CODE_DETAILS%)
    response_code_details: str | None = None
    # an AUDIT AuthorizationPolicy matched the request (Envoy's envoy.common access_log_hint)
    access_log_hint: bool | None = None
    # why TLS to the upstream failed (Envoy's %UPSTREAM_TRANSPORT_FAILURE_REASON%), on such failures only
    upstream_transport_failure_reason: str | None = None


def record(ctx: RequestContext, now_monotonic: float, timestamp: str, worker: int | None = None) -> AccessRecord:
    req = ctx.request
    flags = ctx.response_flags
    cluster = ctx.cluster
    rid = ctx.request_id
    return AccessRecord(
        "access",
        "info",
        timestamp,
        req.method.decode("latin-1"),
        req.target.decode("latin-1"),
        "HTTP/" + req.http_version.decode("latin-1"),
        req.authority.decode("latin-1"),
        ctx.status,
        ",".join(flags) if flags else "-",
        ctx.upstream_host or "-",
        cluster.name if cluster is not None else "-",
        ctx.bytes_received,
        ctx.bytes_sent,
        round((now_monotonic - ctx.start_monotonic) * 1000.0, 3),
        rid.decode("latin-1") if rid else "-",
        ctx.downstream_addr,
        worker,
        *_from_extra(ctx.extra),
        _transport_failure(ctx) if flags else None,
    )


def _transport_failure(ctx: RequestContext) -> str | None:
    error = ctx.error
    return str(error) if isinstance(error, UpstreamTlsFailure) else None


_NOTHING_EXTRA = (None, None, None)


def _from_extra(extra: dict | None) -> tuple[str | None, str | None, bool | None]:
    """(grpc_status, response_code_details, access_log_hint) from the stages' scratch state (most
    requests have none)."""
    if extra is None:
        return _NOTHING_EXTRA
    value = extra.get("grpc_status")
    return (value.decode("latin-1") if value is not None else None, extra.get("response_code_details"),
            extra.get("access_log_hint"))


def _address(address: tuple[str, int] | None) -> str:
    """Envoy's "ip:port" ("[ip]:port" for IPv6), "-" when unknown."""
    if address is None:
        return "-"
    ip, port = address[0], address[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _details(text: str | None) -> str:
    """Envoy's %RESPONSE_CODE_DETAILS% has no whitespace (it becomes "_"), so the line splits on spaces."""
    return "_".join(text.split()) if text else "-"


def text_line(ctx: RequestContext, now_monotonic: float, timestamp: str) -> str:
    """One request in ENVOY_TEXT_FORMAT (ending with a newline)."""
    req = ctx.request
    forwarded_for = user_agent = b"-"
    for name, value in req.headers:
        if name == b"x-forwarded-for":
            forwarded_for = value or b"-"
        elif name == b"user-agent":
            user_agent = value or b"-"
    flags = ctx.response_flags
    cluster = ctx.cluster
    route = ctx.route
    peer = ctx.peer
    extra = ctx.extra
    details = extra.get("response_code_details") if extra is not None else None
    if details is None and ctx.status and ctx.upstream_host and ctx.error is None:
        details = "via_upstream"  # the response came from the upstream, as Envoy says it
    failure = _transport_failure(ctx) if flags else None
    rid = ctx.request_id
    return (f'[{timestamp}] "{req.method.decode("latin-1")} {req.target.decode("latin-1")} '
            f'HTTP/{req.http_version.decode("latin-1")}" {ctx.status} {",".join(flags) if flags else "-"} '
            f'{_details(details)} - "{failure or "-"}" {ctx.bytes_received} {ctx.bytes_sent} '
            f'{int((now_monotonic - ctx.start_monotonic) * 1000.0)} - "{forwarded_for.decode("latin-1")}" '
            f'"{user_agent.decode("latin-1")}" "{rid.decode("latin-1") if rid else "-"}" '
            f'"{req.authority.decode("latin-1") or "-"}" "{ctx.upstream_host or "-"}" '
            f'{cluster.name if cluster is not None else "-"} - '
            f'{_address(ctx.original_destination or peer.local_address())} {ctx.downstream_addr or "-"} '
            f'{peer.sni or "-"} {route.name if route is not None and route.name else "-"}\n')


class ConnectionEntry(msgspec.Struct, omit_defaults=True, gc=False):
    """One TCP connection's access-log line, written when it closes: Envoy's TCP proxy fields, named
    as the request line names the same things."""

    event: str
    level: str
    timestamp: str  # when the connection was accepted
    protocol: str  # "tcp"
    response_flags: str  # "-", or UF (connect failed), UH (no healthy upstream), UO (overflow), UC, DC, SI
    upstream_host: str
    cluster: str
    bytes_received: int  # from downstream
    bytes_sent: int  # to downstream
    duration_ms: float
    downstream_remote_address: str
    downstream_local_address: str
    requested_server_name: str | None = None  # the TLS SNI when the proxy terminated TLS
    downstream_peer_principal: str | None = None  # the mTLS peer's SPIFFE identity (Envoy's %DOWNSTREAM_PEER_URI_SAN%)
    worker: int | None = None


def connection_text_line(entry: ConnectionEntry) -> str:
    """One TCP connection in ENVOY_TEXT_FORMAT: the HTTP-only fields print "-", the code 0, as Envoy's
    TCP proxy prints them."""
    return (f'[{entry.timestamp}] "- - -" 0 {entry.response_flags} - - "-" {entry.bytes_received} '
            f'{entry.bytes_sent} {int(entry.duration_ms)} - "-" "-" "-" "-" "{entry.upstream_host}" {entry.cluster} - '
            f'{entry.downstream_local_address} {entry.downstream_remote_address} '
            f'{entry.requested_server_name or "-"} -\n')


class AccessLog:
    """`fmt` is "off", "json", "text" or "console". `clock` must be the clock `ctx.start_monotonic` was read
    from: the server reads trio.current_time() (so `emit` runs inside the Trio loop)."""

    def __init__(self, fmt: str = "json", *, fd: int = 2, clock: Callable[[], float] = trio.current_time,
                 worker: int | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, got {fmt!r}")
        self.format = fmt
        self.enabled = fmt != "off"
        self._fd = fd
        self._clock = clock
        self._worker = worker
        self._wall = _WallClockFormatter()
        self._buf = bytearray()
        self.dropped_lines = 0
        if fmt == "off":
            self.emit = _discard  # type: ignore[method-assign]
            self.emit_connection = _discard_connection  # type: ignore[method-assign]
        elif fmt == "text":
            self.emit = self._emit_text  # type: ignore[method-assign]
        elif fmt == "console":
            import structlog

            self._console = structlog.dev.ConsoleRenderer(colors=False)
            self.emit = self._emit_console  # type: ignore[method-assign]

    def emit(self, ctx: RequestContext) -> None:
        """JSON line (replaced per instance for "off" and "console")."""
        buf = self._buf
        whole = len(buf)
        _encode_into(record(ctx, self._clock(), self._wall.format(ctx.start_wall), self._worker), buf, -1)
        buf += b"\n"
        if len(buf) >= PIPE_BUF:
            self._spill(whole)

    def emit_chosen(self, choice, ctx: RequestContext) -> None:  # noqa: ANN001 - config.telemetry.AccessLogChoice
        """A request under a Telemetry accessLogging choice: maybe no line (disabled, or its filter
        says no), and the `envoy` provider's text format whatever this log's format is."""
        if not choice.logs(ctx):
            return
        if choice.text:
            self._emit_text(ctx)
        else:
            self.emit(ctx)

    def _emit_text(self, ctx: RequestContext) -> None:
        line = text_line(ctx, self._clock(), self._wall.format(ctx.start_wall))
        self._append(line.encode("utf-8", "replace"))

    def emit_connection(self, entry: ConnectionEntry, *, text: bool = False) -> None:
        """A TCP connection's line, in this log's format (`text`: in Envoy's text format whatever it is)."""
        if self._worker is not None:
            entry.worker = self._worker
        if text:
            self._append(connection_text_line(entry).encode("utf-8", "replace"))
        elif self.format == "json":
            buf = self._buf
            whole = len(buf)
            _encode_into(entry, buf, -1)
            buf += b"\n"
            if len(buf) >= PIPE_BUF:
                self._spill(whole)
        elif self.format == "text":
            self._append(connection_text_line(entry).encode("utf-8", "replace"))
        else:
            fields = {k: v for k, v in msgspec.structs.asdict(entry).items() if v is not None}
            self._append(self._console(None, "info", fields).encode("utf-8", "replace") + b"\n")

    def wall_timestamp(self, wall: float) -> str:
        return self._wall.format(wall)

    def _append(self, line: bytes) -> None:
        buf = self._buf
        whole = len(buf)
        buf += line
        if len(buf) >= PIPE_BUF:
            self._spill(whole)

    def _emit_console(self, ctx: RequestContext) -> None:
        rec = record(ctx, self._clock(), self._wall.format(ctx.start_wall), self._worker)
        fields = msgspec.structs.asdict(rec)
        if rec.worker is None:
            del fields["worker"]
        buf = self._buf
        whole = len(buf)
        buf += self._console(None, "info", fields).encode("utf-8", "replace") + b"\n"
        if len(buf) >= PIPE_BUF:
            self._spill(whole)

    def _spill(self, whole: int) -> None:
        """The buffer reached PIPE_BUF: write the whole lines before offset `whole` and keep the
        newest line (or write everything when that one line alone is so long)."""
        buf = self._buf
        cut = whole or len(buf)
        self._write(buf[:cut])
        del buf[:cut]

    def flush(self) -> None:
        if self._buf:
            self._write(self._buf)
            self._buf.clear()

    def _write(self, data: bytes | bytearray) -> None:
        data = bytes(data)  # no memoryview export may outlive the call: the caller resizes the buffer
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError:
            # a closed or full stderr must never take the data plane down; count what was lost
            self.dropped_lines += data.count(b"\n", done)
