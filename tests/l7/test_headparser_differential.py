"""Head parser differentials: native vs pure (identical results, codes and offsets) and both vs h11.

h11 is the oracle: where h11 accepts a head, ours accept it and agree on every field; where h11
rejects it, ours reject it too. Ours are deliberately stricter than h11 in a few documented places
(`stricter_than_h11` below); each such disagreement must be one of those, checked at the byte the
error points at.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.l7 import _headparser_native as native
from proxy.l7 import _headparser_py as pure
from proxy.l7._headparser_common import HeadParseError

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = bytes(range(0x21, 0x7F))
VALUE_CHARS = VCHAR + b"  \t\x80\xc3\xa9\xff"
# Bytes that break rules when dropped into a head.
NASTY = b"\x00\r\n \t:\x01\x08\x0b\x0c\x1f\x7f\x80\xff\"@;=/\\"
SEMANTIC_NAMES = {b"host", b"content-length", b"transfer-encoding"}
H11_LENIENT_CTLS = set(range(0x01, 0x09)) | set(range(0x0E, 0x20)) | {0x7F}  # h11's [^\x00\s] allows them

SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chars(alphabet: bytes, min_size: int, max_size: int):
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


@st.composite
def mutated(draw, head: bytes) -> bytes:
    """Up to three single-byte insertions, replacements or deletions of nasty bytes."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(head)))
        byte = bytes([draw(st.sampled_from(NASTY))])
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        if op == "insert":
            head = head[:at] + byte + head[at:]
        elif op == "replace":
            head = head[:at] + byte + head[at + 1 :]
        else:
            head = head[:at] + head[at + 1 :]
    return head


@st.composite
def field_lines(draw) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(chars(TCHAR, 1, 12))
        if name.lower() in SEMANTIC_NAMES:
            name = b"x-" + name
        sep = draw(st.sampled_from([b":", b": ", b":\t", b":  ", b": \t "]))
        value = draw(chars(VALUE_CHARS, 0, 30))
        lines.append(name + sep + value)
        if draw(st.integers(0, 15)) == 0:  # an obs-fold continuation line
            lines.append(draw(st.sampled_from([b" ", b"\t", b"  "])) + draw(chars(VALUE_CHARS, 1, 10)))
    return lines


@st.composite
def request_heads(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"OPTIONS", b"PATCH"]) | chars(TCHAR, 1, 8))
    target = draw(st.sampled_from([b"/", b"*", b"http://a.example/x?y", b"a.example:443"]) | chars(VCHAR, 1, 30))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.9", b"HTTP/2.0", b"HTTP/0.9"]))
    lines = draw(field_lines())
    lines.insert(draw(st.integers(0, len(lines))), b"Host: " + draw(chars(VCHAR, 1, 20)))
    head = b"\r\n".join([method + b" " + target + b" " + version, *lines]) + b"\r\n\r\n"
    return draw(mutated(head))


@st.composite
def response_heads(draw) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.5", b"HTTP/2.0"]))
    status = draw(st.sampled_from([200, 204, 304, 404, 500, 103]) | st.integers(0, 999))
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Not Found"]) | chars(VALUE_CHARS, 0, 20).map(lambda r: b" " + r))
    lines = draw(field_lines())
    head = b"\r\n".join([version + b" %03d" % status + reason, *lines]) + b"\r\n\r\n"
    return draw(mutated(head))


@st.composite
def chunk_lines(draw) -> bytes:
    size = draw(
        st.integers(0, 5000).map(lambda n: b"%x" % n)
        | chars(b"0123456789abcdefABCDEF", 1, 20)
    )
    exts = b""
    for _ in range(draw(st.integers(0, 3))):
        ws = draw(st.sampled_from([b"", b"", b" ", b"\t "]))
        name = draw(chars(TCHAR, 1, 6))
        value = draw(
            st.sampled_from([b"", b"", b"=1", b'="a b"', b'="q\\"x"', b" = v"])
            | chars(TCHAR, 1, 5).map(lambda v: b"=" + v)
        )
        exts += ws + b";" + ws + name + value
    return draw(mutated(size + exts + b"\r\n"))


# --- running the parsers --------------------------------------------------------------------------


def outcome(fn, *args):
    try:
        result = fn(*args)
    except HeadParseError as e:
        return ("error", e.code, e.offset, e.status, str(e))
    return ("incomplete",) if result is None else ("ok", result)


def ours(name: str, data: bytes, *args):
    """The outcome of native and pure, asserted identical (codes, offsets and messages included)."""
    n = outcome(getattr(native, name), data, *args)
    p = outcome(getattr(pure, name), data, *args)
    assert n == p, (data, n, p)
    if name != "parse_chunk_header":  # the pure slow path, on its own, is the same parser again
        scanner = pure._Scanner(data, args[0] if args else 0, args[1] if len(args) > 1 else 100)
        s = outcome(getattr(scanner, {"parse_request_head": "request", "parse_response_head": "response",
                                      "parse_trailers": "trailers"}[name]))
        assert s == n, (data, n, s)
    else:
        assert outcome(pure._Scanner(data, args[0] if args else 0, 0).chunk) == n
    return n


def h11_events(conn: h11.Connection, data: bytes):
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as e:
        return ("error", str(e))
    if event is h11.NEED_DATA:
        return ("incomplete",)
    return ("ok", event, len(data) - len(conn.trailing_data[0]))


def h11_semantic(message: str) -> bool:
    """h11 errors about message semantics, which are the codec's job, not the head parser's."""
    return any(word in message for word in ("Host", "Content-Length", "Transfer-Encoding", "_SWITCH_"))


def stricter_than_h11(data: bytes, code: str, offset: int) -> bool:
    """Is this rejection one of the places where we are deliberately stricter than h11?"""
    byte = data[offset]
    if code == "BARE_LF":  # h11 takes a bare LF as a line end (RFC 9112 2.2 MAY); we require CRLF
        return byte == 0x0A and data[offset - 1 : offset] != b"\r"
    if code == "OBS_FOLD":  # h11 unfolds obs-fold; RFC 9112 5.2 lets us reject it (and a proxy should)
        return byte in b" \t" and data[offset - 2 : offset] == b"\r\n"
    if code in ("INVALID_HEADER_VALUE", "INVALID_REASON"):  # h11 allows most CTLs; RFC 9110 5.5 does not
        return byte in H11_LENIENT_CTLS
    if code == "INVALID_VERSION":  # h11 takes any digit.digit; we only speak HTTP/1.x
        return data[offset - 5 : offset] == b"HTTP/" and byte in b"023456789"
    if code == "INVALID_STATUS":  # h11 allows 600..999; RFC 9110 15 says 100..599
        return data[offset : offset + 3].isdigit() and int(data[offset : offset + 3]) >= 600
    return False


def check_against_h11(data: bytes, mine, theirs, compare) -> None:
    if theirs[0] == "ok":
        if mine[0] == "ok":
            compare(mine[1], theirs[1], theirs[2])
        else:
            assert mine[0] == "error", (data, mine, theirs)
            assert stricter_than_h11(data, mine[1], mine[2]), (data, mine, theirs)
    elif theirs[0] == "error":
        if not h11_semantic(theirs[1]):
            assert mine[0] == "error", (data, mine, theirs)
    else:  # h11 wants more data: we want more too, or we already saw an error
        assert mine[0] != "ok", (data, mine, theirs)


# --- requests -------------------------------------------------------------------------------------


def compare_request(mine, event, consumed):
    end, method, target, minor, headers = mine
    assert isinstance(event, h11.Request)
    assert end == consumed
    assert (method, target, b"1.%d" % minor) == (event.method, event.target, event.http_version)
    assert headers == list(event.headers)


@SETTINGS
@given(request_heads())
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n")
@example(b"GET / HTTP/1.1\nHost: a\n\n")
@example(b"GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n")
@example(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n")
def test_request_heads_vs_h11(data):
    mine = ours("parse_request_head", data)
    # RFC 9112 2.2 lets a server skip empty lines before a request-line; h11 does not, so it gets
    # the head without them and we check that the rest agrees.
    skipped = 0
    while data.startswith(b"\r\n", skipped):
        skipped += 2
    theirs = h11_events(h11.Connection(h11.SERVER), data[skipped:])
    if theirs[0] == "ok":
        theirs = ("ok", theirs[1], theirs[2] + skipped)
    check_against_h11(data, mine, theirs, compare_request)


# --- responses ------------------------------------------------------------------------------------


def h11_client_waiting_for_response() -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "example")]))
    conn.send(h11.EndOfMessage())
    return conn


def compare_response(mine, event, consumed):
    end, minor, status, reason, headers = mine
    assert isinstance(event, (h11.Response, h11.InformationalResponse))
    assert end == consumed
    assert (b"1.%d" % minor, status, reason) == (event.http_version, event.status_code, event.reason)
    assert headers == list(event.headers)


@SETTINGS
@given(response_heads())
@example(b"HTTP/1.1 200\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nA: b\r\n\tc\r\n\r\n")
@example(b"HTTP/1.1 700 Odd\r\n\r\n")
@example(b"HTTP/1.1 200 O\x01K\r\n\r\n")
@example(b"HTTP/1.1 101 OK\r\n\r\n")  # h11: 101 without an Upgrade request is a state error
def test_response_heads_vs_h11(data):
    mine = ours("parse_response_head", data)
    theirs = h11_events(h11_client_waiting_for_response(), data)
    check_against_h11(data, mine, theirs, compare_response)


# --- chunk sizes ----------------------------------------------------------------------------------

CHUNKED_REQUEST = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def h11_chunk(line: bytes, size_hint: int | None):
    """h11's verdict on one chunk-size line: ("ok", size or None), ("error", msg) or ("incomplete",)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(CHUNKED_REQUEST)
    assert isinstance(conn.next_event(), h11.Request)
    # Follow the line with the chunk's data (when small enough to send) and the last chunk, so that
    # h11's reading of the size shows in the Data events it produces.
    body = b"x" * size_hint + b"\r\n0\r\n\r\n" if size_hint is not None and size_hint <= 5000 else b"x"
    conn.receive_data(line + body)
    total = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return ("ok", None) if total else ("incomplete",)
            if isinstance(event, h11.Data):
                total += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return ("ok", total)
    except h11.RemoteProtocolError as e:
        return ("ok", None) if total else ("error", str(e))


def chunk_stricter_than_h11(line: bytes, code: str, offset: int) -> bool:
    ext_at = line.find(b";")
    if code in ("INVALID_CHUNK_EXT", "NUL", "BARE_CR") and 0 <= ext_at < offset:
        return True  # h11 takes any bytes after ';' as extensions; we check RFC 9112 7.1.1
    if code == "INVALID_CHUNK_SIZE":
        digits = len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))
        if digits > 16 or (digits and int(line[:digits], 16) >= 2**63):
            return True  # h11 takes 20 digits, and any size
        return line[offset : offset + 1] in (b" ", b"\t")  # h11 allows whitespace before the CRLF
    return False


@SETTINGS
@given(chunk_lines())
@example(b"1a\r\n")
@example(b"0\r\n")
@example(b"1a \r\n")
@example(b"1a;x \r\n")
@example(b"1a;\x00\r\n")
@example(b"ffffffffffffffffffff\r\n")
def test_chunk_sizes_vs_h11(line):
    mine = ours("parse_chunk_header", line)
    if mine[0] == "ok":  # h11 gets just the line (a mutation may have put a CRLF early)
        theirs = h11_chunk(line[: mine[1][0]], mine[1][1])
    else:
        theirs = h11_chunk(line, None)
    if theirs[0] == "ok":
        if mine[0] == "ok":
            assert line[mine[1][0] - 2 : mine[1][0]] == b"\r\n"
            assert theirs[1] in (None, mine[1][1])
        else:
            assert mine[0] == "error" and chunk_stricter_than_h11(line, mine[1], mine[2]), (line, mine, theirs)
    elif theirs[0] == "error":
        assert mine[0] == "error", (line, mine, theirs)
    else:
        assert mine[0] != "ok", (line, mine, theirs)


# --- native vs pure on anything -------------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300) | st.lists(st.sampled_from([b"\r\n", b"GET / HTTP/1.1", b"HTTP/1.1 200 OK", b"A: b", b" ", b":", b"\r", b"\n", b"\x00", b"1a;x=y"]), max_size=12).map(b"".join))
def test_native_equals_pure_on_arbitrary_bytes(data):
    for name in ("parse_request_head", "parse_response_head", "parse_trailers", "parse_chunk_header"):
        ours(name, data)
    ours("parse_request_head", data, 1, 3)
    ours("parse_response_head", data, 0, 1)


@settings(max_examples=200, deadline=None)
@given(st.one_of(request_heads(), response_heads(), chunk_lines()), st.integers(0, 3))
def test_native_equals_pure_on_every_prefix(data, max_headers):
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        ours("parse_request_head", prefix, 0, max_headers)
        ours("parse_response_head", prefix, 0, max_headers)
        ours("parse_trailers", prefix, 0, max_headers)
        ours("parse_chunk_header", prefix)


@pytest.mark.parametrize("name", ["parse_request_head", "parse_response_head", "parse_trailers"])
def test_valid_heads_are_incomplete_at_every_prefix(name):
    # a generated example is not needed: build one valid head per kind with every field shape
    head = {
        "parse_request_head": b"\r\nPUT /x HTTP/1.1\r\nA:\r\nB: c \t\r\nD:e f\r\n\r\n",
        "parse_response_head": b"HTTP/1.0 301 Moved\r\nLocation: /y\r\nA:\r\n\r\n",
        "parse_trailers": b"A: b\r\nC:\r\n\r\n",
    }[name]
    assert ours(name, head)[0] == "ok"
    for cut in range(len(head)):
        assert ours(name, head[:cut]) == ("incomplete",)
