"""The framed stream driver on real socket pairs and an in-process control plane: send timeouts (armed
only when a send waits), and one encoding of a push shared by every proxy of a class."""

from __future__ import annotations

import socket

import trio

from controlplane.framed import FramedStream, SendTimeout, StreamClosed
from controlplane.store import ConfigStore
from controlplane.wire import Ack, ApplyRequest, Heartbeat, Source, encode_frame

from cp_fixtures import split, write_mesh
from cp_harness import next_snapshot, raw_connect, raw_proxy, start_plane, wait_for


def _fill(sock: socket.socket) -> None:
    """Write until the kernel takes not one more byte (the peer does not read)."""
    sock.setblocking(False)
    for size in (65536, 4096, 1):
        try:
            while True:
                sock.send(b"x" * size)
        except BlockingIOError:
            pass


async def test_a_send_that_cannot_start_times_out_and_keeps_the_stream():
    ours, theirs = socket.socketpair()
    framed = FramedStream(ours)
    _fill(framed.sock)
    try:
        await framed.send(Heartbeat(seq=1), timeout_s=0.2)
        raise AssertionError("a send into a full buffer returned")
    except SendTimeout as e:
        assert "nothing of it was sent" in str(e)
    assert not framed.closed  # nothing went out: the next frame may still follow the bytes already sent
    theirs.setblocking(False)
    while True:  # the peer reads again: the same stream carries the next frame
        try:
            if not theirs.recv(1 << 20):
                break
        except BlockingIOError:
            break
    await framed.send(Heartbeat(seq=2), timeout_s=1.0)
    await framed.aclose()
    theirs.close()


async def test_a_frame_cut_short_by_its_timeout_closes_the_stream():
    ours, theirs = socket.socketpair()
    framed = FramedStream(ours)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = encode_frame(Heartbeat(seq=1)) + b"\0" * (4 << 20)  # bigger than any socket buffer: it must wait
    with trio.fail_after(5):
        try:
            await framed.send_frame(big, timeout_s=0.2)
            raise AssertionError("a 4 MiB send to a peer that does not read returned")
        except SendTimeout as e:
            assert "the frame was cut" in str(e)
    assert framed.closed
    try:
        await framed.send(Heartbeat(seq=2))
        raise AssertionError("a send on a closed stream succeeded")
    except StreamClosed:
        pass
    theirs.close()


async def test_a_push_is_encoded_once_for_every_proxy_of_a_class(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    proxies = [await raw_proxy(port, f"p{i}", namespace="tutorial", labels={"app": "customer", "pod": f"p{i}"})
               for i in range(3)]
    for framed, first in proxies:
        await framed.send(Ack(version=first.version, nonce=first.nonce))
    await wait_for(lambda: all(plane.proxies[f"p{i}"].acked_version for i in range(3)), what="first ACKs")
    result = await _request(port, ApplyRequest(sources=[Source("w.yaml", split(60, 40).encode())]))
    assert result.ok, result.error
    pushes = [await next_snapshot(framed) for framed, _ in proxies]
    assert all(not p.full for p in pushes)
    assert len({p.nonce for p in pushes}) == 1 and all(p == pushes[0] for p in pushes)  # one frame, sent three times
    bytes_before = plane.push_bytes_total
    for (framed, _), push in zip(proxies, pushes):
        await framed.send(Ack(version=push.version, nonce=push.nonce))
    await wait_for(lambda: all(plane.proxies[f"p{i}"].acked_version == pushes[0].version for i in range(3)),
                   what="every proxy ACKed the shared push")
    # a proxy that connects now gets a full snapshot with a nonce of its own stream, and ACKs it
    late, snap = await raw_proxy(port, "late", namespace="tutorial", labels={"app": "customer"})
    assert snap.version == pushes[0].version and int(snap.nonce) > int(pushes[0].nonce)
    await late.send(Ack(version=snap.version, nonce=snap.nonce))
    await wait_for(lambda: plane.proxies["late"].acked_version == snap.version, what="late proxy ACKed")
    assert plane.push_bytes_total > bytes_before
    for framed, _ in [*proxies, (late, None)]:
        await framed.aclose()


async def _request(port: int, message):
    framed = await raw_connect(port)
    try:
        await framed.send(message)
        return await framed.receive()
    finally:
        await framed.aclose()
