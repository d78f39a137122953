"""A small async etcd v3 client over etcd's JSON gateway, on Trio: key reads, compare-and-swap writes,
leases, and watch streams.

The control plane needs a handful of calls, so it speaks them directly (HTTP/1.1 + JSON, keys and
values in base64 as the gateway wants) rather than through a PyPI client: the gRPC clients bring grpcio
and generated protobuf code, the JSON-gateway ones are blocking wrappers of the same requests.

Theory of operation. Each call is one POST on a new loopback/LAN connection (writes are human-paced
applies and proxy registrations; a keep-alive pool would save a connect per call and add state), with
h11 reading the response. A call tries the member that answered last first, then the others: a member
that is down, or answers an error (no leader during an election, a timeout forwarding to the leader),
does not fail a request another member can serve. Rounds repeat with a short pause until `deadline_s`,
so a write made during an election waits for the new leader instead of failing; a round in which no
member accepted the connection ends the call at once (etcd is down: nothing to wait for). A watch is one long
POST whose chunked response carries one JSON object per line.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import h11
import trio

from proxy.xds.failover import ControlPlaneAddress, parse_addresses

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a full read of every registration of a large mesh fits


class EtcdUnavailable(OSError):
    """No etcd endpoint answered within the deadline."""


class WatchCompacted(Exception):
    """The revision a watch resumes from was compacted away: the caller reads everything again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


class WatchCanceled(Exception):
    """The member ended the watch with an error: the caller resumes it."""


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int  # the store's revision the read saw


@dataclass(frozen=True)
class WatchEvent:
    key: bytes
    value: bytes | None  # None: the key was deleted (or its lease expired)
    mod_revision: int


def parse_store_url(url: str) -> tuple[ControlPlaneAddress, ...]:
    """`etcd://host:port[,host:port...]` -> endpoints. Raises ValueError."""
    prefix = "etcd://"
    if not url.startswith(prefix):
        raise ValueError(f"expected etcd://HOST:PORT[,HOST:PORT...], got {url!r}")
    return parse_addresses(url[len(prefix):].rstrip("/"))


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range of every key starting with `prefix` (etcd's rule)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _key_value(kv: dict) -> KeyValue:
    return KeyValue(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")),
                    int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))


class _Refused(Exception):
    """One member could not serve the call (its message is kept for the error the caller sees)."""

    def __init__(self, message: str, *, connect_failed: bool = False) -> None:
        super().__init__(message)
        self.connect_failed = connect_failed


def _request_bytes(endpoint: ControlPlaneAddress, path: str, body: bytes) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method="POST", target=path, headers=[
        ("Host", f"{endpoint.host}:{endpoint.port}"), ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))), ("Connection", "close")]))
    data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    return conn, data


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


def _connect_error(e: Exception) -> str:
    """Trio's connect error wraps each address's failure (e.g. ECONNREFUSED): name that one."""
    cause = e.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return str(cause) if isinstance(cause, OSError) else str(e) or type(e).__name__


class EtcdClient:
    def __init__(self, endpoints: tuple[ControlPlaneAddress, ...], *, attempt_timeout_s: float = 2.0,
                 deadline_s: float = 6.0) -> None:
        self.endpoints = endpoints
        self.attempt_timeout_s = attempt_timeout_s
        self.deadline_s = deadline_s
        self._preferred = 0  # the endpoint that answered last

    def __str__(self) -> str:
        return "etcd://" + ",".join(map(str, self.endpoints))

    def _order(self) -> list[int]:
        count = len(self.endpoints)
        return [(self._preferred + i) % count for i in range(count)]

    async def _post(self, endpoint: ControlPlaneAddress, path: str, body: bytes) -> dict:
        """One call to one member. Raises _Refused."""
        conn, data = _request_bytes(endpoint, path, body)
        try:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as e:
            raise _Refused(f"{endpoint}: {_connect_error(e)}", connect_failed=True) from e
        async with stream:
            try:
                await stream.send_all(data)
                response = await _next_event(conn, stream)
                chunks = []
                size = 0
                while True:
                    event = await _next_event(conn, stream)
                    if isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_RESPONSE_BYTES:
                            raise _Refused(f"{endpoint}: response over {MAX_RESPONSE_BYTES} bytes")
                        chunks.append(event.data)
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
            except (OSError, trio.BrokenResourceError, h11.ProtocolError) as e:
                raise _Refused(f"{endpoint}: {type(e).__name__}: {e}") from e
        text = b"".join(chunks)
        assert isinstance(response, h11.Response)
        if response.status_code != 200:  # e.g. no leader during an election: another member may serve
            raise _Refused(f"{endpoint}: {response.status_code} {text[:200].decode(errors='replace')}")
        try:
            return json.loads(text)
        except ValueError as e:
            raise _Refused(f"{endpoint}: not JSON: {e}") from e

    async def call(self, path: str, body: dict) -> dict:
        """POST to the members in turn until one answers 200, for up to `deadline_s`. Raises
        EtcdUnavailable naming each member's last error."""
        payload = json.dumps(body).encode()
        errors: dict[int, str] = {}
        with trio.move_on_after(self.deadline_s):
            while True:
                refused = 0
                for index in self._order():
                    with trio.move_on_after(self.attempt_timeout_s):
                        try:
                            reply = await self._post(self.endpoints[index], path, payload)
                        except _Refused as e:
                            errors[index] = str(e)
                            refused += e.connect_failed
                            continue
                        self._preferred = index
                        return reply
                    errors[index] = f"{self.endpoints[index]}: no answer within {self.attempt_timeout_s}s"
                if refused == len(self.endpoints):
                    break  # no member is running: no election will end this soon
                await trio.sleep(0.2)
        raise EtcdUnavailable(f"etcd unavailable ({'; '.join(errors[i] for i in sorted(errors)) or 'no attempt'})")

    # ---- keys

    async def range(self, key: bytes, *, prefix: bool = False) -> RangeResult:
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        reply = await self.call("/v3/kv/range", body)
        return RangeResult([_key_value(kv) for kv in reply.get("kvs", [])], int(reply["header"]["revision"]))

    async def put_if_unchanged(self, key: bytes, value: bytes, mod_revision: int) -> int | None:
        """Write `value` if the key's mod_revision is still `mod_revision` (0: the key does not exist).
        The new revision, or None when another writer came first."""
        reply = await self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })
        if not reply.get("succeeded"):
            return None
        return int(reply["header"]["revision"])

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """The new revision."""
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        reply = await self.call("/v3/kv/put", body)
        return int(reply["header"]["revision"])

    async def delete_if_lease(self, key: bytes, lease: int) -> int | None:
        """Delete the key only while it is attached to `lease` (whoever wrote it since keeps it). The
        revision of the delete, or None when the key was not on that lease."""
        reply = await self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": str(lease)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })
        if not reply.get("succeeded"):
            return None
        return int(reply["header"]["revision"])

    # ---- leases

    async def grant_lease(self, ttl_s: int) -> int:
        reply = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(reply["ID"])

    async def keep_alive(self, lease: int) -> bool:
        """Renew the lease once. False when it has expired (its keys are gone)."""
        reply = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0)) > 0

    # ---- watch

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """The changes under `prefix` from `start_revision` on, one list per etcd watch response (the
        first, empty, says the watch is set up). Ends (returns) when the member closes the stream; raises EtcdUnavailable when no member
        accepts it, WatchCompacted when `start_revision` is gone."""
        body = json.dumps({"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                              "start_revision": str(start_revision)}}).encode()
        errors = []
        for index in self._order():
            endpoint = self.endpoints[index]
            conn, data = _request_bytes(endpoint, "/v3/watch", body)
            streaming = False
            try:
                with trio.fail_after(self.attempt_timeout_s):
                    stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            except (OSError, trio.TooSlowError) as e:
                errors.append(f"{endpoint}: {_connect_error(e)}")
                continue
            async with stream:
                try:
                    with trio.fail_after(self.attempt_timeout_s):
                        await stream.send_all(data)
                        response = await _next_event(conn, stream)
                    if not isinstance(response, h11.Response) or response.status_code != 200:
                        errors.append(f"{endpoint}: {getattr(response, 'status_code', response)}")
                        continue
                    self._preferred = index
                    streaming = True
                    pending = b""
                    while True:
                        event = await _next_event(conn, stream)
                        if not isinstance(event, h11.Data):
                            return  # the member ended the stream: the caller resumes
                        pending += event.data
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            if line.strip():
                                yield _watch_events(json.loads(line))
                except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError, ValueError) as e:
                    if streaming:
                        return  # a stream that was serving broke (its member went away): the caller resumes
                    errors.append(f"{endpoint}: {type(e).__name__}: {e}")
        raise EtcdUnavailable(f"etcd watch unavailable ({'; '.join(errors)})")


def _watch_events(message: dict) -> list[WatchEvent]:
    result = message.get("result")
    if result is None:
        raise WatchCanceled(str(message.get("error", message)))
    if int(result.get("compact_revision", 0)) > 0:
        raise WatchCompacted(int(result["compact_revision"]))
    if result.get("canceled"):
        raise WatchCanceled(result.get("cancel_reason", "") or "canceled by the server")
    out = []
    for event in result.get("events", []):
        kv = event["kv"]
        deleted = event.get("type") == "DELETE"
        out.append(WatchEvent(base64.b64decode(kv["key"]), None if deleted else base64.b64decode(kv.get("value", "")),
                              int(kv["mod_revision"])))
    return out
