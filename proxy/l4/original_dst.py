"""The transparent listener: accept connections netfilter REDIRECTed to us and learn where they were going.

When iptables' nat table REDIRECTs a connection (see proxy/l4/capture/), the kernel rewrites its
destination to our listener but remembers the original one in conntrack; `getsockopt(SOL_IP,
SO_ORIGINAL_DST)` on the accepted socket returns it as a `struct sockaddr_in` (IPv6:
`SOL_IPV6, IP6T_SO_ORIGINAL_DST`, a `struct sockaddr_in6`). That address is what an outbound
sidecar routes on (Envoy's original_dst listener filter, Istio's port 15001/15006 listeners).
"""

from __future__ import annotations

import errno
import math
import socket
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog
import trio

from proxy.l4.addrs import ClientAddr, LocalAddr, OrigDstAddr
from proxy.l4.errors import OriginalDstUnavailable

log = structlog.get_logger("triomesh.l4")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr, zero
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, addr, scope_id


def original_dst(sock: socket.socket) -> OrigDstAddr:
    """The destination the client dialled before netfilter redirected it to us.

    Raises OriginalDstUnavailable when the connection was not redirected (it came straight to our
    listener, or conntrack has no nat entry for it).
    """
    try:
        if sock.family == socket.AF_INET6:
            local = sock.getsockname()[0]
            if local.startswith("::ffff:"):
                # an IPv4 connection on a dual-stack socket: conntrack has it as IPv4
                return _original_dst_v4(sock)
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, _flow, addr, _scope = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
            return OrigDstAddr.from_sockaddr((socket.inet_ntop(socket.AF_INET6, addr), port))
        return _original_dst_v4(sock)
    except OSError as exc:
        # ENOENT: conntrack has no nat entry; ENOPROTOOPT: nf_conntrack/ip6tables not loaded
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL, errno.ENOTCONN):
            raise OriginalDstUnavailable(f"no original destination: {exc.strerror}") from exc
        raise


def _original_dst_v4(sock: socket.socket) -> OrigDstAddr:
    raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = _SOCKADDR_IN.unpack(raw[:16])
    return OrigDstAddr(socket.inet_ntoa(addr), port)


@dataclass(slots=True)
class TransparentConnection:
    """One accepted connection with its addresses. The handler owns `sock` (closed after it returns).

    `redirected` is False when the client connected to our listener directly; then `orig_dst` is
    just our own local address, and an outbound proxy must not dial it (that would loop).
    """

    sock: socket.socket
    client: ClientAddr
    local: LocalAddr
    orig_dst: OrigDstAddr
    redirected: bool


Handler = Callable[[TransparentConnection], Awaitable[None]]


def open_listener(host: str, port: int, *, backlog: int = 1024, transparent: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket. Port 0 picks a free port (read it with getsockname()).

    `transparent=True` sets IP_TRANSPARENT, needed only for TPROXY-style capture (not for REDIRECT).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(_SOL_IP, 19, 1)  # IP_TRANSPARENT
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def describe_connection(sock: socket.socket) -> TransparentConnection:
    """Addresses of an accepted socket; orig_dst from SO_ORIGINAL_DST, or the local address."""
    client = ClientAddr.from_sockaddr(sock.getpeername())
    local = LocalAddr.from_sockaddr(sock.getsockname())
    try:
        orig = original_dst(sock)
    except OriginalDstUnavailable:
        return TransparentConnection(sock, client, local, OrigDstAddr(local.ip, local.port), redirected=False)
    # REDIRECT to ourselves of a connection that already targeted us still reports our own address
    redirected = orig != OrigDstAddr(local.ip, local.port)
    return TransparentConnection(sock, client, local, orig, redirected=redirected)


# accept() errors that mean "out of resources for now", not "this listener is broken"
# (same list as trio's serve_listeners)
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_SLEEP_S = 0.1
_ACCEPT_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


async def serve_transparent(
    listen_sock: socket.socket,
    handler: Handler,
    *,
    max_connections: float = math.inf,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever (or `max_connections` times), run `handler` for each connection in its own
    task. The listener socket stays the caller's; accepted sockets are closed after their handler.
    """
    listen_sock.setblocking(False)
    async with trio.open_nursery() as nursery:
        task_status.started()
        accepted = 0
        while accepted < max_connections:
            try:
                sock, _ = listen_sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listen_sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    log.warning("accept_capacity", error=exc.strerror)
                    await trio.sleep(_ACCEPT_RETRY_SLEEP_S)
                    continue
                if exc.errno in _ACCEPT_TRANSIENT_ERRNOS:
                    await trio.lowlevel.checkpoint()  # never spin without yielding
                    continue
                raise
            accepted += 1
            sock.setblocking(False)
            try:
                conn = describe_connection(sock)
            except OSError:  # the client already went away (getpeername: ENOTCONN)
                sock.close()
                continue
            nursery.start_soon(_run_handler, handler, conn)
            await trio.lowlevel.checkpoint()


async def _run_handler(handler: Handler, conn: TransparentConnection) -> None:
    try:
        await handler(conn)
    except Exception:
        log.exception("l4_handler_failed", client=str(conn.client), orig_dst=str(conn.orig_dst))
    finally:
        conn.sock.close()
