"""Real TLS ClientHello bytes, produced by Python's ssl module (OpenSSL) as a client over a MemoryBIO."""

from __future__ import annotations

import ssl


def client_hello(
    server_hostname: str | None = "reviews.default.svc.cluster.local",
    alpn: list[str] | None = None,
    *,
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass  # it has written its ClientHello and now waits for the server: exactly what we want
    hello = outgoing.read()
    assert hello[0] == 0x16, "the client's first flight is a handshake record"
    return hello


def refragment(records: bytes, fragment_bytes: int) -> bytes:
    """Re-cut the handshake payload of `records` into records of at most `fragment_bytes`: a valid
    TLS transformation (RFC 8446 §5.1: handshake messages may be split over records)."""
    payload = bytearray()
    pos = 0
    version = records[1:3]
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        payload += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    out = bytearray()
    for start in range(0, len(payload), fragment_bytes):
        chunk = payload[start : start + fragment_bytes]
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out)
