"""Counting gRPC messages in a body that arrives in arbitrary pieces (sans-IO).

A gRPC body is a sequence of Length-Prefixed-Messages (gRPC over HTTP/2, PROTOCOL-HTTP2.md): a
1-byte compressed flag, a 4-byte big-endian length, then that many bytes. Only the prefixes are
read; payloads are skipped without being looked at, so the cost is per message, not per byte.
"""

from __future__ import annotations

PREFIX_BYTES = 5


def is_grpc(content_type: bytes | None) -> bool:
    """application/grpc and its +proto/+json/;... variants (not grpc-web, which Istio counts as HTTP)."""
    return content_type is not None and content_type.startswith(b"application/grpc") and not content_type.startswith(
        b"application/grpc-web")


class GrpcMessageCounter:
    __slots__ = ("messages", "_skip", "_prefix")

    def __init__(self) -> None:
        self.messages = 0
        self._skip = 0  # payload bytes of the current message still to come
        self._prefix = b""  # the first bytes of a prefix split across pieces

    def feed(self, data) -> None:
        size = len(data)
        skip = self._skip
        if skip >= size:
            self._skip = skip - size
            return
        position = skip
        prefix = self._prefix
        while position < size:
            wanted = PREFIX_BYTES - len(prefix)
            prefix += bytes(data[position:position + wanted])
            if len(prefix) < PREFIX_BYTES:
                position = size
                break
            self.messages += 1
            position += wanted + int.from_bytes(prefix[1:], "big")
            prefix = b""
        self._prefix = prefix
        self._skip = position - size
