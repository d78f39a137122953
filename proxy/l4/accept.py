"""The accept loop of the L4 listeners (capture listeners, Gateway TCP servers): accept in batches
on a non-blocking socket, hand each connection to a sync callback that starts its task."""

from __future__ import annotations

import socket
from typing import Callable

import structlog
import trio

from proxy.accept_backoff import AcceptBackoff, wait_after_accept_error
from proxy.stats import Stats
from trio.lowlevel import checkpoint, notify_closing, wait_readable

log = structlog.get_logger("triomesh.l4")

_ACCEPT_BATCH = 64


async def accept_connections(sock, listener_name: str, on_connection: Callable[[socket.socket], None], *,
                             stats: Stats | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept on `sock` (a listening trio or stdlib socket, owned from now on) until cancelled.
    `on_connection` gets each non-blocking connection and owns it; it must not block. Failed accepts
    are counted in `stats`."""
    lsock = sock if isinstance(sock, socket.socket) else socket.socket(fileno=sock.detach())
    lsock.setblocking(False)
    backoff = AcceptBackoff()
    task_status.started()
    try:
        while True:
            for _ in range(_ACCEPT_BATCH):
                try:
                    csock, _ = lsock.accept()
                except BlockingIOError:
                    await wait_readable(lsock)
                    break
                except OSError as e:  # EMFILE and friends: back off instead of spinning
                    await wait_after_accept_error(backoff, e, listener_name, stats, log)
                    break
                if backoff.delay_s:
                    backoff.succeeded()
                csock.setblocking(False)
                on_connection(csock)
            else:
                await checkpoint()  # a full batch: let the connections run before accepting more
    finally:
        notify_closing(lsock)
        lsock.close()
