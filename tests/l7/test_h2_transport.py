"""H2Transport's writer task on a real socket pair: a coalesced flush wakes it where it parked, and a
wake-up that comes while it is not parked (sending, or not started yet) is not lost."""

from __future__ import annotations

import socket

import trio
from trio.testing import wait_all_tasks_blocked

from proxy.l7.connio import Conn
from proxy.l7.errors import DownstreamDisconnect
from proxy.l7.h2_connection import H2Connection
from proxy.l7.h2_transport import H2Transport


class _Transport(H2Transport):
    __slots__ = ("streams",)


def _transport() -> tuple[_Transport, socket.socket]:
    ours, peer = socket.socketpair()
    transport = _Transport(Conn(ours), H2Connection(client=True, settings={}, max_header_list_size=65536),
                           DownstreamDisconnect)
    transport.streams = {1: None, 3: None}  # more than one stream open: flush leaves the send to the writer
    return transport, peer


def _received(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def test_a_coalesced_flush_wakes_the_parked_writer():
    transport, peer = _transport()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.writer)
        await wait_all_tasks_blocked()
        assert transport.writer_task is not None  # parked, no Event
        transport.h2.initiate_connection()
        transport.flush()
        assert transport.flush_pending and _received(peer) == b""  # nothing sent before the writer's turn
        await wait_all_tasks_blocked()
        assert _received(peer).startswith(b"PRI * HTTP/2.0")
        assert transport.writer_task is not None and transport.flushed_clean
        transport.h2.increment_flow_control_window(1000)  # a WINDOW_UPDATE queued
        transport.flush()
        await wait_all_tasks_blocked()
        assert _received(peer) != b""  # woken a second time
        nursery.cancel_scope.cancel()
    assert transport.writer_task is None  # the abort forgot the parked task


async def test_a_wake_before_the_writer_parks_is_kept():
    transport, peer = _transport()
    transport.h2.initiate_connection()
    transport.flush()  # the writer has not started yet
    assert transport.writer_woken
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.writer)
        await wait_all_tasks_blocked()
        assert _received(peer).startswith(b"PRI * HTTP/2.0")
        assert not transport.writer_woken and transport.writer_task is not None
        nursery.cancel_scope.cancel()
