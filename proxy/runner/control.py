"""The supervisor <-> worker control channel: typed messages, length-prefixed msgspec frames.

Theory of operation: each worker gets one end of a Unix socketpair. Frames are a 4-byte big-endian
length followed by a msgpack-encoded message from a tagged union, so one decoder handles every
message kind and new fields can be added with defaults. `FrameDecoder` is sans-IO (bytes in,
messages out); `ControlChannel` is the small Trio driver around a Unix stream socket.

File descriptors (listening sockets, for a hot restart) travel as SCM_RIGHTS ancillary data on the
first byte of the frame that describes them. The receiver reads with recvmsg and queues every fd it
gets in arrival order; a message that carries fds says how many (its `sockets` list), and its
receiver takes exactly that many from the queue (`take_fds`) once the message is decoded, by which
time they have arrived: the kernel delivers ancillary data with the byte it was sent with.
"""

from __future__ import annotations

import array
import collections
import os
import socket
import struct
from typing import Union

import msgspec
import trio

from proxy.identity.workload import WorkloadIdentity

MAX_FRAME_BYTES = 64 << 20  # a config of many MiB still fits; anything bigger is a bug
_LEN = struct.Struct(">I")


# supervisor -> worker

class LoadConfig(msgspec.Struct, tag="load_config"):
    """Serve this config. `snapshot` is the Snapshot the supervisor compiled (and validated) once,
    encoded by proxy/config/snapshot_transfer.py: a worker loads it instead of compiling it again, and
    every worker serves exactly what the supervisor checked even if the files change meanwhile."""

    version: str
    snapshot: bytes


class PrepareConfig(LoadConfig, tag="prepare_config"):
    """First step of an update applied by every worker or none: load it and bind (not yet listen
    on) the sockets of its new listeners, keep serving the old config, answer ConfigPrepared or
    ConfigFailed (a bind error names the listener and address). CommitConfig or AbortConfig follows."""


class CommitConfig(msgspec.Struct, tag="commit_config"):
    """Serve the prepared `version`: swap the snapshot, listen on the prepared sockets, close the
    removed listeners; answered by ConfigApplied."""

    version: str


class AbortConfig(msgspec.Struct, tag="abort_config"):
    """Forget the prepared `version` (another worker could not prepare it): close its sockets."""

    version: str


class LoadIdentity(msgspec.Struct, tag="load_identity"):
    """The proxy's current workload identity (certificate, key, trust bundle) for mutual TLS, sent
    on every issue and renewal; answered by IdentityLoaded. The key travels only over this private
    socketpair, never to disk."""

    identity: WorkloadIdentity


class GetStats(msgspec.Struct, tag="get_stats"):
    request_id: int


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class Drain(msgspec.Struct, tag="drain"):
    """Stop accepting, let what is in flight finish for up to `duration_s`, reset the rest, answer
    Drained and exit. Meanwhile the worker still answers GetStats and Shutdown (which cuts it short)."""

    duration_s: float
    # > 0 (a hot restart): idle keep-alive connections are not closed at once but get
    # `connection: close` on their next response, and those still idle are closed after this long
    idle_close_after_s: float = 0.0


class ExportListeners(msgspec.Struct, tag="export_listeners"):
    """Send a duplicate of every listening socket (a hot restart hands them to the next proxy); the
    worker goes on accepting on them until told to Drain. Answered by ListenerSockets."""

    request_id: int


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


class IdentityLoaded(msgspec.Struct, tag="identity_loaded"):
    """The worker serves with the identity of this certificate serial now."""

    serial: str


class Drained(msgspec.Struct, tag="drained"):
    """The worker's drain ended: `active_at_deadline` connections were still open and were reset
    (0: everything finished in time)."""

    active_at_deadline: int


class ListenerSocket(msgspec.Struct):
    """What a handed-over listening socket is for: the listener's name, protocol and address."""

    name: str
    protocol: str
    address: str
    port: int


class ListenerSockets(msgspec.Struct, tag="listener_sockets"):
    """The answer to ExportListeners: one fd per entry of `sockets`, in order, travel with it."""

    request_id: int
    sockets: list[ListenerSocket]


StatsRow = tuple[str, str, tuple[tuple[str, str], ...], int | float]  # histogram _sum rows are floats


class StatsReply(msgspec.Struct, tag="stats_reply"):
    request_id: int
    rows: list[StatsRow]


Message = Union[LoadConfig, PrepareConfig, CommitConfig, AbortConfig, LoadIdentity, GetStats, Shutdown, Drain,
                ConfigApplied, ConfigPrepared, ConfigFailed, IdentityLoaded, StatsReply, Drained, ExportListeners,
                ListenerSockets]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class FrameError(Exception):
    pass


def encode_frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Sans-IO: feed received bytes, take complete messages."""

    def __init__(self, decoder: msgspec.msgpack.Decoder = _decoder) -> None:
        self._buf = bytearray()
        self._message_decoder = decoder

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
                out.append(self._message_decoder.decode(memoryview(buf)[pos + 4 : pos + 4 + length]))
            except msgspec.DecodeError as e:
                raise FrameError(f"undecodable control frame: {e}") from None
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


MAX_FDS_PER_FRAME = 250  # the kernel's SCM_MAX_FD is 253 per sendmsg
_FD_SIZE = array.array("i").itemsize


class FrameChannel:
    """Frames of one message union over a connected Unix stream socket, with fds passed beside them.
    Sends are serialized (several tasks may send); one task receives. Received fds are close-on-exec
    and owned by whoever takes them; those never taken are closed with the channel."""

    def __init__(self, sock: trio.socket.SocketType, decoder: msgspec.msgpack.Decoder = _decoder) -> None:
        self._sock = sock
        self._send_lock = trio.Lock()
        self._decoder = FrameDecoder(decoder)
        self._ready: collections.deque = collections.deque()
        self._fds: collections.deque[int] = collections.deque()
        self._closed = False

    async def send(self, message: msgspec.Struct, fds: list[int] = ()) -> None:
        frame = encode_frame(message)
        if len(fds) > MAX_FDS_PER_FRAME:
            raise ValueError(f"{len(fds)} fds in one control frame; at most {MAX_FDS_PER_FRAME}")
        async with self._send_lock:
            try:
                view = memoryview(frame)
                if fds:
                    sent = await self._sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    view = view[sent:]
                while view:
                    sent = await self._sock.send(view)
                    view = view[sent:]
            except (BrokenPipeError, ConnectionResetError) as e:  # the peer is gone
                raise trio.BrokenResourceError(str(e)) from e

    async def receive(self) -> msgspec.Struct | None:
        """The next message, or None when the peer closed the channel."""
        while not self._ready:
            try:
                data, ancillary, _, _ = await self._sock.recvmsg(
                    65536, socket.CMSG_SPACE(MAX_FDS_PER_FRAME * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
            except (OSError, trio.ClosedResourceError):
                return None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                    self._fds.extend(fds)
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def take_fds(self, count: int) -> list[int]:
        """The next `count` fds received (fewer if fewer arrived: the sender's kernel refused some)."""
        return [self._fds.popleft() for _ in range(min(count, len(self._fds)))]

    async def aclose(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self._sock.close()
        await trio.lowlevel.checkpoint()


class ControlChannel(FrameChannel):
    """One end of a supervisor <-> worker socketpair."""
