"""The downstream side: accept HTTP/1.1 connections, read request heads, run the chain, reply.

Theory of operation
-------------------
One Trio task per downstream connection runs requests strictly one after another (pipelined
requests wait in the receive buffer, so responses go out in order). For each request:

1. read and parse the head (header-read timeout from its first byte, idle timeout before it);
2. take the current snapshot once and keep it in a RequestContext until the request ends;
3. request stages (route, forwarding headers, ...) then the upstream exchange (upstream.py);
4. any ProxyError becomes a local reply if no response head went out yet, else a reset;
5. access log and stats in `finally`; the connection continues only when both sides allow it
   and the request body was fully read.

The task checkpoints once per request, so a client pipelining many requests cannot monopolise
the worker, and never otherwise awaits unless a socket says EAGAIN.
"""

from __future__ import annotations

import math
import socket
import time
from time import monotonic

import structlog
import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable

from proxy.accept_backoff import AcceptBackoff, wait_after_accept_error
from proxy.l7 import h1
from proxy.l7.body import NO_BODY, BodyReader
from proxy.l7.chain import Chain
from proxy.l7.connio import RECV_BYTES, Conn, ReadTimeout
from proxy.l7.context import DownstreamPeer, RequestContext
from proxy.l7.dataplane import DataPlane
from proxy.l7.errors import (
    BadRequest,
    DownstreamDisconnect,
    DownstreamTimeout,
    HeadTooLarge,
    Overloaded,
    ProxyError,
    RequestHeaderTimeout,
)
from proxy.l7.events import RequestHead
from proxy.l7.headparser import HeadParseError, parse_request_head
from proxy.l7.host_field import is_valid_host, known_valid_hosts
from proxy.l7.h1_stream import H1Stream
from proxy.l7.h2_server import PRIOR_KNOWLEDGE, H2ServerConnection, is_prior_knowledge
from proxy.l7.local_reply import local_reply_bytes
from proxy.l7.pipeline import finish, reply_for_error, serve_request

log = structlog.get_logger("triomesh.l7")

# connections accepted per scheduler batch: each costs about 20 µs (accept, registration, its task), and
# a crowd reconnecting at once (slow clients after their 408s) must not hold up the others for long
_ACCEPT_BATCH = 16
_NO_LISTENER = (None, None)  # the listener left the active config (a reload removed it)


def _to_stdlib_socket(sock) -> socket.socket:
    if isinstance(sock, socket.socket):
        return sock
    return socket.socket(fileno=sock.detach())  # a trio socket: take over its fd


async def serve_listener(sock, listener_name: str, plane: DataPlane, *, connection_nursery=None,
                         handle_connection=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on a bound, listening socket until cancelled. Connections run in
    `connection_nursery` when given (so they can outlive a listener that a reload removes).
    `handle_connection(sock, addr)`: what serves each connection instead of a plaintext
    DownstreamConnection (an HTTPS listener's handshake first)."""
    lsock = _to_stdlib_socket(sock)
    lsock.setblocking(False)
    try:
        async with trio.open_nursery() as own:
            nursery = connection_nursery or own
            task_status.started()
            backoff = AcceptBackoff()
            max_connections = plane.settings.max_downstream_connections or math.inf
            active = plane.downstream_cx_active
            while True:
                started = 0  # this batch's connections: their tasks have not run, so not in the gauge yet
                for _ in range(_ACCEPT_BATCH):
                    try:
                        csock, addr = lsock.accept()
                    except BlockingIOError:
                        await wait_readable(lsock)
                        break
                    except OSError as e:  # EMFILE and friends: back off instead of spinning
                        await wait_after_accept_error(backoff, e, listener_name, plane.stats, log)
                        break
                    if backoff.delay_s:
                        backoff.succeeded()
                    if active.value + started >= max_connections:
                        _reject_overloaded(csock, listener_name, plane)
                        continue
                    started += 1
                    plane.sweeper.ensure_running(nursery)
                    plane.reactor.ensure_running(nursery)
                    if handle_connection is None:
                        nursery.start_soon(DownstreamConnection(plane, listener_name, csock, addr).run)
                    else:
                        nursery.start_soon(handle_connection, csock, addr)
                else:
                    await checkpoint()
    finally:
        notify_closing(lsock)
        lsock.close()


def _reject_overloaded(csock: socket.socket, listener_name: str, plane: DataPlane) -> None:
    """Past --max-downstream-connections: closed at once, counted (Envoy's downstream_cx_overload_reject)."""
    csock.close()
    plane.stats.counter("triomesh_downstream_cx_overload_reject_total", listener=listener_name).value += 1


def _request_arriving(sock: socket.socket) -> bool:
    """Bytes wait in the kernel (a request the task has not read yet): a drain lets it be served."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # EAGAIN: nothing there; anything else: the connection is gone anyway
        return False


def _format_addr(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """`http://authority/path?q` → (authority, "/path?q") (RFC 9112 §3.2.2)."""
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        rest = target[7:]
    elif lower.startswith(b"https://"):
        rest = target[8:]
    else:
        return None
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i != -1)
    authority, path = rest[:cut], rest[cut:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


class DownstreamConnection:
    __slots__ = ("plane", "listener_name", "conn", "client", "client_ip", "original_destination", "stream", "h2",
                 "peer")

    def __init__(self, plane: DataPlane, listener_name: str, sock: socket.socket, addr, initial: bytes = b"",
                 original_destination: tuple[str, int] | None = None, peer_principal: str | None = None,
                 conn: Conn | None = None) -> None:
        """`conn`: the connection already made over `sock` (a TLS connection after its handshake)."""
        self.plane = plane
        self.peer = DownstreamPeer(sock, peer_principal, tls=conn)
        self.original_destination = original_destination
        self.listener_name = listener_name
        self.conn = conn if conn is not None else Conn(sock, initial, plane.reactor, plane.sweeper,
                                                       plane.settings.stream_idle_timeout_s)
        self.client = _format_addr(addr)
        self.client_ip = str(addr[0]).encode() if isinstance(addr, tuple) else b""
        self.stream: H1Stream | None = None  # the request being served, None between requests
        self.h2: H2ServerConnection | None = None  # once the connection turned out to be h2c

    def drain(self, *, close_idle: bool = True) -> None:
        """The proxy drains: an idle connection closes now (with `close_idle`), a busy one after its
        response, which says `connection: close`; HTTP/2 gets GOAWAY."""
        if self.h2 is not None:
            self.h2.drain()
        elif self.stream is not None:
            self.stream.keep_alive = False
        elif close_idle:
            self.close_if_idle()

    def close_if_idle(self) -> None:
        if self.h2 is None and self.stream is None and not self.conn.buffered and not _request_arriving(self.conn.sock):
            self.conn.expire()  # waiting for a next request: its read ends, the connection closes

    async def run(self) -> None:
        plane = self.plane
        plane.use_run_clock()  # per connection, not per request: a plane may be served by one run after another
        plane.downstream_cx_total.value += 1
        plane.downstream_cx_active.value += 1
        plane.downstream.add(self)
        conn = self.conn
        try:
            try:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            while await self.one_request():
                if len(conn.buf) > conn.pos:  # pipelined: let others run; otherwise the next read waits anyway
                    await checkpoint()
        except (OSError, ReadTimeout):
            pass  # the client went away or went quiet; nothing to answer
        except Exception:  # a bug must cost one connection, never the listener
            log.exception("unexpected error on a downstream connection", client=self.client)
            conn.reset()
        finally:
            plane.downstream_cx_active.value -= 1
            plane.downstream.discard(self)
            conn.close()

    async def _read_head(self):
        """The parsed head, or None when the connection should just close (EOF, idle timeout).
        The idle timeout runs until a head's first byte, then the header-read timeout, which
        raises RequestHeaderTimeout (deadlines on time.monotonic, enforced by the plane's sweeper)."""
        conn, settings = self.conn, self.plane.settings
        max_bytes, max_headers = settings.max_head_bytes, settings.max_headers
        in_head = False
        n = 0  # what the last read here brought
        while True:
            avail = len(conn.buf) - conn.pos
            if avail:
                try:
                    parsed = parse_request_head(conn.buf, conn.pos, max_headers)
                except HeadParseError:
                    if is_prior_knowledge(conn.buf, conn.pos):  # RFC 9113 §3.3: h2c, prior knowledge
                        conn.io_deadline = math.inf
                        return PRIOR_KNOWLEDGE
                    raise
                if parsed is not None:
                    conn.io_deadline = math.inf
                    if parsed[0] - conn.pos > max_bytes:
                        raise HeadTooLarge(f"request head of {parsed[0] - conn.pos} bytes")
                    return parsed
                if avail > max_bytes:
                    raise HeadTooLarge(f"no end of head within {max_bytes} bytes")
                if not in_head:
                    in_head = True
                    conn.io_deadline = monotonic() + settings.request_headers_timeout_s
            else:
                conn.io_deadline = monotonic() + settings.idle_timeout_s
            try:
                if avail and 0 < n < RECV_BYTES and conn.short_fill_empties_socket:
                    # a head still incomplete after a short read: the socket was empty, and the client
                    # may be trickling it (slowloris). Park: the worker's parked-queue task reads its
                    # bytes and wakes this task only for a complete, invalid or oversized head or the
                    # end (reactor.py, "Parked reads"); the header timeout applies as before.
                    n = await conn.fill_parked(self._head_worth_a_look)
                else:
                    n = await conn.fill(wait_first=not avail)
            except ReadTimeout:
                if in_head:  # an idle connection just closes; a started head gets its answer
                    raise RequestHeaderTimeout(f"no complete request head within "
                                               f"{settings.request_headers_timeout_s} s") from None
                return None
            if n == 0:
                return None

    def _head_worth_a_look(self, buf: bytes, pos: int) -> bool:
        """For a parked head (see _read_head): complete, invalid or over the size limit."""
        settings = self.plane.settings
        if len(buf) - pos > settings.max_head_bytes:
            return True
        try:
            return parse_request_head(buf, pos, settings.max_headers) is not None
        except HeadParseError:
            return True

    async def one_request(self) -> bool:
        """Serve one request; returns whether to read another on this connection."""
        plane, conn = self.plane, self.conn
        try:
            parsed = await self._read_head()
        except (HeadParseError, BadRequest, RequestHeaderTimeout) as e:
            await self._reject_head(e)
            return False
        if parsed is None:
            return False
        if parsed is PRIOR_KNOWLEDGE:
            self.h2 = H2ServerConnection(plane, self.listener_name, conn, self.client, self.client_ip,
                                         self.original_destination, self.peer)
            await self.h2.run()
            return False
        end, method, target, minor, raw_headers = parsed
        conn.pos = end
        snapshot = plane.holder.current
        ctx = RequestContext(snapshot, None, self.client, RequestHead(method, target, b"", raw_headers,
                             http_version=b"1.1" if minor else b"1.0"), plane.now(), time.time(),
                             self.client_ip, self.original_destination, self.peer)
        rt = plane.runtime(snapshot)
        ctx.listener, chain = rt.by_listener.get(self.listener_name, _NO_LISTENER)
        try:
            stream = self._prepare(ctx, raw_headers, minor, chain)
        except ProxyError as e:  # a head we cannot serve: answered, and the connection closed
            ctx.error = e
            stream = H1Stream(conn, NO_BODY, h1.FRAMING_NONE, False, minor, False, False, chain)
            try:
                return await reply_for_error(ctx, e, stream)
            finally:
                finish(plane, ctx)
        if plane.degraded:  # rare: a drain, or memory pressure
            if plane.draining:
                stream.keep_alive = False
            if plane.shedding:
                return await self._shed(ctx, stream)
        self.stream = stream
        keep = await serve_request(plane, ctx, stream, rt.clusters)
        self.stream = None
        return keep and not plane.draining  # a drain that began while the head was being written

    async def _shed(self, ctx: RequestContext, stream: H1Stream) -> bool:
        """The overload manager sheds new requests: 503 OM with x-envoy-overloaded, never upstream."""
        plane = self.plane
        plane.stats.counter("triomesh_overload_rq_shed_total").value += 1
        error = Overloaded("memory above the worker's limit")
        ctx.error = error
        try:
            return await reply_for_error(ctx, error, stream)
        finally:
            finish(plane, ctx)

    def _prepare(self, ctx: RequestContext, raw_headers, minor: int, chain: Chain | None) -> H1Stream:
        """Validate the head (Host, framing), strip hop-by-hop fields, decide keep-alive."""
        if chain is None:
            raise BadRequest(f"no listener {self.listener_name} in the active config")
        head = ctx.request
        headers, host, framing, keep_alive, expect_continue, upgrade = h1.classify_request(raw_headers, minor)
        target = head.target
        if 0x23 in target:  # b"#" as an int: a bytes operand costs a raised and cleared TypeError
            # RFC 9110 §7.1: a fragment is the client's business and never part of the target. It is
            # dropped before routing (as Istio's Envoy does), so no route or policy ever sees it.
            target = target[:target.index(b"#")]
            head.set_target(target)
        if target[:1] != b"/":
            absolute = _split_absolute_form(target)
            if absolute is not None:
                host, origin_target = absolute
                head.set_target(origin_target)
            elif not (target == b"*" and head.method == b"OPTIONS"):
                raise BadRequest("request-target is not in origin or absolute form")
        if host is None:
            if minor >= 1:
                raise BadRequest("HTTP/1.1 request without host")
            host = b""
        elif host not in known_valid_hosts and not is_valid_host(host):  # RFC 9112 §3.2
            raise BadRequest(f"invalid host {host[:80]!r}")
        head.authority = host
        head.headers = headers
        body = NO_BODY if framing.kind == h1.NONE else BodyReader(
            self.conn, framing, eof_error=DownstreamDisconnect, timeout_error=DownstreamTimeout,
            protocol_error=BadRequest)
        return H1Stream(self.conn, body, framing, keep_alive, minor, expect_continue, upgrade, chain)

    async def _reject_head(self, e: Exception) -> None:
        """An unparseable, oversized or unfinished head: reply (400/408/431/501) and close, as
        Envoy's codec does."""
        status = getattr(e, "status", 400)
        body = getattr(e, "body", b"Bad Request") if isinstance(e, ProxyError) else (
            b"Request Header Fields Too Large" if status == 431 else b"Bad Request")
        ctx = RequestContext(self.plane.holder.current, None, self.client, RequestHead(b"-", b"-", b"", []),
                             self.plane.now(), time.time())
        ctx.error = e
        flag = e.response_flag if isinstance(e, ProxyError) else "DPE"
        if flag != "-":
            ctx.response_flags.append(flag)
        if isinstance(e, RequestHeaderTimeout):  # Envoy's downstream_rq_header_timeout
            self.plane.stats.counter("triomesh_downstream_rq_header_timeout_total").value += 1
        try:
            await self.conn.send_all(local_reply_bytes(status, body, close=True))
            ctx.status = status
            ctx.bytes_sent = len(body)
        except (OSError, ReadTimeout):
            pass
        self.plane.count_downstream(ctx.status, ctx.response_flags)
        if self.plane.access_log is not None:
            self.plane.access_log.emit(ctx)
        # debug, as Envoy logs it: the access log and the counters already show each one, and a burst of
        # thousands (slow clients timing out together) must not cost a log line each
        log.debug("rejected request head", client=self.client, status=status, error=str(e))


async def serve_connection(plane: DataPlane, listener_name: str, sock: socket.socket, addr, initial: bytes = b"", *,
                           nursery: trio.Nursery, original_destination: tuple[str, int] | None = None,
                           peer_principal: str | None = None) -> None:
    """Serve one already-accepted connection on `listener_name` (a sidecar's virtual listener),
    replaying `initial`, the bytes a protocol sniffer read first; `original_destination` is where
    the client meant to go (a PASSTHROUGH cluster connects there); `peer_principal` the client's
    mTLS identity (None: plaintext). `nursery` runs the timeout sweeper if it is not running yet.
    Returns when the connection is done; the socket is closed."""
    downstream = DownstreamConnection(plane, listener_name, sock, addr, initial, original_destination, peer_principal)
    plane.sweeper.ensure_running(nursery)
    plane.reactor.ensure_running(nursery)
    await downstream.run()
