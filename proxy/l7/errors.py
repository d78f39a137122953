"""Typed errors of the L7 data path, each knowing the reply it becomes (status, Envoy response flag).

`source` says whose fault it was: "downstream" (the client sent something bad or went away),
"upstream" (the backend failed), "internal" (our config or our bug). `retryable` is what a retry
policy may look at. One function (`server._reply_for_error`) turns these into responses.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    response_flag = "-"
    source = "internal"
    retryable = False
    body = b""  # text of the local reply; Envoy's wording where it has one
    headers: tuple[tuple[bytes, bytes], ...] = ()  # fields the local reply carries besides the usual ones

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or type(self).__name__)
        self.detail = detail


# --- downstream ---------------------------------------------------------------------------------

class BadRequest(ProxyError):
    """Malformed request head or framing (RFC 9112). The connection is closed after the reply."""

    status = 400
    response_flag = "DPE"
    source = "downstream"
    body = b"Bad Request"


class HeadTooLarge(BadRequest):
    status = 431
    body = b"Request Header Fields Too Large"


class UnsupportedTransferCoding(BadRequest):
    status = 501
    body = b"Not Implemented"


class RequestHeaderTimeout(ProxyError):
    """Part of a request head arrived, then not the rest within the header-read timeout. Answered
    408 and closed, with Envoy's wording and, as Envoy, no response flag."""

    status = 408
    source = "downstream"
    body = b"request header timeout"


class DownstreamDisconnect(ProxyError):
    """The client went away (EOF/reset). No reply is possible."""

    status = 0
    response_flag = "DC"
    source = "downstream"


class DownstreamTimeout(ProxyError):
    """A request body that stopped arriving: the connection is closed without a reply."""

    status = 0
    response_flag = "DT"
    source = "downstream"


# --- routing ------------------------------------------------------------------------------------

class NoRoute(ProxyError):
    status = 404
    response_flag = "NR"
    source = "internal"


class NoCluster(ProxyError):
    """The route names a cluster that the snapshot does not have (Envoy: 503 NC)."""

    status = 503
    response_flag = "NC"
    body = b"cluster not found"


# --- upstream -----------------------------------------------------------------------------------

class NoHealthyUpstream(ProxyError):
    status = 503
    response_flag = "UH"
    source = "upstream"
    body = b"no healthy upstream"


class ConnectFailure(ProxyError):
    status = 503
    response_flag = "UF"
    source = "upstream"
    retryable = True
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"


class LocalConnectFailure(ConnectFailure):
    """No socket for the upstream connection: this process ran out of descriptors, memory, buffers
    or ephemeral ports (proxy/exhaustion.py). Envoy's pool reports it as a local connection failure,
    flagged UF like any connect failure; it is our fault, so outlier detection never hears of it."""

    source = "internal"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: local connection failure"

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason  # the exhaustion's counter label: emfile, enfile, enomem, ...


class UpstreamTlsFailure(ConnectFailure):
    """The TLS handshake to the upstream failed (DestinationRule tls): 503 UF like a refused connect,
    held against the endpoint by outlier detection. `reason` labels the counter; the message is
    Envoy's %UPSTREAM_TRANSPORT_FAILURE_REASON% in the access log."""

    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure, " \
           b"transport failure reason: TLS error"

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Overflow(ProxyError):
    status = 503
    response_flag = "UO"
    source = "upstream"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
    # Envoy's router marks a request its connection pool dropped for a circuit breaker (pending
    # requests, connections, max requests) so that clients and proxies in front can back off
    headers = ((b"x-envoy-overloaded", b"true"),)


class Overloaded(ProxyError):
    """The worker is above its memory limit (proxy/overload.py): a new request is shed before it
    costs anything, as Envoy's overload manager does with stop_accepting_requests."""

    status = 503
    response_flag = "OM"
    body = b"envoy overloaded"
    headers = ((b"x-envoy-overloaded", b"true"),)


class UpstreamTimeout(ProxyError):
    status = 504
    response_flag = "UT"
    source = "upstream"
    retryable = True
    body = b"upstream request timeout"


class UpstreamReset(ProxyError):
    """The upstream closed or reset the connection before a complete response."""

    status = 503
    response_flag = "UC"
    source = "upstream"
    retryable = True
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


class UpstreamProtocolError(ProxyError):
    """The upstream sent a malformed response head or body framing."""

    status = 502
    response_flag = "UPE"
    source = "upstream"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
