"""Real-socket harness for the traffic-control tests: Istio YAML compiled into a snapshot whose
backends are in-process Trio servers on 127.0.0.1, served by the real data plane, driven by a small
keep-alive HTTP/1.1 client (h11, the reference parser, so it judges what the proxy sends)."""

from __future__ import annotations

from functools import partial
import json
import socket
from typing import Any

import h11
import trio

from proxy.config.snapshot import Snapshot
from proxy.l7.dataplane import DataPlane, HttpSettings
from proxy.l7.server import serve_listener
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from tests.config.helpers import compile_docs, doc

GATEWAY_PORT = 8080
LISTENER = f"127.0.0.1_{GATEWAY_PORT}"


class TrafficBackend:
    """Answers every request with `status` (changeable at run time) after `delay_s`, body = its name
    (or a JSON echo of the request for path /echo). Records each request."""

    def __init__(self, name: str, status: int = 200, delay_s: float = 0.0) -> None:
        self.name = name
        self.status = status
        self.delay_s = delay_s
        self.port = 0
        self.requests: list[dict] = []
        self.connections = 0
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.close_without_answer = False

    async def start(self, nursery: trio.Nursery) -> "TrafficBackend":
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                record = {"method": request.method.decode(), "target": request.target.decode(),
                          "headers": {n.decode(): v.decode() for n, v in request.headers},
                          "body": body.decode("latin-1"), "backend": self.name}
                self.requests.append(record)
                if self.close_without_answer:
                    return
                if self.delay_s:
                    await trio.sleep(self.delay_s)
                out = json.dumps(record).encode() if request.target.startswith(b"/echo") else self.name.encode()
                headers = [(b"content-length", b"%d" % len(out)), (b"x-backend", self.name.encode()),
                           *self.extra_headers]
                await stream.send_all(conn.send(h11.Response(status_code=self.status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.move_on_after(1):
                await stream.aclose()


class Response:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.decode().lower() == name:
                return v.decode()
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection to the proxy (reconnects when the proxy closes it)."""

    def __init__(self, port: int, host: str = "svc.example.com") -> None:
        self.port = port
        self.host = host
        self.stream: trio.SocketStream | None = None
        self.conn: h11.Connection | None = None

    async def request(self, path: str = "/", *, method: str = "GET", headers: list[tuple[str, str]] = (),
                      body: bytes = b"", host: str | None = None, timeout_s: float = 10.0) -> Response:
        with trio.fail_after(timeout_s):
            if self.stream is None or self.conn.our_state is not h11.IDLE:
                await self.close()
                self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                self.conn = h11.Connection(h11.CLIENT)
            hdrs = [("host", host or self.host), *headers]
            if body:
                hdrs.append(("content-length", str(len(body))))
            conn = self.conn
            data = conn.send(h11.Request(method=method, target=path, headers=hdrs))
            if body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
            await self.stream.send_all(data)
            status, rheaders, rbody = 0, [], b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await self.stream.receive_some(65536)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    status, rheaders = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    rbody += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("proxy closed the connection")
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                await self.close()
            return Response(status, rheaders, rbody)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        self.stream = None
        self.conn = None


# --------------------------------------------------------------------------------------------------
# config builders


def gateway() -> dict:
    return doc("Gateway", "gw", {"servers": [{"port": {"number": GATEWAY_PORT, "name": "http", "protocol": "HTTP"},
                                              "hosts": ["*"]}]})


def service_entry(host: str, backends: list[tuple[TrafficBackend, dict[str, str]]], port: int = 80) -> dict:
    """A STATIC ServiceEntry whose endpoints are the backends (with their labels)."""
    return doc("ServiceEntry", host.split(".")[0], {
        "hosts": [host], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1", "ports": {"http": b.port}, "labels": labels} for b, labels in backends],
    })


def virtual_service(name: str, host: str, http: list[dict]) -> dict:
    return doc("VirtualService", name, {"hosts": [host], "gateways": ["gw"], "http": http})


def destination_rule(name: str, host: str, **spec: Any) -> dict:
    return doc("DestinationRule", name, {"host": host, **spec})


class Proxy:
    def __init__(self, plane: DataPlane, port: int, proxy_labels: dict[str, str] | None = None) -> None:
        self.plane = plane
        self.port = port
        self.proxy_labels = proxy_labels

    def counter(self, name: str, **labels: str) -> int:
        return self.plane.stats.counter(name, **labels).value

    def gauge(self, name: str, **labels: str) -> int:
        return self.plane.stats.gauge(name, **labels).value

    def apply(self, *docs: dict) -> Snapshot:
        snap = compile_docs(gateway(), *docs, proxy_labels=self.proxy_labels)
        self.plane.holder.swap(snap)
        return snap


async def start(nursery: trio.Nursery, *docs: dict, settings: HttpSettings | None = None,
                proxy_labels: dict[str, str] | None = None) -> Proxy:
    snap = compile_docs(gateway(), *docs, proxy_labels=proxy_labels)
    assert any(l.name == LISTENER for l in snap.listeners)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    plane = DataPlane(SnapshotHolder(snap), Stats(), None, settings)
    plane.background = nursery
    await nursery.start(serve_listener, sock, LISTENER, plane)
    return Proxy(plane, port, proxy_labels)
