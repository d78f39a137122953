"""Per-request state carried through the stage chain, and what the access log reads at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config.snapshot import Cluster, Endpoint, Listener, Route, Snapshot
    from proxy.l7.events import RequestHead, ResponseHead


class DownstreamPeer:
    """What a request can know of its downstream connection besides the client's address, made once
    per connection: the peer's identity and the address the client connected to.

    `peer_principal` is the mTLS peer certificate's SPIFFE identity without `spiffe://`
    ("cluster.local/ns/foo/sa/bar"); None for a plaintext connection. The TLS transport sets it when
    it accepts a connection; authorization reads it (rules on principals and namespaces never match
    None). `sni` is the server name a TLS client asked for (connection.sni), None without TLS.
    `tls`: the connection's TLS layer (a TlsConn), None for plaintext."""

    __slots__ = ("peer_principal", "sni", "tls", "_sock", "_local_address", "_client_cert")

    def __init__(self, sock: Any = None, peer_principal: str | None = None, sni: str | None = None,
                 tls: Any = None) -> None:
        self.peer_principal = peer_principal
        self.sni = sni
        self.tls = tls
        self._sock = sock
        self._local_address: tuple[str, int] | None = None
        self._client_cert: bytes | None | bool = False  # False: not asked yet

    def client_cert(self, with_cert: bool) -> bytes | None:
        """This connection's x-forwarded-client-cert element (proxy/tls/client_cert.py), made on the
        first request that asks; None when the client presented no certificate."""
        element = self._client_cert
        if element is False:
            element = self._client_cert = self.tls.client_cert_element(with_cert) if self.tls is not None else None
        return element

    def local_address(self) -> tuple[str, int] | None:
        """(ip, port) this connection reached on the proxy, read once when first asked."""
        if self._local_address is None and self._sock is not None:
            try:
                address = self._sock.getsockname()
            except OSError:
                return None
            self._local_address = (str(address[0]), int(address[1])) if isinstance(address, tuple) else None
        return self._local_address


PLAINTEXT_PEER = DownstreamPeer()  # a connection nothing is known of beyond its client address


class RequestContext:
    """One downstream request. The snapshot is read once, when the head arrives, and kept."""

    __slots__ = (
        "snapshot",
        "listener",
        "downstream_addr",  # "ip:port" of the client
        "downstream_ip",  # bytes, the client's IP, for x-forwarded-for
        "original_destination",  # (ip, port) before a capture redirect (SO_ORIGINAL_DST), else None
        "request",  # RequestHead as received (stages may rewrite it before upstream)
        "request_id",  # bytes, x-request-id after generation
        "start_monotonic",  # trio.current_time()/time.monotonic() at head arrival
        "start_wall",  # time.time() at head arrival, for the access log timestamp
        "route",
        "cluster",
        "endpoint",
        "response",  # ResponseHead sent downstream (None until then)
        "status",  # int status sent downstream, 0 when none went out (reset / dead client)
        "response_flags",  # list[str], Envoy style: UF, UH, NR, UO, UT, UC, DC, DPE, LR, URX
        "bytes_received",  # request body bytes from downstream
        "bytes_sent",  # response body bytes to downstream
        "upstream_host",  # "ip:port" actually used, "" if none
        "error",  # the typed error that ended the request, if any
        "extra",  # dict for stages that need scratch state, made by scratch() on first use (else None)
        "peer",  # DownstreamPeer: the connection's peer identity and local address
    )

    def __init__(
        self,
        snapshot: Snapshot,
        listener: Listener | None,
        downstream_addr: str,
        request: RequestHead,
        start_monotonic: float,
        start_wall: float,
        downstream_ip: bytes | None = None,
        original_destination: tuple[str, int] | None = None,
        peer: DownstreamPeer = PLAINTEXT_PEER,
    ) -> None:
        self.snapshot = snapshot
        self.peer = peer
        self.listener = listener
        self.downstream_addr = downstream_addr
        self.original_destination = original_destination
        self.downstream_ip = (downstream_ip if downstream_ip is not None
                              else downstream_addr.rpartition(":")[0].strip("[]").encode())
        self.request = request
        self.request_id = b""
        self.start_monotonic = start_monotonic
        self.start_wall = start_wall
        self.route: Route | None = None
        self.cluster: Cluster | None = None
        self.endpoint: Endpoint | None = None
        self.response: ResponseHead | None = None
        self.status = 0
        self.response_flags: list[str] = []
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_host = ""
        self.error: BaseException | None = None
        self.extra: dict[str, Any] | None = None

    def scratch(self) -> dict[str, Any]:
        """The per-request dict stages keep state in (most requests never need one)."""
        extra = self.extra
        if extra is None:
            extra = self.extra = {}
        return extra
