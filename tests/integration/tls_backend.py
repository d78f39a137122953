"""The test backend (backend.py) behind TLS: certificates from a trustme CA, ALPN, and a record of
the SNI and client certificate each connection brought, so tests see what the proxy sent."""

from __future__ import annotations

import ssl
from functools import partial

import trio

from tests.integration.backend import Backend


class TlsBackend(Backend):
    def __init__(self, context: ssl.SSLContext, name: str = "tls-backend") -> None:
        super().__init__(name)
        self.context = context
        self.server_names: list[str | None] = []  # the SNI of each handshake
        self.client_names: list[tuple[str, ...]] = []  # the client certificate's DNS SANs, per connection
        self.alpn: list[str | None] = []
        context.sni_callback = self._record_sni

    def _record_sni(self, ssl_object, server_name, context) -> None:
        self.server_names.append(server_name)

    async def start(self, nursery: trio.Nursery) -> "TlsBackend":
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle_tls, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle_tls(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self.context, server_side=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        peer = tls.getpeercert()
        self.client_names.append(tuple(v for k, v in (peer or {}).get("subjectAltName", ()) if k == "DNS"))
        self.alpn.append(tls.selected_alpn_protocol())
        await self._handle(tls)


def server_context(ca, host: str = "backend.test", *, require_client_certificate: bool = False,
                   alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A server context with a certificate for `host` (and its SAN) signed by the trustme `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    if require_client_certificate:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(alpn))
    return context
