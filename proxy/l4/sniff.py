"""Protocol detection from the first bytes a client sends: TLS (with SNI/ALPN), HTTP/2, HTTP/1.x, opaque.

Pure: bytes in, a `Detection` (or NEED_MORE) out; no sockets, no trio. The Trio driver that reads
the bytes, applies the timeout and replays them is sniff_stream.py.

Theory of operation
-------------------
`detect(data)` is called again with the whole buffer each time more bytes arrive. It answers
NEED_MORE while the bytes so far are a valid prefix of some protocol we recognise and not enough to
decide, and a `Detection` as soon as they are. The first byte picks the candidate:

* 0x16 (TLS handshake record): we read TLS records until the whole ClientHello handshake message is
  in hand (it may be split over several reads *and* over several records, RFC 8446 §5.1 allows
  handshake messages to be fragmented), then read `server_name` (RFC 6066 §3) and
  `application_layer_protocol_negotiation` (RFC 7301 §3.1) without terminating TLS. Anything that
  stops parsing as a ClientHello is provably not TLS we can route -> OPAQUE.
* b"PRI * HTTP/2.0..." : the HTTP/2 prior-knowledge connection preface (RFC 9113 §3.4).
* an HTTP token followed by SP: a candidate HTTP/1.x request line (RFC 9112 §3); decided when the
  first line ends with " HTTP/1.<digit>".
* anything else -> OPAQUE at once.

`at_eof=True` (the peer closed, or the driver's timeout fired) turns every NEED_MORE into a best
guess: a known method followed by SP is HTTP/1, anything else OPAQUE.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

# --- results --------------------------------------------------------------------------------------


class Protocol(enum.Enum):
    TLS = "tls"
    HTTP2 = "h2"
    HTTP1 = "http/1"
    OPAQUE = "opaque"


@dataclass(frozen=True, slots=True)
class Detection:
    protocol: Protocol
    sni: str | None = None  # TLS server_name (host_name), lowercase ASCII
    alpn: tuple[str, ...] = ()  # TLS ALPN protocol ids in client preference order
    http_method: bytes | None = None  # HTTP/1 request method token
    http_version: bytes | None = None  # HTTP/1 version, b"1.1" / b"1.0"


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __bool__(self) -> bool:
        return False


NEED_MORE: Final = _NeedMore()

OPAQUE: Final = Detection(Protocol.OPAQUE)
HTTP2: Final = Detection(Protocol.HTTP2)

# --- limits ---------------------------------------------------------------------------------------

# A ClientHello bigger than this is still TLS, but we stop buffering and route it without SNI.
MAX_CLIENT_HELLO_BYTES: Final = 64 * 1024
# Request lines longer than this are decided by the method alone (see _guess_http1).
MAX_REQUEST_LINE_BYTES: Final = 8 * 1024
MAX_METHOD_BYTES: Final = 32
# Never worth reading more than this to decide (a max ClientHello spread over small records).
MAX_SNIFF_BYTES: Final = MAX_CLIENT_HELLO_BYTES + 5 * (MAX_CLIENT_HELLO_BYTES // 512 + 1)

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

KNOWN_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"}
)

# RFC 9110 §5.6.2 tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9112 §3: method SP request-target SP HTTP-version; the target has no SP or CTL
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) [^\x00-\x20\x7f]+ HTTP/(1\.[0-9])\r?")


def detect(data: bytes, *, at_eof: bool = False) -> Detection | _NeedMore:
    """Classify the first bytes of a connection; NEED_MORE until they decide (never when at_eof)."""
    if not data:
        return OPAQUE if at_eof else NEED_MORE
    first = data[0]
    if first == 0x16:
        hello = parse_client_hello(data)
        if hello is NEED_MORE:
            return OPAQUE if at_eof else NEED_MORE
        if hello is None:
            return OPAQUE
        return Detection(Protocol.TLS, sni=hello.sni, alpn=hello.alpn)
    if first == 0x50 and len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):  # b"P"
        if at_eof:
            return _guess_http1(data)
        return NEED_MORE
    if data.startswith(H2_PREFACE):
        return HTTP2
    return _detect_http1(data, at_eof)


# --- HTTP/1 ---------------------------------------------------------------------------------------


def _detect_http1(data: bytes, at_eof: bool) -> Detection | _NeedMore:
    token = _TOKEN.match(data)
    if token is None:
        return OPAQUE
    end = token.end()
    if end > MAX_METHOD_BYTES:
        return OPAQUE
    if end == len(data):
        return OPAQUE if at_eof else NEED_MORE
    if data[end] != 0x20:
        return OPAQUE
    newline = data.find(b"\n", end, MAX_REQUEST_LINE_BYTES + 1)
    if newline < 0:
        if at_eof or len(data) > MAX_REQUEST_LINE_BYTES:
            return _guess_http1(data)
        # the target may not contain CTLs: one already seen decides early (binary protocols); a CR
        # at the very end is the line's own CR with its LF still in flight
        if _has_ctl(data, end + 1, len(data) - 1 if data.endswith(b"\r") else len(data)):
            return OPAQUE
        return NEED_MORE
    line = _REQUEST_LINE.fullmatch(data, 0, newline)
    if line is None:
        return OPAQUE
    return Detection(Protocol.HTTP1, http_method=line.group(1), http_version=line.group(2))


_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _has_ctl(data: bytes, start: int, end: int) -> bool:
    return _CTL.search(data, start, end) is not None


def _guess_http1(data: bytes) -> Detection:
    """Out of bytes or patience: a well-known method and SP is HTTP/1 enough; anything else is not."""
    method, sp, _ = data.partition(b" ")
    if sp and method in KNOWN_METHODS:
        return Detection(Protocol.HTTP1, http_method=method)
    return OPAQUE


# --- TLS ClientHello ------------------------------------------------------------------------------

_RECORD_HANDSHAKE: Final = 22
_HANDSHAKE_CLIENT_HELLO: Final = 1
_MAX_RECORD_PLAINTEXT: Final = 1 << 14  # RFC 8446 §5.1
_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_SNI_HOST_NAME: Final = 0


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]


def parse_client_hello(data: bytes) -> ClientHello | _NeedMore | None:
    """The SNI and ALPN of a ClientHello at the start of `data`; NEED_MORE if incomplete; None if
    these bytes are not a (well-formed) TLS ClientHello."""
    body = _client_hello_body(data)
    if body is NEED_MORE or body is None:
        return body
    if isinstance(body, ClientHello):  # too large to buffer: TLS, but unnamed
        return body
    try:
        return _parse_client_hello_body(body)
    except _Malformed:
        return None


def _client_hello_body(data: bytes) -> bytes | ClientHello | _NeedMore | None:
    """Reassemble the ClientHello handshake message body from one or more handshake records."""
    handshake = bytearray()
    pos = 0
    while True:
        header = data[pos : pos + 5]
        # check what we have of the record header even when it is partial: decide early
        if len(header) >= 1 and header[0] != _RECORD_HANDSHAKE:
            return None
        if len(header) >= 2 and header[1] != 3:
            return None
        if len(header) >= 3 and header[2] > 4:
            return None
        if len(header) < 5:
            return NEED_MORE
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _MAX_RECORD_PLAINTEXT:
            return None
        fragment = data[pos + 5 : pos + 5 + length]
        handshake += fragment
        if len(handshake) >= 1 and handshake[0] != _HANDSHAKE_CLIENT_HELLO:
            return None
        if len(handshake) >= 4:
            hello_len = int.from_bytes(handshake[1:4], "big")
            if hello_len > MAX_CLIENT_HELLO_BYTES:
                return ClientHello(sni=None, alpn=())
            if len(handshake) >= 4 + hello_len:
                return bytes(handshake[4 : 4 + hello_len])
        if len(fragment) < length:
            return NEED_MORE
        pos += 5 + length


class _Malformed(Exception):
    pass


def _vector_end(body: bytes, pos: int, end: int) -> int:
    """Where the vector with a 2-byte length at `pos` ends (RFC 8446 §3.4); it must end by `end`."""
    if pos + 2 > end:
        raise _Malformed
    stop = pos + 2 + ((body[pos] << 8) | body[pos + 1])
    if stop > end:
        raise _Malformed
    return stop


# The ClientHello is walked with plain offsets into its bytes, every length checked against the end
# of the vector that holds it (running off it means malformed): every new TLS connection of a
# sidecar's inbound comes through here, and a client sends a dozen or more extensions.

def _parse_client_hello_body(body: bytes) -> ClientHello:
    # RFC 8446 §4.1.2 (same layout as TLS 1.2, RFC 5246 §7.4.1.2): legacy_version (2 bytes, major
    # 3), random (32), legacy_session_id<0..32>, cipher_suites<2..2^16-2>,
    # legacy_compression_methods<1..2^8-1>, extensions<8..2^16-1> (optional before TLS 1.3)
    end = len(body)
    if end < 35 or body[0] != 3 or body[34] > 32:
        raise _Malformed
    pos = 35 + body[34]
    suites_end = _vector_end(body, pos, end)
    suites = suites_end - pos - 2
    if suites < 2 or suites % 2:
        raise _Malformed
    pos = suites_end
    if pos >= end or not body[pos]:  # compression methods: at least "null"
        raise _Malformed
    pos += 1 + body[pos]
    if pos > end:
        raise _Malformed
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if pos == end:
        return ClientHello(sni=None, alpn=())
    if _vector_end(body, pos, end) != end:
        raise _Malformed
    pos += 2
    while pos < end:
        start = pos + 4  # type (2 bytes), length (2 bytes), then its data
        if start > end:
            raise _Malformed
        ext_type = (body[pos] << 8) | body[pos + 1]
        pos = start + ((body[pos + 2] << 8) | body[pos + 3])
        if pos > end:
            raise _Malformed
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(body, start, pos)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(body, start, pos)
    return ClientHello(sni=sni, alpn=alpn)


def _parse_server_name(body: bytes, pos: int, end: int) -> str | None:
    # RFC 6066 §3: server_name_list<1..2^16-1> of (name_type (1 byte), HostName<1..2^16-1>)
    stop = _vector_end(body, pos, end)
    pos += 2
    while pos < stop:
        if pos + 3 > stop:
            raise _Malformed
        name_type = body[pos]
        start = pos + 3
        pos = start + ((body[pos + 1] << 8) | body[pos + 2])
        if pos > stop:
            raise _Malformed
        if name_type == _SNI_HOST_NAME:
            raw = body[start:pos]
            if not raw or not raw.isascii():
                raise _Malformed
            return raw.decode("ascii").lower().rstrip(".")
    return None


def _parse_alpn(body: bytes, pos: int, end: int) -> tuple[str, ...]:
    # RFC 7301 §3.1: ProtocolName<1..2^8-1> protocol_name_list<2..2^16-1>
    stop = _vector_end(body, pos, end)
    pos += 2
    out: list[str] = []
    while pos < stop:
        start = pos + 1
        pos = start + body[pos]
        if pos > stop or pos == start:  # overrunning, or empty: RFC 7301 allows no empty names
            raise _Malformed
        out.append(body[start:pos].decode("latin-1"))
    return tuple(out)
