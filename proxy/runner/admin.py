"""The admin listener: a tiny HTTP/1.1 server (h11 on Trio; not the data path) for /ready,
/stats/prometheus, /config_dump, /config_status (the version served beside the last rejected
update), /certs (the Gateway certificates: subject, SANs, expiry) and /server_info (state, and which
TLS library the data path uses), answering from what the supervisor knows, and POST
/drain_listeners and /quitquitquit (Envoy's names) that start a drain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h11
import msgspec
import trio

MAX_REQUEST_BYTES = 16 << 10
IDLE_TIMEOUT_S = 30.0

Reply = tuple[int, bytes, bytes]  # status, content-type, body
Respond = Callable[[bytes, bytes], Awaitable[Reply]]  # (method, target) -> reply

_json = msgspec.json.Encoder(enc_hook=str)


class AdminState(Protocol):
    def is_ready(self) -> bool: ...
    async def stats_prometheus(self) -> str: ...
    def config_dump(self) -> dict[str, Any]: ...
    def config_status(self) -> dict[str, Any]: ...
    def certs(self) -> dict[str, Any]: ...
    def server_info(self) -> dict[str, Any]: ...
    def start_drain(self, reason: str, *, exit_after: bool = True) -> None: ...


def _drain(state: AdminState, method: bytes, path: bytes, query: bytes) -> Reply:
    """Envoy's endpoints, with their parameters: POST /drain_listeners?graceful drains, then exits
    (`&skip_exit`: stays up, not ready); without `graceful` the listeners stop at once and the
    process stays. POST /quitquitquit: drain, then exit."""
    if method != b"POST":
        return 405, b"text/plain", b"method not allowed: use POST\n"
    params = {p.partition(b"=")[0] for p in query.split(b"&") if p}
    if path == b"/quitquitquit":
        state.start_drain("/quitquitquit")
        return 200, b"text/plain", b"OK\n"
    if b"inboundonly" in params:  # no inbound/outbound split of the listeners here: say so, drain nothing
        return 400, b"text/plain", b"inboundonly is not supported: /drain_listeners drains every listener\n"
    graceful = b"graceful" in params
    state.start_drain("/drain_listeners", exit_after=graceful and b"skip_exit" not in params)
    return 200, b"text/plain", b"OK\n"


async def route(state: AdminState, method: bytes, target: bytes) -> Reply:
    path, _, query = target.partition(b"?")
    if path in (b"/drain_listeners", b"/quitquitquit"):
        return _drain(state, method, path, query)
    if method not in (b"GET", b"HEAD"):
        return 405, b"text/plain", b"method not allowed\n"
    if path == b"/ready":
        if state.is_ready():
            return 200, b"text/plain", b"LIVE\n"
        return 503, b"text/plain", b"NOT_READY\n"
    if path == b"/stats/prometheus":
        return 200, b"text/plain; version=0.0.4", (await state.stats_prometheus()).encode()
    if path == b"/config_dump":
        return 200, b"application/json", msgspec.json.format(_json.encode(state.config_dump()), indent=2) + b"\n"
    if path == b"/certs":
        return 200, b"application/json", msgspec.json.format(_json.encode(state.certs()), indent=2) + b"\n"
    if path == b"/server_info":
        return 200, b"application/json", msgspec.json.format(_json.encode(state.server_info()), indent=2) + b"\n"
    if path == b"/config_status":
        return 200, b"application/json", msgspec.json.format(_json.encode(state.config_status()), indent=2) + b"\n"
    return 404, b"text/plain", b"not found\n"


async def _handle_connection(stream: trio.SocketStream, respond: Respond, log: Any) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(IDLE_TIMEOUT_S) as timeout:
                    data = await stream.receive_some(MAX_REQUEST_BYTES)
                if timeout.cancelled_caught:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                status, ctype, body = await respond(event.method, event.target)
                headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                if event.method != b"HEAD":
                    await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            elif isinstance(event, (h11.ConnectionClosed,)) or event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                return
    except h11.RemoteProtocolError as e:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"bad request: {e}\n".encode()
            try:
                await stream.send_all(conn.send(h11.Response(
                    status_code=e.error_status_hint,
                    headers=[(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                             (b"connection", b"close")])))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            except (h11.LocalProtocolError, trio.BrokenResourceError):
                pass
    except trio.BrokenResourceError:
        return
    except Exception:  # noqa: BLE001 - one broken admin request must not stop the admin listener
        log.exception("admin_request_failed")
    finally:
        await stream.aclose()


async def open_admin_socket(host: str, port: int) -> trio.socket.SocketType:
    """Bound and listening. Plain SO_REUSEADDR (no REUSEPORT): a second proxy on the same admin
    port must fail loudly instead of sharing it."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_admin(sock: trio.socket.SocketType, state: AdminState, log: Any,
                      *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def respond(method: bytes, target: bytes) -> Reply:
        return await route(state, method, target)

    await serve_http(sock, respond, log, task_status=task_status)


async def serve_http(sock: trio.socket.SocketType, respond: Respond, log: Any,
                     *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer GET/HEAD/POST requests on `sock` with `respond` (also the control plane's mesh view)."""
    listener = trio.SocketListener(sock)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_connection(stream, respond, log)

    await trio.serve_listeners(handler, [listener], task_status=task_status)
