"""Responses the proxy makes itself (errors, no route, ...), serialized for HTTP/1.1."""

from __future__ import annotations

from http import HTTPStatus

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def local_reply_bytes(status: int, body: bytes, *, close: bool, request_id: bytes = b"",
                      content_type: bytes = b"text/plain", head_only: bool = False,
                      headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A complete HTTP/1.1 response; `head_only` for HEAD requests (Content-Length still says the size).
    `headers`: a stage's own fields (CORS preflight, gRPC status); a content-type among them wins."""
    if status < 200 or status in (204, 304):  # no content, and for these no length either
        body = b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    else:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)), b"content-length: %d\r\n" % len(body)]
    if headers:
        lines += [b"%s: %s\r\n" % pair for pair in headers]
    if body and not (headers and any(name == b"content-type" for name, _ in headers)):
        lines.append(b"content-type: %s\r\n" % content_type)
    if request_id:
        lines.append(b"x-request-id: %s\r\n" % request_id)
    lines.append(b"server: triomesh\r\n")
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if body and not head_only:
        lines.append(body)
    return b"".join(lines)
