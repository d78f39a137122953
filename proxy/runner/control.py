"""The supervisor <-> worker control channel: typed messages, length-prefixed msgspec frames.

Theory of operation: each worker gets one end of a Unix socketpair. Frames are a 4-byte big-endian
length followed by a msgpack-encoded message from a tagged union, so one decoder handles every
message kind and new fields can be added with defaults. `FrameDecoder` is sans-IO (bytes in,
messages out); `ControlChannel` is the small Trio driver around a stream.
"""

from __future__ import annotations

import struct
from typing import Union

import msgspec
import trio

MAX_FRAME_BYTES = 64 << 20  # a config of many MiB still fits; anything bigger is a bug
_LEN = struct.Struct(">I")


# supervisor -> worker

class LoadConfig(msgspec.Struct, tag="load_config"):
    """Serve this config. `sources` are (file name, bytes) as the supervisor read and validated them,
    so every worker compiles exactly the same input even if the files change meanwhile."""

    version: str
    sources: list[tuple[str, bytes]]
    bind_address: str = "0.0.0.0"
    proxy_labels: dict[str, str] | None = None  # the workload's labels (a control plane's proxy); None: all Gateways
    proxy_namespace: str | None = None  # the workload's namespace, with its labels; None for a standalone edge


class PrepareConfig(LoadConfig, tag="prepare_config"):
    """First step of an update applied by every worker or none: compile it and bind (not yet listen
    on) the sockets of its new listeners, keep serving the old config, answer ConfigPrepared or
    ConfigFailed (a bind error names the listener and address). CommitConfig or AbortConfig follows."""


class CommitConfig(msgspec.Struct, tag="commit_config"):
    """Serve the prepared `version`: swap the snapshot, listen on the prepared sockets, close the
    removed listeners; answered by ConfigApplied."""

    version: str


class AbortConfig(msgspec.Struct, tag="abort_config"):
    """Forget the prepared `version` (another worker could not prepare it): close its sockets."""

    version: str


class GetStats(msgspec.Struct, tag="get_stats"):
    request_id: int


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class Drain(msgspec.Struct, tag="drain"):
    """Stop accepting, let what is in flight finish for up to `duration_s`, reset the rest, answer
    Drained and exit. Meanwhile the worker still answers GetStats and Shutdown (which cuts it short)."""

    duration_s: float


# worker -> supervisor

class ConfigApplied(msgspec.Struct, tag="config_applied"):
    """The worker serves `version` now. `errors` names listeners it could not open (bind failures)."""

    version: str
    listeners: list[str]
    errors: list[str] = []


class ConfigPrepared(msgspec.Struct, tag="config_prepared"):
    version: str


class ConfigFailed(msgspec.Struct, tag="config_failed"):
    """The worker cannot serve `version`; `reason` is "invalid" (it does not compile) or
    "listener_bind" (a PrepareConfig's listener cannot be bound)."""

    version: str
    error: str
    reason: str = "invalid"


class Drained(msgspec.Struct, tag="drained"):
    """The worker's drain ended: `active_at_deadline` connections were still open and were reset
    (0: everything finished in time)."""

    active_at_deadline: int


StatsRow = tuple[str, str, tuple[tuple[str, str], ...], int | float]  # histogram _sum rows are floats


class StatsReply(msgspec.Struct, tag="stats_reply"):
    request_id: int
    rows: list[StatsRow]


Message = Union[LoadConfig, PrepareConfig, CommitConfig, AbortConfig, GetStats, Shutdown, Drain, ConfigApplied,
                ConfigPrepared, ConfigFailed, StatsReply, Drained]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class FrameError(Exception):
    pass


def encode_frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Sans-IO: feed received bytes, take complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if length > MAX_FRAME_BYTES:
                raise FrameError(f"control frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            if len(buf) - pos - 4 < length:
                break
            try:
                out.append(_decoder.decode(memoryview(buf)[pos + 4 : pos + 4 + length]))
            except msgspec.DecodeError as e:
                raise FrameError(f"undecodable control frame: {e}") from None
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


class ControlChannel:
    """One end of the control socketpair. Sends are serialized (several tasks may send); one task
    receives."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._decoder = FrameDecoder()
        self._ready: list[Message] = []

    async def send(self, message: Message) -> None:
        frame = encode_frame(message)
        async with self._send_lock:
            await self._stream.send_all(frame)

    async def receive(self) -> Message | None:
        """The next message, or None when the peer closed the channel."""
        while not self._ready:
            try:
                data = await self._stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    async def aclose(self) -> None:
        await self._stream.aclose()
