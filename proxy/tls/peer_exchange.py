"""The Trio side of the TCP peer metadata exchange (frames: proxy/telemetry/peer_exchange.py): send
this sidecar's frame, read the peer's, leave any app bytes that followed it in the connection's
buffer for the TCP pump."""

from __future__ import annotations

import trio

from proxy.l7.connio import Conn
from proxy.telemetry.peer import WorkloadIdentity
from proxy.telemetry.peer_exchange import PeerExchangeError, decode_frame

# the peer frame comes right after the handshake; a peer that promised it and stays silent is broken
EXCHANGE_TIMEOUT_S = 5.0


async def exchange(conn: Conn, own_frame: bytes, timeout_s: float = EXCHANGE_TIMEOUT_S) -> WorkloadIdentity | None:
    """Both frames, in either order (each side writes first, so neither waits on the other). Returns
    the peer's identity (None: its facts broke the rules). PeerExchangeError on a bad frame, a close
    or silence past `timeout_s`; OSError/TlsError when the connection fails."""
    await conn.send_all(own_frame)
    with trio.move_on_after(timeout_s):
        while True:
            decoded = decode_frame(conn.buf[conn.pos:])
            if decoded is not None:
                identity, size = decoded
                conn.consume(size)
                return identity
            if await conn.fill() == 0:
                raise PeerExchangeError("the peer closed the connection before its peer exchange frame")
    raise PeerExchangeError(f"no peer exchange frame within {timeout_s} s")
