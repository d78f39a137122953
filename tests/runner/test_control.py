"""The control channel: frames round-trip every message kind, split anywhere; bad frames are errors."""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.runner import control

MESSAGES = [
    control.LoadConfig("7", b"\x80\x05compiled snapshot\x00\xff"),
    control.GetStats(3),
    control.Shutdown(),
    control.ConfigApplied("7", ["127.0.0.1_8080"], ["x: cannot listen"]),
    control.ConfigApplied("8", []),
    control.ConfigFailed("9", "a.yaml: document 0 (Gateway ns/gw): $.spec: bad"),
    control.StatsReply(3, [("counter", "triomesh_downstream_rq_total", (("response_code", "200"),), 12),
                           ("gauge", "triomesh_downstream_cx_active", (), 2)]),
]


def test_round_trip_all_at_once() -> None:
    wire = b"".join(control.encode_frame(m) for m in MESSAGES)
    decoder = control.FrameDecoder()
    assert decoder.feed(wire) == MESSAGES
    assert decoder.pending_bytes == 0


def test_round_trip_byte_by_byte() -> None:
    wire = b"".join(control.encode_frame(m) for m in MESSAGES)
    decoder = control.FrameDecoder()
    out = []
    for i in range(len(wire)):
        out.extend(decoder.feed(wire[i : i + 1]))
    assert out == MESSAGES


def test_stats_rows_decode_as_hashable_tuples() -> None:
    (msg,) = control.FrameDecoder().feed(control.encode_frame(MESSAGES[-1]))
    assert {row[2] for row in msg.rows} == {(("response_code", "200"),), ()}


def test_oversized_frame_is_rejected() -> None:
    with pytest.raises(control.FrameError, match="exceeds"):
        control.FrameDecoder().feed((control.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))


def test_garbage_frame_is_rejected() -> None:
    with pytest.raises(control.FrameError, match="undecodable"):
        control.FrameDecoder().feed(b"\x00\x00\x00\x03abc")


async def test_channel_over_a_real_socketpair() -> None:
    a, b = socket.socketpair()
    left = control.ControlChannel(trio.socket.from_stdlib_socket(a))
    right = control.ControlChannel(trio.socket.from_stdlib_socket(b))
    big = control.LoadConfig("1", b"x" * (3 << 20))
    async with trio.open_nursery() as nursery:
        # two tasks sending at once: frames must not interleave
        nursery.start_soon(left.send, big)
        nursery.start_soon(left.send, control.GetStats(1))
        got = [await right.receive(), await right.receive()]
    assert sorted(got, key=lambda m: type(m).__name__) == [control.GetStats(1), big]
    await left.aclose()
    assert await right.receive() is None
    await right.aclose()


async def test_listening_sockets_pass_as_fds_and_keep_their_accept_queue() -> None:
    a, b = socket.socketpair()
    left = control.ControlChannel(trio.socket.from_stdlib_socket(a))
    right = control.ControlChannel(trio.socket.from_stdlib_socket(b))
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    port = listening.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # waits in the accept queue
    info = control.ListenerSocket("l", "HTTP", "127.0.0.1", port)
    await left.send(control.ListenerSockets(7, [info]), fds=[listening.fileno()])
    await left.send(control.GetStats(8))  # a frame after it: no fd of its own
    message = await right.receive()
    assert message == control.ListenerSockets(7, [info])
    fds = right.take_fds(len(message.sockets))
    assert len(fds) == 1 and await right.receive() == control.GetStats(8) and right.take_fds(1) == []
    listening.close()  # the sender's copy: the kernel socket and its queue live on in the receiver's
    received = socket.socket(fileno=fds[0])
    conn, _ = received.accept()
    queued.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    for s in (conn, received, queued):
        s.close()
    await left.aclose()
    await right.aclose()
