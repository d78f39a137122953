"""The access-log entry of one proxied TCP connection: what is known when it opens (addresses, start
time, peer identity) and what it did when it closes. Read once per connection, never per byte."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import trio

from proxy.l7.access_log import ConnectionEntry

if TYPE_CHECKING:
    from proxy.l4.tcp_proxy import TcpProxyResult
    from proxy.l7.access_log import AccessLog


def _address(address) -> str:  # noqa: ANN001 - a socket address tuple or None
    if not isinstance(address, tuple):
        return "-"
    ip, port = address[0], address[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class ConnectionOpened(NamedTuple):
    start_wall: float
    start_monotonic: float
    downstream_remote_address: str
    downstream_local_address: str
    requested_server_name: str | None
    peer_principal: str | None

    @classmethod
    def of(cls, sock, original_destination: tuple[str, int] | None) -> ConnectionOpened:  # noqa: ANN001
        """`sock`: a socket or a TlsConn (its socket's addresses, its SNI and mTLS peer)."""
        raw = getattr(sock, "sock", sock)
        try:
            remote = raw.getpeername()
        except OSError:  # the client already left
            remote = None
        try:
            local = original_destination or raw.getsockname()
        except OSError:
            local = None
        sni = principal = None
        if raw is not sock:  # TLS the proxy terminated
            sni = sock.server_name
            principal = sock.peer_principal()
        return cls(time.time(), trio.current_time(), _address(remote), _address(local), sni, principal)


class ConnectionClosed(NamedTuple):
    """How a connection handed to the cluster proxy ended: `response_flag` set when it was refused
    before any upstream (UH, UO), else the proxy's `result` (None if cancelled)."""

    response_flag: str
    upstream_host: str
    result: TcpProxyResult | None


def entry(opened: ConnectionOpened, cluster: str, closed: ConnectionClosed, access_log: AccessLog) -> ConnectionEntry:
    result = closed.result
    flag = closed.response_flag
    if not flag and result is not None and result.error is not None:
        flag = result.error.response_flag
    return ConnectionEntry(
        "access",
        "info",
        access_log.wall_timestamp(opened.start_wall),
        "tcp",
        flag or "-",
        closed.upstream_host or "-",
        cluster or "-",
        result.bytes_downstream_to_upstream if result is not None else 0,
        result.bytes_upstream_to_downstream if result is not None else 0,
        round((trio.current_time() - opened.start_monotonic) * 1000.0, 3),
        opened.downstream_remote_address,
        opened.downstream_local_address,
        opened.requested_server_name,
        opened.peer_principal,
    )
