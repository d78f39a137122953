"""One task receives for many protocol streams: the control plane's ACK reader.

Theory of operation. A push goes to thousands of proxies at once and each answers with one small ACK.
With a task per stream, every ACK is a Trio wake-up of that task (the scheduler trip plus an epoll
re-registration, about as much CPU as the rest of the ACK's handling). Here the streams' sockets sit
in an epoll set of their own, level-triggered and registered once per stream; one task waits until
that epoll's file descriptor is readable (Trio watches it like any socket), then reads every ready
stream in one pass, decoding all its complete frames (`FramedStream.receive_nowait`), and hands each
message to the stream's handler, a plain function. A handler that has to await (answer a certificate
request, say) returns the work instead; it runs in the stream's own task, which otherwise sleeps until
its stream ends, one piece of work after another in the order the messages came (a handler itself runs
when its message is read, so an ACK read behind a certificate request is handled before that request's
work has run). So per ACK there is a recv and a decode, and no task switch.

A stream ends when its peer closes it, on a bad frame, when its handler raises ProtocolError, or when
anyone closes it (`FramedStream.on_close`, told before the socket closes, takes it out of the set);
its task then returns, raising the ProtocolError, if any, for the caller to report. Any other
exception a handler raises ends its stream the same way and is raised in that stream's task: the
reading task serves every stream and must not die of one.

TLS streams are read the same way: `receive_nowait` reads until OpenSSL wants more bytes, so nothing
decrypted waits unseen in OpenSSL's buffer. The rare read that must write first is retried after a
short sleep, since the socket may not become readable again.
"""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from trio.lowlevel import checkpoint, wait_readable

from controlplane.framed import CROSSED_WANT_SLEEP_S, FramedStream, StreamClosed
from controlplane.wire import Message

Work = Callable[[], Awaitable[None]]
Handler = Callable[[Message], "Work | None"]
READY_PER_POLL = 1024  # streams served per epoll_wait
CHECKPOINT_EVERY = 256  # streams read before letting the other tasks in


@dataclass(eq=False)
class _Entry:
    framed: FramedStream
    fd: int
    handler: Handler
    wake: trio.Event = field(default_factory=trio.Event)
    work: list[Work] = field(default_factory=list)
    ended: bool = False
    error: Exception | None = None  # a ProtocolError, or a fault to re-raise in the stream's own task


class Receiver:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._entries: dict[int, _Entry] = {}  # by file descriptor
        self._retry: set[_Entry] = set()  # TLS reads that wanted a write first
        self.now = 0.0  # Trio's clock when the messages being handled were read

    def __len__(self) -> int:
        return len(self._entries)

    async def receive(self, framed: FramedStream, handler: Handler) -> None:
        """Hand `framed`'s messages to `handler` until the stream ends; run the work it returns here.
        Returns when the stream ends, raises the ProtocolError that ended it (or the unexpected
        exception a handler raised: it belongs to this stream, not to the task reading them all)."""
        if framed.closed:
            return
        fd = framed.sock.fileno()
        entry = _Entry(framed, fd, handler)
        self._entries[fd] = entry
        framed.on_close = lambda: self._end(entry)
        try:
            self._epoll.register(fd, select.EPOLLIN)
            self.now = trio.current_time()
            self._read(entry)  # messages decoded before the stream came here
            while True:
                while entry.work:
                    await entry.work.pop(0)()
                if entry.ended:
                    break
                await entry.wake.wait()
                entry.wake = trio.Event()
        finally:
            framed.on_close = None
            self._end(entry)
        if entry.error is not None:
            raise entry.error

    async def run(self) -> None:
        """The reading task (one per control plane)."""
        epoll = self._epoll
        while True:
            if self._retry:
                with trio.move_on_after(CROSSED_WANT_SLEEP_S):
                    await wait_readable(epoll.fileno())
                retry, self._retry = self._retry, set()
                self.now = trio.current_time()
                for entry in retry:
                    if not entry.ended:
                        self._read(entry)
            else:
                await wait_readable(epoll.fileno())
            ready = epoll.poll(0, READY_PER_POLL)
            entries = self._entries
            self.now = trio.current_time()
            for i, (fd, _) in enumerate(ready):
                entry = entries.get(fd)
                if entry is not None:
                    self._read(entry)
                if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                    await checkpoint()
                    self.now = trio.current_time()

    def _read(self, entry: _Entry) -> None:
        framed = entry.framed
        try:
            messages = framed.receive_nowait()
        except StreamClosed:
            self._end(entry)
            return
        except Exception as e:  # ProtocolError, or a fault: either ends this stream only
            self._end(entry, e)
            return
        if framed.read_wants_write:
            self._retry.add(entry)
        handler = entry.handler
        for message in messages:
            try:
                work = handler(message)
            except Exception as e:  # ProtocolError, or a fault: either ends this stream only
                self._end(entry, e)
                return
            if work is not None:
                entry.work.append(work)
                entry.wake.set()

    def _end(self, entry: _Entry, error: Exception | None = None) -> None:
        if entry.ended:
            return
        entry.ended = True
        entry.error = error
        if self._entries.get(entry.fd) is entry:
            del self._entries[entry.fd]
            try:
                self._epoll.unregister(entry.fd)
            except (OSError, ValueError):
                pass  # the socket is closed already (the kernel dropped it from the set)
        self._retry.discard(entry)
        entry.wake.set()
