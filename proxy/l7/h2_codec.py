"""HTTP/2 message rules, sans-IO: settings, request and response heads in our events, gRPC statuses.

Theory of operation
-------------------
Frames and the stream state machine are our connection layer's (h2_connection.py, h2_frames.py:
RFC 9113), HPACK our own (h2_hpack.py: RFC 7541); this module holds what a proxy adds on top,
shared by the downstream server (h2_server.py) and the upstream client (h2_upstream.py), and never
touches a socket:

- the SETTINGS we advertise (`server_settings`, `client_settings`): Envoy's defaults where they
  bound memory, tighter where Envoy's default is "unlimited" (documented below);
- a received request head → `RequestHead` (RFC 9113 §8.3): pseudo-header fields mapped to method,
  target, scheme and authority, `host` folded into the authority, split `cookie` fields joined
  (§8.2.3), and every field checked again, after the connection layer, for what makes a request
  malformed and what must never reach an HTTP/1.1 upstream (CR, LF or NUL in a value or in `:path`,
  characters outside a token in a name or the method, connection-specific fields, `te` other than
  `trailers`, pseudo-header fields out of place: §8.2.1, §8.2.2, §8.3), so no request can be
  smuggled across a downgrade whatever the layer below lets through; a MalformedRequest costs its
  stream only (§8.1.1);
- the request body's length as an HTTP/1.1 upstream will frame it (`content-length` checked
  against the DATA by the connection layer, §8.1.1);
- a response or trailers head → the header list the connection layer sends (`:status` first,
  connection-specific fields dropped);
- gRPC: the status a local reply maps to (as Envoy maps HTTP statuses), `grpc-timeout` parsing,
  and `grpc-message` percent-encoding.
"""

from __future__ import annotations

import re

from proxy.l7 import h1
from proxy.l7 import h2_frames as frames
from proxy.l7.errors import BadRequest
from proxy.l7.events import Headers, RequestHead
from proxy.l7.host_field import is_valid_host, known_valid_hosts

# --- settings -------------------------------------------------------------------------------------

# Envoy's max_concurrent_streams default is 2^31-1; a bounded number is the stream-count-exhaustion
# defence Envoy's own edge guidance recommends (100), raised here for a sidecar's fan-in.
MAX_CONCURRENT_STREAMS = 1024
# Flow-control windows we advertise: what one slow reader can make us buffer, per stream and per
# connection (Envoy's edge guidance: 64 KiB stream, 1 MiB connection; a sidecar moves bigger bodies).
INITIAL_STREAM_WINDOW = 256 * 1024
INITIAL_CONNECTION_WINDOW = 1024 * 1024
MAX_FRAME_SIZE = 16 * 1024  # the protocol default; bigger frames only save headers on bulk data
MAX_HEADER_LIST_BYTES = 60 * 1024  # Envoy's max_request_headers_kb default (60)


def server_settings() -> dict[int, int]:
    return {frames.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS, frames.INITIAL_WINDOW_SIZE: INITIAL_STREAM_WINDOW,
            frames.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES, frames.ENABLE_PUSH: 0,
            frames.MAX_FRAME_SIZE: MAX_FRAME_SIZE}


def client_settings() -> dict[int, int]:
    return {frames.INITIAL_WINDOW_SIZE: INITIAL_STREAM_WINDOW, frames.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            frames.ENABLE_PUSH: 0, frames.MAX_FRAME_SIZE: MAX_FRAME_SIZE}


# --- field checks ---------------------------------------------------------------------------------

# RFC 9110 §5.6.2 token characters, lowercase only (RFC 9113 §8.2: uppercase names are malformed)
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_PATH = re.compile(rb"[\x00-\x20\x7f]")
_BAD_METHOD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")  # RFC 9110 §9.1: a method is a token
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*\Z")  # RFC 3986 §3.1
# RFC 9113 §8.2.2 connection-specific fields: never in an HTTP/2 message
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"})


class MalformedRequest(BadRequest):
    """A request HTTP/2 calls malformed (RFC 9113 §8.1.1): a stream error PROTOCOL_ERROR."""


def _check_value(name: bytes, value: bytes) -> None:
    if _BAD_VALUE.search(value) is not None:
        raise MalformedRequest(f"CR, LF or NUL in the value of {name[:40]!r}")
    if value and (value[0] in b" \t" or value[-1] in b" \t"):  # RFC 9113 §8.2.1
        raise MalformedRequest(f"whitespace around the value of {name[:40]!r}")


def _check_field(name: bytes, value: bytes) -> None:
    if not name or _BAD_NAME.search(name) is not None:
        raise MalformedRequest(f"invalid field name {name[:40]!r}")
    _check_value(name, value)
    if name in CONNECTION_SPECIFIC:
        raise MalformedRequest(f"connection-specific field {name.decode()!r}")


def check_trailers(fields: Headers) -> Headers:
    """Received request trailers, checked as the head's regular fields are (RFC 9113 §8.1: no
    pseudo-header fields in trailers). Raises MalformedRequest."""
    for name, value in fields:
        if name[:1] == b":":
            raise MalformedRequest(f"pseudo-header field {name[:40]!r} in trailers")
        _check_field(name, value)
    return list(fields)


class CheckedRequestFields:
    """What a request's field block says, every check passed (check_request_fields): the part of a
    parsed request that depends on the fields alone, so that a block a client repeats is checked
    once per connection (h2_server.py keeps them by the decoded block)."""

    __slots__ = ("method", "path", "scheme", "authority", "headers", "body_framing", "grpc")

    def __init__(self, method: bytes, path: bytes, scheme: bytes, authority: bytes, headers: Headers,
                 body_framing: h1.Framing | None, grpc: bool) -> None:
        self.method, self.path, self.scheme, self.authority = method, path, scheme, authority
        self.headers = headers  # copied into each request's head: stages change theirs
        self.body_framing = body_framing  # for a stream the HEADERS did not end; None: invalid content-length
        self.grpc = grpc


def request_from_checked(checked: CheckedRequestFields, end_stream: bool) -> tuple[RequestHead, h1.Framing]:
    """A request of its own from checked fields: its head, and its body's length as an HTTP/1.1
    upstream frames it. Raises MalformedRequest."""
    if end_stream:
        framing = h1.FRAMING_NONE
    else:
        framing = checked.body_framing
        if framing is None:
            raise MalformedRequest("invalid content-length")
    return RequestHead(checked.method, checked.path, checked.authority, list(checked.headers), scheme=checked.scheme,
                       http_version=b"2"), framing


def check_request_fields(fields: Headers) -> CheckedRequestFields:
    """Every RFC 9113 §8.2/§8.3 check of a request's fields, and what they say. Raises MalformedRequest."""
    method = path = scheme = authority = None
    host = None
    headers: Headers = []
    cookies: list[bytes] | None = None
    length: bytes | None = None
    grpc = False
    regular = False
    for name, value in fields:
        if name[:1] == b":":  # RFC 9113 §8.3: before the regular fields, each once, only these four
            if regular:
                raise MalformedRequest(f"pseudo-header field {name[:40]!r} after a regular field")
            _check_value(name, value)
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                raise MalformedRequest(f"unknown or repeated pseudo-header field {name[:40]!r}")
            continue
        regular = True
        _check_field(name, value)
        if name == b"host":
            host = value
        elif name == b"cookie":
            cookies = [value] if cookies is None else cookies + [value]
        elif name == b"te":
            if value.strip().lower() != b"trailers":
                raise MalformedRequest("te other than trailers")
            headers.append((name, value))
        elif name == b"content-length":
            if length is not None and value != length:
                raise MalformedRequest("differing content-length values")
            length = value
        else:
            if name == b"content-type" and value.startswith(b"application/grpc"):
                grpc = True
            headers.append((name, value))
    if not method or _BAD_METHOD.search(method) is not None:
        raise MalformedRequest("no :method, or one that is not a token")
    if method == b"CONNECT":
        raise MalformedRequest("CONNECT is not supported")
    if path is None or scheme is None:
        raise MalformedRequest("no :path or :scheme")
    if _SCHEME.match(scheme) is None:
        raise MalformedRequest("invalid :scheme")
    if not path or _BAD_PATH.search(path) is not None:
        raise MalformedRequest("invalid :path")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise MalformedRequest(":path is not in origin form")
    if authority is None and host is None:
        raise MalformedRequest("no :authority or host")
    if authority is not None and host is not None and host != authority:
        raise MalformedRequest("host differs from :authority")  # RFC 9113 §8.3.1 (SHOULD)
    if authority is None:
        authority = host  # RFC 9113 §8.3.1: Host stands in for a missing :authority
    if authority not in known_valid_hosts and not is_valid_host(authority):  # as HTTP/1.1's Host (RFC 3986)
        raise MalformedRequest(f"invalid :authority {authority[:80]!r}")
    if cookies is not None:
        headers.append((b"cookie", b"; ".join(cookies)))  # RFC 9113 §8.2.3
    if length is None:
        body_framing: h1.Framing | None = h1.FRAMING_CHUNKED  # a length not known in advance
    elif not length.isdigit() or len(length) > 18:
        body_framing = None
    else:
        body_framing = h1.length_framing(int(length))
    return CheckedRequestFields(method, path, scheme, authority, headers, body_framing, grpc)


_NOT_IN_RESPONSE = CONNECTION_SPECIFIC | {b"content-length", b"te"}  # (content-length: ours, from the framing)
# host: folded into :authority; content-length: ours, from the framing; te: unless "trailers"
_NOT_IN_REQUEST = CONNECTION_SPECIFIC | {b"host", b"content-length", b"te"}
_STATUS_FIELDS = {status: (b":status", b"%d" % status) for status in range(100, 600)}


def response_fields(status: int, headers: Headers, length: int | None) -> Headers:
    """A response head as the connection layer sends it: `:status` first, connection-specific fields dropped (an
    HTTP/1.1 upstream's `connection`, `keep-alive`...), `content-length` when the length is known."""
    out: Headers = [_STATUS_FIELDS.get(status) or (b":status", b"%d" % status)]
    out += [pair for pair in headers if pair[0] not in _NOT_IN_RESPONSE and pair[0][:1] != b":"]
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out


def plain_response_fields(status: int, block: bytes, length: int) -> tuple:
    """response_fields for a plain HTTP/1.1 upstream response, from the field block the head parser
    forwards (headparser.forward_response_head: "name: value CRLF" lines, names lowercased, the
    connection-specific fields, content-length and te already out). A tuple: H2ServerConnection
    keeps it for the next response with the same block."""
    out = [_STATUS_FIELDS.get(status) or (b":status", b"%d" % status)]
    for line in block.split(b"\r\n")[:-1]:  # the block ends with CRLF (b"" when it has no fields)
        name, value = line.split(b": ", 1)
        out.append((name, value))
    out.append((b"content-length", b"%d" % length))
    return tuple(out)


def trailer_fields(trailers: Headers) -> Headers:
    return [pair for pair in trailers if pair[0] not in CONNECTION_SPECIFIC and pair[0][:1] != b":"]


def request_fields(head: RequestHead, authority: bytes, length: int | None,
                   extra: tuple[bytes, bytes] | None = None) -> Headers:
    """An upstream request head as the connection layer sends it (RFC 9113 §8.3.1); `extra`: one
    more field after the request's own (the proxy's peer metadata, Chain.upstream_peer_header)."""
    out: Headers = [(b":method", head.method), (b":scheme", b"http"), (b":authority", authority),
                    (b":path", head.target)]
    # one pass, the usual field kept after two tests (te: kept only as "trailers", §8.2.2)
    out += [pair for pair in head.headers if pair[0] not in _NOT_IN_REQUEST and pair[0][:1] != b":"
            or pair[0] == b"te" and pair[1].strip().lower() == b"trailers"]
    if extra is not None:
        out.append(extra)
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out


def response_from_fields(fields: Headers) -> tuple[int, Headers, int | None]:
    """A received response head → (status, fields without pseudo-headers, content-length or None)."""
    status = 0
    out: Headers = []
    length = None
    for name, value in fields:
        if name == b":status":
            status = int(value)
        elif name[:1] == b":":
            continue
        elif name == b"content-length":
            length = int(value) if value.isdigit() else None
        else:
            out.append((name, value))
    return status, out, length


# --- gRPC -----------------------------------------------------------------------------------------

GRPC_OK, GRPC_UNKNOWN, GRPC_DEADLINE_EXCEEDED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_UNAVAILABLE = 0, 2, 4, 12, 13, 14

# Envoy's Grpc::Utility::httpToGrpcStatus (and the gRPC spec's "HTTP to gRPC status code mapping")
_HTTP_TO_GRPC = {400: GRPC_INTERNAL, 401: 16, 403: 7, 404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE,
                 502: GRPC_UNAVAILABLE, 503: GRPC_UNAVAILABLE, 504: GRPC_UNAVAILABLE}


def grpc_status_for_http(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def grpc_timeout_s(value: bytes | None) -> float | None:
    """`grpc-timeout: 1*8DIGIT unit` (gRPC over HTTP/2 spec) in seconds; None when absent or invalid."""
    if not value or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def grpc_message(text: bytes) -> bytes:
    """Percent-encode a grpc-message value (the spec: bytes outside 0x20-0x7E and '%')."""
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text)


def grpc_local_reply_fields(http_status: int, body: bytes, grpc_status: int | None = None) -> Headers:
    """A trailers-only gRPC response for a reply the proxy makes (Envoy: HTTP 200 with the mapped
    grpc-status, the reply text as grpc-message)."""
    code = grpc_status if grpc_status is not None else grpc_status_for_http(http_status)
    fields: Headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", b"%d" % code)]
    if body:
        fields.append((b"grpc-message", grpc_message(body)))
    return fields
