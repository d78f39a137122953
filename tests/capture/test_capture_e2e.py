"""End to end in real namespaces: capture installed in an "app" pod, our forwarder as the sidecar.

Outbound: a client process running as an ordinary uid connects to the server's address; the nat
rules divert it to the forwarder on :15001, which runs as the excluded proxy uid, reads
SO_ORIGINAL_DST and dials the server itself. That dial is not captured again only because of the
`-m owner --uid-owner` exclusion: one client connection must give exactly one forwarded connection.
Inbound: a connection from the server pod to the app's port is diverted to :15006 and handed to
the app from 127.0.0.6, the source the rules let through.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from proxy.l4.capture import iptables
from proxy.l4.capture.lab import Lab, open_lab
from proxy.l4.capture.rules import CaptureOptions

from .conftest import needs_tool, requires_root

pytestmark = [
    requires_root,
    needs_tool("ip", "iproute2"),
    needs_tool("iptables-restore", "iptables"),
    needs_tool("curl", "curl"),
    needs_tool("setpriv", "util-linux"),
]

PROXY_UID = 1337
APP_UID = 1000
REPO = Path(__file__).resolve().parents[2]


class LineReader:
    """JSON lines from a child's stdout, with a deadline per line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self, timeout_s: float = 10.0) -> dict:
        with trio.fail_after(timeout_s):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(4096)
                if not chunk:
                    raise EOFError("the forwarder exited")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    async def nothing_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self.next(seconds + 1)
            return False
        return True


@asynccontextmanager
async def forwarder(lab: Lab, node: str, *args: str) -> AsyncIterator[LineReader]:
    """python -m proxy.l4.forward inside a node's namespace; yields its event lines."""
    argv = lab.argv(node, [sys.executable, "-m", "proxy.l4.forward", *args])
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, cwd=REPO)
    try:
        lines = LineReader(proc.stdout)  # type: ignore[arg-type]
        listening = await lines.next()
        assert listening["event"] == "listening" and listening["uid"] == PROXY_UID
        yield lines
    finally:
        # our own child, by its handle; it must be gone before the lab's namespaces are removed
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def http_responder(lab: Lab, node: str, port: int) -> AsyncIterator[list[str]]:
    """A tiny HTTP server on a node's address; answers with the peer it saw. Yields those peers."""
    listener = trio.socket.from_stdlib_socket(lab.socket(node))
    await listener.bind(("0.0.0.0", port))
    listener.listen(16)
    peers: list[str] = []

    async def answer(sock: trio.socket.SocketType, peer: str) -> None:
        with sock:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = await sock.recv(4096)
                if not chunk:
                    return
                head += chunk
            body = f"hello from {node}, peer={peer}".encode()
            await sock.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    async def serve() -> None:
        while True:
            sock, addr = await listener.accept()
            peers.append(addr[0])
            nursery.start_soon(answer, sock, addr[0])

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield peers
            nursery.cancel_scope.cancel()


async def curl_as(lab: Lab, node: str, uid: int, url: str) -> str:
    argv = lab.argv(
        node,
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "curl", "-sS", "--max-time", "5", url],
    )
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def test_outbound_capture_through_sidecar_without_loop() -> None:
    with open_lab(["app", "server"]) as lab, trio.fail_after(30):
        app, server = lab.node("app"), lab.node("server")
        iptables.install(
            CaptureOptions(proxy_uid=str(PROXY_UID), proxy_gid=str(PROXY_UID), inbound_intercepted_ports=""),
            netns=app.netns,
        )
        async with http_responder(lab, "server", 8080) as server_peers, forwarder(
            lab, "app", "--listen", "0.0.0.0:15001", "--original-dst", "--run-as-uid", str(PROXY_UID)
        ) as sidecar:
            body = await curl_as(lab, "app", APP_UID, "http://server:8080/hello")
            assert body == f"hello from server, peer={app.ipv4}"
            event = await sidecar.next()
            assert event["event"] == "connection"
            assert event["orig_dst"] == f"{server.ipv4}:8080" and event["redirected"] is True
            assert event["upstream"] == f"{server.ipv4}:8080" and event["error"] is None
            response_head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            assert event["bytes_upstream_to_downstream"] == len(response_head) + len(body)
            assert event["bytes_downstream_to_upstream"] > len("GET /hello HTTP/1.1\r\n")
            # one client connection -> one sidecar connection -> one server connection: no loop
            assert await sidecar.nothing_within(0.3)
            assert server_peers == [app.ipv4]

            # the proxy's own uid is never captured: the same request as uid 1337 goes direct
            assert await curl_as(lab, "app", PROXY_UID, "http://server:8080/direct") == body
            assert await sidecar.nothing_within(0.3)
            assert server_peers == [app.ipv4, app.ipv4]


async def test_inbound_capture_hands_connections_to_the_app_from_127_0_0_6() -> None:
    with open_lab(["app", "server"]) as lab, trio.fail_after(30):
        app = lab.node("app")
        iptables.install(CaptureOptions(proxy_uid=str(PROXY_UID), proxy_gid=str(PROXY_UID)), netns=app.netns)
        async with http_responder(lab, "app", 9080) as app_peers, forwarder(
            lab,
            "app",
            "--listen",
            "0.0.0.0:15006",
            "--original-dst",
            "--bind-source",
            "127.0.0.6",
            "--run-as-uid",
            str(PROXY_UID),
        ) as sidecar:
            body = await curl_as(lab, "server", APP_UID, "http://app:9080/reviews")
            assert body == "hello from app, peer=127.0.0.6"
            event = await sidecar.next()
            assert event["orig_dst"] == f"{app.ipv4}:9080" and event["redirected"] is True
            assert event["client"].startswith(lab.node("server").ipv4 + ":")
            assert await sidecar.nothing_within(0.3)
            assert app_peers == ["127.0.0.6"]
