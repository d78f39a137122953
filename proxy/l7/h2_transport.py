"""One HTTP/2 connection's writing side, shared by the downstream server and the upstream client:
frames queued in the H2Connection state machine go out in order, and DATA waits for the peer's
windows.

Theory of operation
-------------------
Many stream tasks write on one connection. Each queues frames in the one H2Connection and calls
`flush`, which sends at once what the kernel takes; the rest waits in an outbox that one writer
task drains, so bytes of different calls never interleave inside a send. While the writer is
sending (`writing`), flush only appends: the writer has taken its parts out of the outbox, and a
direct send then would overtake them on the wire.

Writes of a connection with several streams open are coalesced: `flush` then only wakes the writer,
which runs after every task of the current scheduling batch had its turn, so the responses (or
upstream requests) of all streams that wrote in that batch leave in one send instead of one send
each (a multiplexed connection is where HTTP/2 saves syscalls; without this it cost more kernel
time per request than HTTP/1.1). A connection with one stream open sends at once, so a request at
a time (the low-rate regime of most sidecars) gets no extra wakeup and no added latency.
`flush_now` is for frames that must leave before the caller goes on (GOAWAY before a close,
answers to control frames, which the flood accounting judges by `flushed_clean`).
Subclasses keep their open streams in `self.streams`. A stream task waits when
the outbox holds more than OUTBOX_HIGH_BYTES (a peer that does not read) and when the peer's
flow-control window is empty (`send_data`). Received DATA is acknowledged (our window reopened)
only when the consumer took it (`acknowledge`), so a slow reader on the other side makes the
sender wait instead of making us buffer.

`gone_error` is the ProxyError raised when a stream or the connection is gone: the downstream side
raises DownstreamDisconnect, the upstream side UpstreamReset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

from proxy.l7.h2_codec import MAX_FRAME_SIZE
from proxy.l7.h2_connection import H2Connection, StreamClosedError
from proxy.l7.resumed import RESUMED

if TYPE_CHECKING:
    from proxy.l7.connio import Conn
    from proxy.l7.events import Headers

OUTBOX_HIGH_BYTES = 1024 * 1024


class H2StreamState:
    """What the transport keeps of one stream: its id, whether END_STREAM (or a reset) went out,
    and the event a writer waits on for window. The downstream stream (h2_server.H2Stream) is one;
    the upstream stream (h2_upstream.UpstreamH2Stream) is the connection layer's StreamState instead
    (one object per stream) and has these three fields as its own slots: a class cannot take slots
    from two bases, and the connection layer's nine would be dead weight in every downstream stream."""

    __slots__ = ("stream_id", "ended", "window")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.ended = False
        self.window: trio.Event | None = None


class H2Transport:
    __slots__ = ("conn", "h2", "outbox", "outbox_bytes", "writer_task", "writer_woken", "drained", "error",
                 "gone_error", "flushed_clean", "writing", "flush_pending")

    def __init__(self, conn: Conn, h2conn: H2Connection, gone_error: type[Exception]) -> None:
        self.conn = conn
        self.h2 = h2conn
        self.outbox: list = []  # bytes the kernel has not taken yet, in order
        self.outbox_bytes = 0
        # the writer parks itself (no Event per wake): its task while parked, and whether it was woken
        # while it was not parked (it then goes round once more before parking)
        self.writer_task = None
        self.writer_woken = False
        self.drained: trio.Event | None = None
        self.error: str | None = None  # why the connection is gone, once it is
        self.gone_error = gone_error
        self.flushed_clean = True  # the last flush left nothing waiting
        self.writing = False  # the writer task is sending parts it took from the outbox
        self.flush_pending = False  # frames wait in the H2Connection for the writer's coalesced send

    # ---- the byte stream

    def flush(self) -> None:
        """Send what is queued: at once when one stream is open, else coalesced by the writer."""
        if not self.h2._out:  # nothing queued (an acknowledgement below the WINDOW_UPDATE threshold): no wakeup
            return
        if len(self.streams) > 1 and self.error is None:
            if not self.flush_pending:
                self.flush_pending = True
                self.flushed_clean = False
                self._wake_writer()
            return
        self.flush_now()

    def flush_now(self) -> None:
        data = self.h2.data_to_send()
        if not data:
            return
        if self.outbox or self.writing:
            self.outbox.append(data)
            self.outbox_bytes += len(data)
            self.flushed_clean = False
            self._wake_writer()
            return
        try:
            rest = self.conn.send_nowait(data)
        except OSError as e:
            self.lost(f"send failed: {e}")
            return
        if rest is not None:
            self.outbox.append(rest)
            self.outbox_bytes += len(rest)
            self.flushed_clean = False
            self._wake_writer()
        else:
            self.flushed_clean = True

    def _wake_writer(self) -> None:
        task = self.writer_task
        if task is not None:
            self.writer_task = None
            reschedule(task, RESUMED)
        else:
            self.writer_woken = True

    async def writer(self) -> None:
        """Drains the outbox; runs for the connection's life."""
        conn = self.conn
        task = current_task()

        def abort(_) -> Abort:  # cancelled while parked
            self.writer_task = None
            return Abort.SUCCEEDED

        while True:
            if not self.writer_woken:
                self.writer_task = task
                await wait_task_rescheduled(abort)
            self.writer_woken = False
            if self.flush_pending:
                self.flush_pending = False
                data = self.h2.data_to_send()
                if data:
                    self.outbox.append(data)
                    self.outbox_bytes += len(data)
            self.writing = True
            while self.outbox:
                parts, self.outbox = self.outbox, []
                size = sum(len(p) for p in parts)
                try:
                    await conn.send_many(parts)
                except OSError as e:
                    self.lost(f"send failed: {e}")
                    return
                self.outbox_bytes -= size
            self.writing = False
            self.flushed_clean = True
            if self.drained is not None:
                self.drained.set()
                self.drained = None

    async def wait_outbox(self) -> None:
        """Wait while a peer that does not read has more than OUTBOX_HIGH_BYTES waiting."""
        while self.outbox_bytes > OUTBOX_HIGH_BYTES:
            if self.error is not None:
                raise self.gone_error(self.error)
            if self.drained is None:
                self.drained = trio.Event()
            await self.drained.wait()

    async def wait_flushed(self) -> None:
        """Wait until the kernel took everything queued (or the connection failed)."""
        while (self.outbox or self.writing or self.flush_pending) and self.error is None:
            if self.drained is None:
                self.drained = trio.Event()
            await self.drained.wait()

    def lost(self, why: str) -> None:
        """The connection failed: every waiter is woken to find out."""
        if self.error is None:
            self.error = why
        if self.drained is not None:
            self.drained.set()
            self.drained = None
        self.on_lost(why)

    def on_lost(self, why: str) -> None:  # subclasses fail their streams
        pass

    # ---- frames of one stream

    def _gone(self, e: Exception):
        return self.gone_error(f"stream closed: {e}")

    def send_headers(self, stream: H2StreamState, fields: Headers, end_stream: bool,
                     sensitive: frozenset | None = None) -> None:
        try:
            self.h2.send_headers(stream.stream_id, fields, end_stream, sensitive, stream)
        except StreamClosedError as e:  # the peer reset the stream, or the connection ended
            raise self._gone(e) from e
        if end_stream:
            stream.ended = True

    def end_stream(self, stream: H2StreamState) -> None:
        try:
            self.h2.end_stream(stream.stream_id)
        except StreamClosedError as e:
            raise self._gone(e) from e
        stream.ended = True

    def window(self, stream: H2StreamState) -> int:
        if self.error is not None:
            raise self.gone_error(self.error)
        try:
            return self.h2.local_flow_control_window(stream.stream_id)
        except StreamClosedError as e:
            raise self._gone(e) from e

    def send_data_nowait(self, stream: H2StreamState, data, end_stream: bool) -> int:
        """Queue what the peer's windows allow now; returns how many bytes that was."""
        window = self.window(stream)
        total = len(data)
        sent = 0
        while sent < total and window > 0:
            n = min(total - sent, window, MAX_FRAME_SIZE)
            last = end_stream and sent + n == total
            try:
                self.h2.send_data(stream.stream_id, data[sent:sent + n], end_stream=last)
            except StreamClosedError as e:
                raise self._gone(e) from e
            if last:
                stream.ended = True
            sent += n
            window -= n
        return sent

    async def send_data(self, stream: H2StreamState, data, end_stream: bool) -> None:
        """All of `data`, waiting for window as needed (flushes as it goes)."""
        if not isinstance(data, memoryview):
            data = memoryview(data)
        while True:
            sent = self.send_data_nowait(stream, data, end_stream)
            if sent == len(data):
                return
            data = data[sent:]
            self.flush()
            while self.window(stream) <= 0:
                stream.window = event = trio.Event()
                await event.wait()

    @staticmethod
    def wake_window(stream: H2StreamState) -> None:
        if stream.window is not None:
            stream.window.set()
            stream.window = None

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The consumer took `n` flow-controlled bytes of `stream_id`: the peer may send more."""
        self.h2.acknowledge_received_data(n, stream_id)
        self.flush()

    def reset_stream(self, stream: H2StreamState, code) -> None:
        if stream.ended:
            return
        stream.ended = True
        self.h2.reset_stream(stream.stream_id, code)
        self.flush()
