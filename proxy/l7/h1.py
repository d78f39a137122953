"""HTTP/1.1 message rules, sans-IO: body framing, chunked decoding, hop-by-hop headers, serialization.

Theory of operation
-------------------
Heads are parsed by `headparser` (native C or its pure twin). This module decides what follows a
head (RFC 9112 §6.3 "Message Body Length") and turns bytes in a buffer into body pieces, and events
back into bytes. It never touches a socket: the Trio drivers (`server.py`, `upstream.py`) own the
buffers and call in here with `(buf, pos)` and get back new positions, so a body can be streamed
from the receive buffer to the other side without copying it into intermediate objects.

Framing is decided once per message and is a small tuple-like object: `Framing(kind, length)` with
kind one of NONE (no body), LENGTH (Content-Length), CHUNKED, CLOSE (read until EOF; responses only).

Smuggling defence (RFC 9112 §6.1, §6.3): a request with both Transfer-Encoding and Content-Length,
with differing Content-Length values, with a non-numeric Content-Length, or with a transfer coding
other than a final `chunked` is refused and the connection closed. Bodies are always re-framed on
the way out (chunked is decoded and re-encoded), so what the upstream sees is unambiguous.
"""

from __future__ import annotations

import os

from proxy.l7.errors import BadRequest, UnsupportedTransferCoding, UpstreamProtocolError
from proxy.l7.events import Headers
from proxy.l7.headparser import HeadParseError, parse_chunk_header, parse_trailers

NONE, LENGTH, CHUNKED, CLOSE = 0, 1, 2, 3

MAX_TRAILER_BYTES = 64 * 1024

# RFC 9110 §7.6.1 plus the de-facto ones Envoy strips. Anything named in Connection goes too.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
     b"upgrade", b"content-length"}
)


class Framing:
    __slots__ = ("kind", "length")

    def __init__(self, kind: int, length: int = 0) -> None:
        self.kind = kind
        self.length = length

    def __repr__(self) -> str:
        return f"Framing({('NONE', 'LENGTH', 'CHUNKED', 'CLOSE')[self.kind]}, {self.length})"


FRAMING_NONE = Framing(NONE)
FRAMING_CHUNKED = Framing(CHUNKED)
FRAMING_CLOSE = Framing(CLOSE)


def _content_length(values: list[bytes]) -> int:
    """All Content-Length values (repeated headers and comma lists) must be the same 1*DIGIT."""
    seen = -1
    for raw in values:
        for part in raw.split(b","):
            part = part.strip()
            if not part.isdigit() or len(part) > 18:
                raise ValueError(f"invalid content-length {raw[:40]!r}")
            n = int(part)
            if seen != -1 and n != seen:
                raise ValueError("conflicting content-length values")
            seen = n
    return seen


def _length_framing(cl: list[bytes], error_type: type[Exception]) -> Framing:
    """Content-Length framing; `error_type` for invalid or conflicting values (400 downstream,
    502 upstream)."""
    if len(cl) == 1 and cl[0].isdigit() and len(cl[0]) <= 18:  # the common case, without splitting
        n = int(cl[0])
    else:
        try:
            n = _content_length(cl)
        except ValueError as e:
            raise error_type(str(e)) from None
    return length_framing(n)


def length_framing(n: int) -> Framing:
    """The framing of a body of n bytes given by Content-Length (NONE for 0)."""
    if not n:
        return FRAMING_NONE
    if n < _CACHED_LENGTHS:
        framing = _LENGTH_FRAMINGS.get(n)
        if framing is None:
            framing = _LENGTH_FRAMINGS[n] = Framing(LENGTH, n)
        return framing
    return Framing(LENGTH, n)


# Framing objects are never changed once made, so the small lengths (the common small bodies) are
# shared: at most this many, made as they are first seen.
_CACHED_LENGTHS = 4096
_LENGTH_FRAMINGS: dict[int, Framing] = {}


def _scan_framing_headers(headers: Headers) -> tuple[list[bytes], list[bytes]]:
    te: list[bytes] = []
    cl: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            cl.append(value)
        elif name == b"transfer-encoding":
            te.append(value)
    return te, cl


def request_framing(headers: Headers, minor_version: int) -> Framing:
    """RFC 9112 §6.3 for requests; raises BadRequest (400/501) for anything ambiguous."""
    te, cl = _scan_framing_headers(headers)
    return _request_framing(te or None, cl or None, minor_version)


def _request_framing(te: list[bytes] | None, cl: list[bytes] | None, minor_version: int) -> Framing:
    if te:
        if cl:
            raise BadRequest("both transfer-encoding and content-length")
        if minor_version == 0:
            raise BadRequest("transfer-encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            if b"chunked" in codings:
                raise BadRequest("chunked must be the final and only-once transfer coding")
            raise UnsupportedTransferCoding(f"unsupported transfer-encoding {b', '.join(codings)[:60]!r}")
        if len(codings) != 1:
            raise UnsupportedTransferCoding(f"unsupported transfer-encoding {b', '.join(codings)[:60]!r}")
        return FRAMING_CHUNKED
    if cl:
        return _length_framing(cl, BadRequest)
    return FRAMING_NONE


def response_framing(request_method: bytes, status: int, headers: Headers) -> Framing:
    """RFC 9112 §6.3 for responses to `request_method`."""
    te, cl = _scan_framing_headers(headers)
    return _response_framing(request_method, status, te or None, cl or None)


def _response_framing(request_method: bytes, status: int, te: list[bytes] | None,
                      cl: list[bytes] | None) -> Framing:
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return FRAMING_NONE
    if te:
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        return FRAMING_CHUNKED if codings[-1] == b"chunked" else FRAMING_CLOSE
    if cl:
        return _length_framing(cl, UpstreamProtocolError)
    return FRAMING_CLOSE


def connection_tokens(headers: Headers) -> set[bytes]:
    tokens: frozenset[bytes] | set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            tokens = _add_tokens(tokens, value)
    return set(tokens) if tokens is not None else set()


def wants_keep_alive(minor_version: int, tokens: set[bytes]) -> bool:
    """RFC 9112 §9.3: 1.1 persists unless `close`; 1.0 only with `keep-alive`."""
    if b"close" in tokens:
        return False
    return minor_version >= 1 or b"keep-alive" in tokens


def strip_hop_by_hop(headers: Headers, tokens: set[bytes], *, keep_upgrade: bool = False) -> Headers:
    """Headers to forward: without hop-by-hop fields and without those named in Connection.
    `te: trailers` is the one TE value allowed through (RFC 9110 §10.1.4). With `keep_upgrade`,
    Upgrade and `connection: upgrade` are kept for a WebSocket handshake."""
    out: Headers = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in tokens:
            if keep_upgrade and name == b"upgrade":
                out.append((name, value))
            elif name == b"te" and value.strip().lower() == b"trailers":
                out.append((name, value))
            continue
        out.append((name, value))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def is_upgrade_request(headers: Headers, tokens: set[bytes]) -> bool:
    if b"upgrade" not in tokens:
        return False
    for name, _ in headers:
        if name == b"upgrade":
            return True
    return False


# Header names the single-pass classifiers look at; every other field is forwarded as is.
_REQUEST_SPECIAL = HOP_BY_HOP | {b"host", b"expect"}
_RESPONSE_SPECIAL = HOP_BY_HOP
_PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
_NO_TOKENS: frozenset[bytes] = frozenset()


# The Connection values nearly every message carries, already tokenized (no split/strip/lower).
_COMMON_CONNECTION_VALUES = {
    spelling: frozenset({spelling.lower()})
    for spelling in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def _add_tokens(tokens: frozenset[bytes] | set[bytes] | None, value: bytes) -> frozenset[bytes] | set[bytes]:
    """Connection options (RFC 9110 §7.6.1), lowercased, added to `tokens` (None: none yet).
    Returns a new set when it adds to an existing one."""
    if tokens is None:
        common = _COMMON_CONNECTION_VALUES.get(value)
        if common is not None:
            return common
        tokens = set()
    else:
        tokens = set(tokens)
    for t in value.split(b","):
        t = t.strip().lower()
        if t:
            tokens.add(t)
    return tokens


def _drop_named(headers: Headers, tokens: frozenset[bytes] | set[bytes]) -> Headers:
    """Remove fields that Connection names (RFC 9110 §7.6.1), beyond the usual close/keep-alive."""
    if tokens <= _PLAIN_CONNECTION_TOKENS:
        return headers
    extra = tokens - _PLAIN_CONNECTION_TOKENS
    return [h for h in headers if h[0] not in extra]


def classify_request(raw: Headers, minor: int):
    """One pass over a request's fields → (forwarded fields, host, framing, keep_alive,
    expect_continue, is_upgrade). Hop-by-hop fields, Host and Expect are taken out (Host travels as
    the authority; 100-continue is answered by the proxy). Raises BadRequest for ambiguous framing,
    a repeated Host, or a Host-less HTTP/1.1 request is left to the caller (absolute-form)."""
    out: Headers = []
    host = None
    cl: list[bytes] | None = None
    te: list[bytes] | None = None
    tokens: frozenset[bytes] | set[bytes] | None = None
    expect_continue = False
    upgrade_value = None
    special = _REQUEST_SPECIAL
    for pair in raw:
        name = pair[0]
        if name not in special:
            out.append(pair)
        elif name == b"host":
            if host is not None:
                raise BadRequest("more than one host header")
            host = pair[1]
        elif name == b"content-length":
            cl = [pair[1]] if cl is None else cl + [pair[1]]
        elif name == b"transfer-encoding":
            te = [pair[1]] if te is None else te + [pair[1]]
        elif name == b"connection":
            tokens = _add_tokens(tokens, pair[1])
        elif name == b"expect":
            if pair[1].lower() == b"100-continue" and minor >= 1:
                expect_continue = True
            else:
                out.append(pair)
        elif name == b"upgrade":
            upgrade_value = pair[1]
        elif name == b"te" and pair[1].strip().lower() == b"trailers":
            out.append(pair)
    framing = _request_framing(te, cl, minor)
    if tokens is None:
        return out, host, framing, minor >= 1, expect_continue and framing.kind != NONE, False
    upgrade = upgrade_value is not None and b"upgrade" in tokens
    out = _drop_named(out, tokens)
    if upgrade and b"h2c" in upgrade_value.lower():
        # RFC 9113 §3.1: the h2c upgrade is obsolete. Forwarded, it would let a client turn the
        # connection into an HTTP/2 tunnel past our routing (h2c smuggling): the token is dropped,
        # with HTTP2-Settings, and the request goes on as plain HTTP/1.1 (as Envoy does).
        out = [h for h in out if h[0] != b"http2-settings"]
        upgrade_value = b", ".join(t for t in (p.strip() for p in upgrade_value.split(b","))
                                   if t and t.lower() != b"h2c")
        upgrade = bool(upgrade_value)
    if upgrade:
        out.append((b"upgrade", upgrade_value))
        out.append((b"connection", b"upgrade"))
    keep_alive = wants_keep_alive(minor, tokens) and not upgrade
    return out, host, framing, keep_alive, expect_continue and framing.kind != NONE, upgrade


def classify_response(method: bytes, status: int, minor: int, raw: Headers):
    """One pass over a response's fields → (forwarded fields, framing, upstream keep-alive,
    content-length as received (for HEAD/304 pass-through), connection tokens)."""
    out: Headers = []
    cl: list[bytes] | None = None
    te: list[bytes] | None = None
    tokens: frozenset[bytes] | set[bytes] | None = None
    special = _RESPONSE_SPECIAL
    for pair in raw:
        name = pair[0]
        if name not in special:
            out.append(pair)
        elif name == b"content-length":
            cl = [pair[1]] if cl is None else cl + [pair[1]]
        elif name == b"transfer-encoding":
            te = [pair[1]] if te is None else te + [pair[1]]
        elif name == b"connection":
            tokens = _add_tokens(tokens, pair[1])
        elif name == b"te" and pair[1].strip().lower() == b"trailers":
            out.append(pair)
    framing = _response_framing(method, status, te, cl)
    if tokens is None:
        keep = minor >= 1
    else:
        keep = b"close" not in tokens and (minor >= 1 or b"keep-alive" in tokens)  # wants_keep_alive
        if not tokens <= _PLAIN_CONNECTION_TOKENS:
            out = _drop_named(out, tokens)
    if framing.kind == CLOSE:
        keep = False
    return out, framing, keep, (cl[0] if cl else None), tokens or _NO_TOKENS


def _serialize_request_head_py(method: bytes, target: bytes, headers: Headers, framing: Framing,
                               authority: bytes | None = None, extra_fields: bytes = b"") -> bytes:
    """`authority`: written first as Host (so callers need not build a new header list for it);
    `extra_fields`: field lines already serialised ("name: value CRLF" each), written after `headers`.
    The pure twin of native/h1_write.c (see `serialize_request_head` below)."""
    if authority is None:
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    else:
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if extra_fields:
        parts.append(extra_fields)
    if framing.kind == LENGTH:
        parts.append(b"content-length: %d\r\n\r\n" % framing.length)
    elif framing.kind == CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


# serialize_request_head: the C writer (native/h1_write.c, byte for byte the function above, which
# it hands any uncommon argument to) unless TRIOMESH_PURE_PARSER=1 or it was not built; about 2,500
# instructions less per proxied request. WRITER_IMPLEMENTATION says which ("native" or "pure").
serialize_request_head = _serialize_request_head_py
WRITER_IMPLEMENTATION = "pure"
if os.environ.get("TRIOMESH_PURE_PARSER", "") in ("", "0"):
    try:
        from proxy.l7 import _h1_write
    except ImportError:  # not built (no C compiler at install time)
        pass
    else:
        assert (_h1_write.LENGTH, _h1_write.CHUNKED) == (LENGTH, CHUNKED)
        _h1_write.configure(_serialize_request_head_py)
        serialize_request_head = _h1_write.serialize_request_head
        WRITER_IMPLEMENTATION = "native"


def serialize_response_head(status: int, reason: bytes, headers: Headers, framing: Framing,
                            *, close: bool, content_length_header: bytes | None = None,
                            head_request: bool = False) -> bytes:
    """`content_length_header`: for HEAD/304 replies, the upstream's Content-Length passed on as is;
    `head_request`: the reply to a HEAD, where no length is invented when the upstream gave none."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if framing.kind == LENGTH:
        parts.append(b"content-length: %d\r\n" % framing.length)
    elif framing.kind == CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif content_length_header is not None:
        parts.append(b"content-length: %s\r\n" % content_length_header)
    elif framing.kind == NONE and not head_request and status >= 200 and status not in (204, 304):
        parts.append(b"content-length: 0\r\n")  # framing NONE: an empty body, said explicitly
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def serialize_plain_response_head(status: int, reason: bytes, fields: bytes, length: int, *, close: bool) -> bytes:
    """The head of a plain response (headparser.forward_response_head): its forwarded field block,
    then the length and Connection as serialize_response_head writes them (tests hold the two to
    the same bytes)."""
    return b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n%s\r\n" % (
        status, reason, fields, length, b"connection: close\r\n" if close else b"")


def status_has_body(status: int) -> bool:
    """RFC 9110 §6.4.1: 1xx, 204 and 304 responses never carry content (nor, for 204, a length)."""
    return status >= 200 and status not in (204, 304)


def chunk_header(size: int) -> bytes:
    return b"%x\r\n" % size


CHUNK_END = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class ChunkedDecoder:
    """Turns a chunked body in a buffer into data pieces (RFC 9112 §7.1). Trailers are read,
    bounded and dropped, as Envoy does by default for HTTP/1.

    `decode(buf, pos, end)` consumes what it can of buf[pos:end] and returns
    `(pieces, new_pos)`; pieces are memoryviews into buf. `done` is set after the last chunk and
    its trailer section. `error_type` is the exception raised for malformed input (BadRequest
    downstream, UpstreamProtocolError upstream)."""

    __slots__ = ("remaining", "state", "done", "error_type")

    _SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)

    def __init__(self, error_type: type[Exception] = BadRequest) -> None:
        self.remaining = 0
        self.state = self._SIZE
        self.done = False
        self.error_type = error_type

    def decode(self, buf: bytes, pos: int, end: int) -> tuple[list[memoryview], int]:
        pieces: list[memoryview] = []
        while pos < end and not self.done:
            state = self.state
            if state == self._DATA:
                take = min(self.remaining, end - pos)
                pieces.append(memoryview(buf)[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = self._DATA_CRLF
            elif state == self._SIZE:
                try:
                    parsed = parse_chunk_header(buf, pos)
                except HeadParseError as e:
                    raise self.error_type(f"invalid chunk size line: {e}") from None
                if parsed is None:
                    if end - pos > 4096:
                        raise self.error_type("chunk size line too long")
                    break
                if parsed[0] - pos > 4097:  # the same verdict as when the line comes byte by byte
                    raise self.error_type("chunk size line too long")  # (all but its last byte buffered)
                pos, size = parsed
                if size == 0:
                    self.state = self._TRAILER
                else:
                    self.remaining = size
                    self.state = self._DATA
            elif state == self._DATA_CRLF:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise self.error_type("chunk data not followed by CRLF")
                pos += 2
                self.state = self._SIZE
            else:  # trailer section: field lines until an empty line, same rules as a head
                try:
                    parsed = parse_trailers(buf, pos)
                except HeadParseError as e:
                    raise self.error_type(f"malformed trailer section: {e}") from None
                if parsed is None:
                    if end - pos > MAX_TRAILER_BYTES:
                        raise self.error_type("trailer section too large")
                    break
                if parsed[0] - pos > MAX_TRAILER_BYTES:
                    # the same limit whether the section came in one read or many (found by fuzzing)
                    raise self.error_type("trailer section too large")
                pos = parsed[0]
                self.done = True
        return pieces, pos
