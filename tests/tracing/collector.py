"""A Zipkin v2 collector for the tests: `POST /api/v2/spans` on 127.0.0.1, every span checked against
the Zipkin v2 schema (zipkin2-api.yaml: ids, kinds, microsecond timestamps, durations, endpoints,
string tags); what breaks the schema is kept in `violations`, what passes in `spans`."""

from __future__ import annotations

import json
import re
import socket
import time
from functools import partial
from typing import Any

import h11
import trio

TRACE_ID = re.compile(r"^[0-9a-f]{16}$|^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
KINDS = {"CLIENT", "SERVER", "PRODUCER", "CONSUMER"}
SPAN_FIELDS = {"traceId", "id", "parentId", "name", "kind", "timestamp", "duration", "debug", "shared",
               "localEndpoint", "remoteEndpoint", "annotations", "tags"}
ENDPOINT_FIELDS = {"serviceName", "ipv4", "ipv6", "port"}


def schema_violations(span: Any) -> list[str]:
    """What in one span breaks the Zipkin v2 schema (empty when nothing does)."""
    if not isinstance(span, dict):
        return [f"span is not an object: {span!r}"]
    problems = [f"unknown field {k}" for k in span if k not in SPAN_FIELDS]
    if not isinstance(span.get("traceId"), str) or not TRACE_ID.match(span["traceId"]):
        problems.append(f"traceId {span.get('traceId')!r} is not 16 or 32 lowercase hex")
    if not isinstance(span.get("id"), str) or not SPAN_ID.match(span["id"]):
        problems.append(f"id {span.get('id')!r} is not 16 lowercase hex")
    if "parentId" in span and (not isinstance(span["parentId"], str) or not SPAN_ID.match(span["parentId"])):
        problems.append(f"parentId {span['parentId']!r} is not 16 lowercase hex")
    if span.get("kind") not in KINDS:
        problems.append(f"kind {span.get('kind')!r}")
    now_us = time.time() * 1_000_000
    timestamp = span.get("timestamp")
    # epoch microseconds: within the last hour (seconds or milliseconds would be far in the past)
    if not isinstance(timestamp, int) or not now_us - 3600e6 < timestamp <= now_us + 1e6:
        problems.append(f"timestamp {timestamp!r} is not epoch microseconds of this test")
    duration = span.get("duration")
    if not isinstance(duration, int) or not 1 <= duration < 60e6:
        problems.append(f"duration {duration!r} is not a positive microsecond count")
    if not isinstance(span.get("name", ""), str):
        problems.append("name is not a string")
    for key in ("localEndpoint", "remoteEndpoint"):
        endpoint = span.get(key)
        if endpoint is None:
            continue
        if not isinstance(endpoint, dict) or set(endpoint) - ENDPOINT_FIELDS:
            problems.append(f"{key} {endpoint!r}")
        elif "port" in endpoint and not isinstance(endpoint["port"], int):
            problems.append(f"{key}.port {endpoint['port']!r}")
    if "localEndpoint" not in span or not span["localEndpoint"].get("serviceName"):
        problems.append("no localEndpoint.serviceName")
    tags = span.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        problems.append(f"tags are not a string map: {tags!r}")
    return problems


class ZipkinCollector:
    def __init__(self, status: int = 202) -> None:
        self.status = status
        self.port = 0
        self.spans: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.posts = 0
        self._arrived = trio.Event()

    async def start(self, nursery: trio.Nursery, listening: socket.socket | None = None) -> ZipkinCollector:
        """Serve on 127.0.0.1 (a free port), or on `listening`, a bound and listening socket (e.g. one
        made in a network namespace)."""
        if listening is None:
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        else:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(listening))
            listeners = await nursery.start(trio.serve_listeners, self._handle, [listener])
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def wait_spans(self, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """The spans once at least `count` arrived (fails the test after `timeout_s`)."""
        with trio.fail_after(timeout_s):
            while len(self.spans) < count:
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self.spans

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        self.posts += 1
        if request.method != b"POST" or request.target != b"/api/v2/spans":
            self.violations.append(f"{request.method!r} {request.target!r}: not POST /api/v2/spans")
        elif dict(request.headers).get(b"content-type") != b"application/json":
            self.violations.append(f"content-type {dict(request.headers).get(b'content-type')!r}")
        try:
            spans = json.loads(body)
        except ValueError as e:
            self.violations.append(f"body is not JSON: {e}")
            spans = []
        if not isinstance(spans, list):
            self.violations.append("body is not a list of spans")
            spans = []
        for span in spans:
            problems = schema_violations(span)
            self.violations.extend(problems)
            if not problems:
                self.spans.append(span)
        await stream.send_all(conn.send(h11.Response(status_code=self.status, headers=[(b"content-length", b"0")]))
                              + conn.send(h11.EndOfMessage()))
        await stream.aclose()
        self._arrived.set()
