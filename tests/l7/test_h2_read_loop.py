"""The HTTP/2 server's reader on a real socket: after a read that emptied the socket it waits before
reading again, instead of trying a recv that can only say EAGAIN (an OSError CPython builds with its
strerror text, the costliest step of an idle read)."""

from __future__ import annotations

import socket

import trio

from proxy.l7.connio import RECV_BYTES, Conn
from proxy.l7.h2_connection import H2Connection, ResponseReceived
from proxy.l7.h2_server import serve_h2_connection
from proxy.l7.dataplane import DataPlane
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from tests.integration.l7_harness import LISTENER, make_snapshot


class RecordingConn(Conn):
    """A real connection that notes, for each fill, whether it was asked to wait first and what it read."""

    __slots__ = ("fills",)

    def __init__(self, sock: socket.socket, initial: bytes) -> None:
        super().__init__(sock, initial)
        self.fills: list[tuple[bool, int]] = []

    async def fill(self, deadline: float = float("inf"), *, wait_first: bool = False) -> int:
        n = await super().fill(deadline, wait_first=wait_first)
        self.fills.append((wait_first, n))
        return n


async def _request(client: H2Connection, sock: socket.socket, stream_id: int) -> list:
    client.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                                    (b":path", b"/nothing-routes-here")], True)
    await trio.lowlevel.wait_writable(sock)
    sock.send(client.data_to_send())
    events: list = []
    while not any(getattr(e, "stream_id", None) == stream_id and getattr(e, "stream_ended", False) for e in events):
        await trio.lowlevel.wait_readable(sock)
        events += client.receive_data(sock.recv(65536))
    return events


async def test_after_a_short_read_the_reader_waits_before_its_next_recv():
    plane = DataPlane(SnapshotHolder(make_snapshot({}, [])), Stats(), None, None)
    server_sock, client_sock = socket.socketpair()
    client_sock.setblocking(False)
    client = H2Connection(client=True, settings={}, max_header_list_size=65536)
    client.initiate_connection()
    first = client.data_to_send()  # the preface and SETTINGS: what the sniffer would have read
    conn = RecordingConn(server_sock, first)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_h2_connection, plane, LISTENER, conn, "127.0.0.1:1", b"127.0.0.1", None)
            for stream_id in (1, 3, 5):
                events = await _request(client, client_sock, stream_id)
                assert [e.status for e in events if type(e) is ResponseReceived] == [404]  # no route: NR
            client_sock.close()
    # every fill after one that read less than RECV_BYTES waited first; the first could not know
    assert conn.fills[0][0] is False
    assert len(conn.fills) >= 3
    for (_, before), (wait_first, _) in zip(conn.fills, conn.fills[1:]):
        assert wait_first == (0 < before < RECV_BYTES)
