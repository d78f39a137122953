"""Trio driver for the wire protocol: send and receive whole messages on a byte stream."""

from __future__ import annotations

import trio

from controlplane.wire import MAX_FRAME_BYTES, Error, FrameDecoder, Message, ProtocolError, encode_frame

RECEIVE_BYTES = 65536
ERROR_SEND_TIMEOUT_S = 1.0


class StreamClosed(Exception):
    """The peer closed the stream or it broke."""


class FramedStream:
    """One end of a protocol stream. Several tasks may send (sends are serialized); one task receives."""

    def __init__(self, stream: trio.abc.Stream, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.stream = stream
        self._send_lock = trio.Lock()
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: list[Message] = []
        self._ready_pos = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_send_time = trio.current_time()

    @property
    def sending(self) -> bool:
        return self._send_lock.locked()

    async def send(self, message: Message) -> None:
        await self.send_frame(encode_frame(message))

    async def send_frame(self, frame: bytes) -> None:
        """Send an already encoded frame (a push encoded once for many streams)."""
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise StreamClosed(str(e) or type(e).__name__) from None
        self.bytes_sent += len(frame)
        self.last_send_time = trio.current_time()

    async def receive(self) -> Message:
        """The next message. Raises StreamClosed at end of stream, ProtocolError on a bad frame (after
        telling the peer with an Error message and closing the stream)."""
        while self._ready_pos >= len(self._ready):
            self._ready.clear()
            self._ready_pos = 0
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise StreamClosed(str(e) or type(e).__name__) from None
            if not data:
                raise StreamClosed("end of stream")
            self.bytes_received += len(data)
            try:
                self._ready.extend(self._decoder.feed(data))
            except ProtocolError as e:
                await self.fail(e)
                raise
        message = self._ready[self._ready_pos]
        self._ready_pos += 1
        return message

    async def fail(self, error: ProtocolError) -> None:
        """Best effort: tell the peer why, then close."""
        with trio.move_on_after(ERROR_SEND_TIMEOUT_S):
            try:
                await self.send(Error(code=error.code, message=error.message))
            except (StreamClosed, ProtocolError):
                pass
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def connect(host: str, port: int, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> FramedStream:
    stream = await trio.open_tcp_stream(host, port)
    return FramedStream(stream, max_frame_bytes=max_frame_bytes)
