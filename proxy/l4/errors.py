"""Typed L4 errors: what went wrong on a TCP connection, in Envoy's vocabulary.

OS errors are translated into these where they enter (the syscall sites in tcp_proxy.py and
original_dst.py), so callers never branch on errno. Each error carries the same attributes as the
L7 errors (`status`, `response_flag`, `source`, `retryable`) so one access-log / rescue path can
handle both; `status` is the HTTP status an L7 caller would answer with, when one applies.
"""

from __future__ import annotations


class L4Error(Exception):
    status: int = 500
    response_flag: str = ""
    source: str = "internal"  # downstream | upstream | internal
    retryable: bool = False


class ConnectFailure(L4Error):
    """The upstream connection could not be established (refused, unreachable, reset in handshake)."""

    status = 503
    response_flag = "UF"
    source = "upstream"
    retryable = True


class ConnectTimeout(ConnectFailure):
    """No TCP handshake within connect_timeout_s (Envoy counts this as UF too, plus a timeout stat)."""


class LocalConnectFailure(ConnectFailure):
    """No upstream socket for a reason on our side: out of descriptors, memory, buffers or ephemeral
    ports (proxy/exhaustion.py). Flagged UF as Envoy does; `reason` is the counter label."""

    source = "internal"

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UpstreamReset(L4Error):
    """The upstream peer reset the connection after it was established (Envoy: UC)."""

    status = 503
    response_flag = "UC"
    source = "upstream"


class DownstreamReset(L4Error):
    """The downstream peer reset the connection (Envoy: DC). Nobody to reply to."""

    status = 0
    response_flag = "DC"
    source = "downstream"


class IdleTimeout(L4Error):
    """No bytes moved in either direction for idle_timeout_s (Envoy tcp_proxy idle_timeout)."""

    status = 504
    response_flag = "SI"
    source = "internal"


class OriginalDstUnavailable(L4Error):
    """SO_ORIGINAL_DST has no answer: the connection was not redirected by netfilter."""

    status = 500
    response_flag = "NR"
    source = "downstream"


class OutboundRefused(L4Error):
    """REGISTRY_ONLY outbound policy and the destination is not a known service (Istio: BlackHoleCluster)."""

    status = 502
    response_flag = "NR"
    source = "downstream"


def peer_gone(exc: OSError, *, upstream: bool) -> L4Error:
    """Translate an OSError seen on a connected socket into the reset error of that side.

    Any errno counts (ECONNRESET, EPIPE, ETIMEDOUT from keepalive, EHOSTUNREACH from ICMP...): once
    a read or write on an established connection fails, that side is gone for this proxy."""
    err = UpstreamReset if upstream else DownstreamReset
    return err(f"{'upstream' if upstream else 'downstream'} connection lost: {exc.strerror or exc}")
