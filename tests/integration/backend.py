"""A real HTTP/1.1 backend for data-plane tests, on a real 127.0.0.1 socket in the test's Trio loop.

Requests are parsed with h11 (the reference implementation, so the backend judges what the proxy
sends); responses are written as raw bytes so tests can make an upstream misbehave on purpose.
Routes by path:
  /small                 200, 5-byte body, content-length
  /echo                  200, JSON of method, target, headers and body as received
  /chunked?n=K           200, K chunks of "piece-i\\n", chunked encoding
  /close-delimited       200 with no length, body ends when the connection closes
  /die-mid-response      head says content-length 1000, sends 10 bytes, then resets
  /die-before-response   closes the connection without answering
  /slow?ms=N             answers /small after N ms
  /status/NNN            that status, empty body
  /head-test             200 with content-length 1234 (for HEAD)
  /early-413             answers 413 at once without reading the request body, then closes
  /ws                    101 Switching Protocols, then echoes bytes upper-cased
  /extra-bytes           "ok" with content-length 2, then the bytes of a second, unasked-for response
  /stall-mid-response    head says content-length 1000, sends 10 bytes, then goes quiet for 30 s
"""

from __future__ import annotations

from functools import partial
import json
import socket
import struct

import h11
import trio


class Backend:
    def __init__(self, name: str = "backend") -> None:
        self.name = name
        self.port = 0
        self.requests: list[dict] = []
        self.connections = 0

    async def start(self, nursery: trio.Nursery) -> "Backend":
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                        path = request.target.split(b"?")[0]
                        if path in (b"/early-413", b"/ws"):
                            break
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                record = {
                    "method": request.method.decode(),
                    "target": request.target.decode(),
                    "headers": [[n.decode(), v.decode()] for n, v in request.headers],
                    "body": body.decode("latin-1"),
                    "backend": self.name,
                }
                self.requests.append(record)
                keep = await self._respond(stream, request, record, conn)
                if not keep:
                    return
                # responses are written raw, so h11 never saw them: continue on a fresh parser with
                # whatever the client already pipelined
                leftover = conn.trailing_data[0]
                conn = h11.Connection(h11.SERVER)
                if leftover:
                    conn.receive_data(leftover)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _respond(self, stream: trio.SocketStream, request: h11.Request, record: dict, conn) -> bool:
        target = request.target.decode()
        path, _, query = target.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        send = stream.send_all
        if path == "/small":
            await send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\nx-backend: "
                       + self.name.encode() + b"\r\n\r\nhello")
        elif path == "/echo":
            out = json.dumps(record).encode()
            await send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                       % (len(out), out))
        elif path == "/chunked":
            n = int(params.get("n", "3"))
            parts = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
            for i in range(n):
                piece = b"piece-%d\n" % i
                parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            parts.append(b"0\r\n\r\n")
            await send(b"".join(parts))
        elif path == "/close-delimited":
            await send(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-the-end")
            return False
        elif path == "/die-mid-response":
            await send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            await trio.sleep(0.05)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif path == "/extra-bytes":
            await send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                       b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON")
        elif path == "/stall-mid-response":
            await send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            await trio.sleep(30)
            return False
        elif path == "/die-before-response":
            return False
        elif path == "/slow":
            await trio.sleep(int(params.get("ms", "100")) / 1000)
            await send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        elif path.startswith("/status/"):
            await send(b"HTTP/1.1 %s X\r\ncontent-length: 0\r\n\r\n" % path[8:].encode())
        elif path == "/head-test":
            await send(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
                       + (b"" if request.method == b"HEAD" else b"h" * 1234))
        elif path == "/early-413":
            await send(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig")
            return False
        elif path == "/ws":
            await send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            data = conn.trailing_data[0]
            if data:
                await send(data.upper())
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return False
                await send(data.upper())
        else:
            await send(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        return True
