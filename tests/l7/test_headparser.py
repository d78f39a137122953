"""Head parser: hand-written cases for every rule, run on the native and the pure implementation."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from proxy.l7 import _headparser_py
from proxy.l7._headparser_common import CODES, HeadParseError

IMPLS = {"native": "proxy.l7._headparser_native", "pure": "proxy.l7._headparser_py"}


@pytest.fixture(params=sorted(IMPLS), scope="module")
def hp(request):
    # A failed import fails the native tests: the extension must be built by `pip install -e .`.
    return importlib.import_module(IMPLS[request.param])


BROWSER_HEAD = (
    b"GET /search?q=triomesh&lang=en HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=abc123; theme=dark\r\n"
    b"\r\n"
)

RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"


def error(fn, *args, **kwargs) -> HeadParseError:
    with pytest.raises(HeadParseError) as info:
        fn(*args, **kwargs)
    return info.value


# --- accepted heads -------------------------------------------------------------------------------


def test_browser_request(hp):
    end, method, target, minor, headers = hp.parse_request_head(BROWSER_HEAD)
    assert end == len(BROWSER_HEAD)
    assert (method, target, minor) == (b"GET", b"/search?q=triomesh&lang=en", 1)
    assert headers[0] == (b"host", b"www.example.com")
    assert headers[-1] == (b"cookie", b"session=abc123; theme=dark")
    assert [n for n, _ in headers] == [
        b"host", b"user-agent", b"accept", b"accept-language", b"accept-encoding", b"connection", b"cookie"
    ]
    assert all(type(n) is bytes and type(v) is bytes for n, v in headers)


def test_request_without_headers_http10(hp):
    assert hp.parse_request_head(b"GET / HTTP/1.0\r\n\r\n") == (18, b"GET", b"/", 0, [])


def test_values_are_ows_stripped_inner_whitespace_kept(hp):
    head = b"GET / HTTP/1.1\r\nA:\t x  y \t\r\nB:\r\nC:   \r\nD:z\r\n\r\n"
    assert hp.parse_request_head(head)[4] == [(b"a", b"x  y"), (b"b", b""), (b"c", b""), (b"d", b"z")]


def test_names_lowercased_values_case_kept(hp):
    head = b"GET / HTTP/1.1\r\nX-MiXeD-Case: VaLuE\r\n\r\n"
    assert hp.parse_request_head(head)[4] == [(b"x-mixed-case", b"VaLuE")]


def test_obs_text_in_value_and_all_tchars_in_names(hp):
    tchars = b"!#$%&'*+-.^_`|~09azAZ"
    head = b"GET / HTTP/1.1\r\n" + tchars + b": caf\xc3\xa9 \x80\xff\r\n\r\n"
    assert hp.parse_request_head(head)[4] == [(tchars.lower(), b"caf\xc3\xa9 \x80\xff")]


def test_absolute_and_authority_and_asterisk_targets(hp):
    for target in (b"http://example.com:8080/a?b#c", b"example.com:443", b"*", b"/%7E~!$&'()*+,;=:@"):
        head = b"OPTIONS " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
        assert hp.parse_request_head(head)[2] == target


def test_leading_empty_lines_are_skipped(hp):
    head = b"\r\n\r\n" + BROWSER_HEAD
    end, method, *_ = hp.parse_request_head(head)
    assert (end, method) == (len(head), b"GET")
    assert hp.parse_request_head(b"\r\n\r\n") is None


def test_start_offset_and_trailing_bytes(hp):
    buf = b"junk" + BROWSER_HEAD + b"POST / HTTP/1.1\r\n"
    parsed = hp.parse_request_head(buf, 4)
    assert parsed[0] == 4 + len(BROWSER_HEAD)
    assert hp.parse_request_head(buf, parsed[0]) is None  # the pipelined next head is incomplete
    assert hp.parse_request_head(buf, len(buf) + 10) is None


def test_bytearray_input_gives_bytes(hp):
    buf = bytearray(b"xx" + BROWSER_HEAD)
    end, method, target, minor, headers = hp.parse_request_head(buf, 2)
    assert end == len(buf)
    assert type(method) is bytes and type(target) is bytes
    assert all(type(n) is bytes and type(v) is bytes for n, v in headers)
    assert hp.parse_request_head(bytes(buf), 2) == (end, method, target, minor, headers)
    buf += b"more"  # the parser kept no export of the buffer: it can still grow
    assert hp.parse_response_head(bytearray(RESPONSE_HEAD))[2] == 200


def test_arguments_by_position_or_name_and_bad_arguments(hp):
    """The native calls parse their own arguments (a C extension): the same forms as the pure
    functions, and the same TypeError/OverflowError for bad ones."""
    buf = b"xx" + BROWSER_HEAD
    parsed = hp.parse_request_head(buf, 2, 100)
    assert hp.parse_request_head(buf, start=2) == hp.parse_request_head(buf, 2, max_headers=100) == parsed
    assert hp.parse_request_head(buf, max_headers=100, start=2) == parsed
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Take: a\r\n\r\n"
    forwarded = hp.forward_response_head(response, 0, 100, b"x-take")
    assert forwarded[-1] == b"a"
    assert hp.forward_response_head(response, take=b"x-take") == forwarded
    assert hp.forward_response_head(response, max_headers=100, start=0, take=b"x-take") == forwarded
    for call in (lambda: hp.parse_request_head(), lambda: hp.parse_request_head(buf, 0, 100, 1),
                 lambda: hp.parse_request_head(buf, begin=0), lambda: hp.parse_request_head(buf, 0, start=0),
                 lambda: hp.forward_response_head(response, 0, 100, b"", 1),
                 lambda: hp.forward_response_head(response, takes=b"")):
        with pytest.raises(TypeError):
            call()


def test_an_error_in_a_bytearray_releases_the_buffer(hp):
    head = bytearray(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    e = error(hp.parse_request_head, head)
    assert (e.code, e.offset) == ("SPACE_BEFORE_COLON", head.index(b" :"))
    head += b"more"  # no buffer export was left behind by the error path


def test_exactly_max_headers_is_fine(hp):
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(5)) + b"\r\n"
    assert len(hp.parse_request_head(head, max_headers=5)[4]) == 5
    assert len(hp.parse_request_head(head, max_headers=500)[4]) == 5
    assert hp.parse_request_head(b"GET / HTTP/1.1\r\n\r\n", max_headers=0)[4] == []


def test_many_headers_and_long_head(hp):
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-Header-%d: %s\r\n" % (i, b"v" * 500) for i in range(300)) + b"\r\n"
    parsed = hp.parse_request_head(head, max_headers=300)
    assert parsed[0] == len(head) and len(parsed[4]) == 300 and parsed[4][299] == (b"x-header-299", b"v" * 500)


def test_response(hp):
    assert hp.parse_response_head(RESPONSE_HEAD + b"hello") == (
        len(RESPONSE_HEAD), 1, 200, b"OK", [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    )


@pytest.mark.parametrize(
    "line, status, reason",
    [
        (b"HTTP/1.1 204 No Content", 204, b"No Content"),
        (b"HTTP/1.1 200", 200, b""),  # SP and reason left out: real servers do this
        (b"HTTP/1.1 200 ", 200, b""),
        (b"HTTP/1.0 404 Not\tFound \xe2\x9c\x97 ", 404, b"Not\tFound \xe2\x9c\x97 "),  # reason kept raw
        (b"HTTP/1.1 100 Continue", 100, b"Continue"),
        (b"HTTP/1.1 599 x", 599, b"x"),
    ],
)
def test_status_lines(hp, line, status, reason):
    head = line + b"\r\n\r\n"
    assert hp.parse_response_head(head) == (len(head), int(line[7:8]), status, reason, [])


def test_trailers(hp):
    assert hp.parse_trailers(b"\r\n") == (2, [])
    assert hp.parse_trailers(b"xx\r\nrest", 2) == (4, [])
    assert hp.parse_trailers(b"Grpc-Status: 0\r\nX-T: a b \r\n\r\nnext") == (29, [(b"grpc-status", b"0"), (b"x-t", b"a b")])
    assert hp.parse_trailers(b"Grpc-Status: 0\r\n") is None
    assert error(hp.parse_trailers, b"A: b\r\n c\r\n\r\n").code == "OBS_FOLD"


@pytest.mark.parametrize(
    "line, size",
    [
        (b"0\r\n", 0),
        (b"1a\r\n", 26),
        (b"FFff\r\n", 0xFFFF),
        (b"000000000000000A\r\n", 10),  # 16 digits, leading zeros count
        (b"7fffffffffffffff\r\n", 2**63 - 1),
        (b"5;name\r\n", 5),
        (b"5;name=value\r\n", 5),
        (b'5;a="q \\" \\\\ x";b=c\r\n', 5),
        (b"5; a = b ;c ;d= \"\"\r\n", 5),  # BWS around ';' and '='
    ],
)
def test_chunk_sizes(hp, line, size):
    assert hp.parse_chunk_header(line + b"data") == (len(line), size)
    assert hp.parse_chunk_header(b"..." + line, 3) == (3 + len(line), size)
    assert hp.parse_chunk_header(bytearray(line)) == (len(line), size)


# --- rejected heads: each rule, its code and the offset of the offending byte ----------------------

REQUEST_ERRORS = [
    # (head, code, offset)
    (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "BARE_CR", 23),
    (b"GET / HTTP/1.1\r\rHost: a\r\n\r\n", "BARE_CR", 14),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n", "BARE_CR", 25),
    (b"\rGET / HTTP/1.1\r\n\r\n", "BARE_CR", 0),
    (b"GET / HTTP/1.1\nHost: a\n\n", "BARE_LF", 14),
    (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "BARE_LF", 23),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\n", "BARE_LF", 25),
    (b"\nGET / HTTP/1.1\r\n\r\n", "BARE_LF", 0),
    (b"G\x00T / HTTP/1.1\r\n\r\n", "NUL", 1),
    (b"GET /\x00 HTTP/1.1\r\n\r\n", "NUL", 5),
    (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", "NUL", 23),
    (b"GET / HTTP/1.1\r\nHo\x00st: a\r\n\r\n", "NUL", 18),
    (b"G@T / HTTP/1.1\r\n\r\n", "INVALID_METHOD", 1),
    (b" GET / HTTP/1.1\r\n\r\n", "INVALID_METHOD", 0),
    (b"GET\t/ HTTP/1.1\r\n\r\n", "INVALID_METHOD", 3),
    (b"GET\r\n\r\n", "INVALID_METHOD", 3),
    (b"G\xc3\x89T / HTTP/1.1\r\n\r\n", "INVALID_METHOD", 1),
    (b"GET  / HTTP/1.1\r\n\r\n", "INVALID_TARGET", 4),
    (b"GET /a\tb HTTP/1.1\r\n\r\n", "INVALID_TARGET", 6),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", "INVALID_TARGET", 8),
    (b"GET /\x7f HTTP/1.1\r\n\r\n", "INVALID_TARGET", 5),
    (b"GET /\r\n\r\n", "INVALID_TARGET", 5),  # HTTP/0.9 request line
    (b"GET / HTTP/2.0\r\n\r\n", "INVALID_VERSION", 11),
    (b"GET / http/1.1\r\n\r\n", "INVALID_VERSION", 6),
    (b"GET / HTTP/1.x\r\n\r\n", "INVALID_VERSION", 13),
    (b"GET / HTTP/1.10\r\n\r\n", "INVALID_VERSION", 14),
    (b"GET / HTTP/1.1 \r\n\r\n", "INVALID_VERSION", 14),
    (b"GET / HTTP/1\r\n\r\n", "INVALID_VERSION", 12),
    (b"GET / HTTP/1.1\r\nHo@st: a\r\n\r\n", "INVALID_TOKEN", 18),
    (b"GET / HTTP/1.1\r\n: a\r\n\r\n", "INVALID_TOKEN", 16),
    (b"GET / HTTP/1.1\r\nHost a: b\r\n\r\n", "INVALID_TOKEN", 20),  # space inside the name
    (b"GET / HTTP/1.1\r\nH\xc3\xb6st: a\r\n\r\n", "INVALID_TOKEN", 17),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "SPACE_BEFORE_COLON", 20),
    (b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", "SPACE_BEFORE_COLON", 20),
    (b"GET / HTTP/1.1\r\nHost \t :a\r\n\r\n", "SPACE_BEFORE_COLON", 20),
    (b"GET / HTTP/1.1\r\nHost\r\n\r\n", "MISSING_COLON", 20),
    (b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n", "OBS_FOLD", 25),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\tb\r\n\r\n", "OBS_FOLD", 25),
    (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "OBS_FOLD", 16),  # whitespace before the first field
    (b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", "INVALID_HEADER_VALUE", 23),
    (b"GET / HTTP/1.1\r\nHost: a\x7f\r\n\r\n", "INVALID_HEADER_VALUE", 23),
    (b"GET / HTTP/1.1\r\nHost: a\x0bb\r\n\r\n", "INVALID_HEADER_VALUE", 23),
    (b"GET / HTTP/1.1\r\nHost: \x1b[31m\r\n\r\n", "INVALID_HEADER_VALUE", 22),
]


@pytest.mark.parametrize("head, code, offset", REQUEST_ERRORS)
def test_request_errors(hp, head, code, offset):
    e = error(hp.parse_request_head, head)
    assert (e.code, e.offset, e.status) == (code, offset, 400)
    assert f"offset {offset}" in str(e) and CODES[code][1] in str(e)
    # the same, with the head further into a bytearray
    e2 = error(hp.parse_request_head, bytearray(b"\r\n\r\n" + head), 2)
    assert (e2.code, e2.offset) == (code, offset + 4)


def test_errors_are_reported_before_the_head_is_complete(hp):
    # Garbage is refused as soon as the offending byte arrives (no waiting for a blank line).
    assert error(hp.parse_request_head, b"\x16\x03\x01\x02\x00\x01\x00").code == "INVALID_METHOD"
    assert error(hp.parse_request_head, b"GET / HTTP/1.1\r\nHost : x").code == "SPACE_BEFORE_COLON"
    assert error(hp.parse_request_head, b"GET / HTTP/1.1\r\nA: b\r\n c").code == "OBS_FOLD"
    assert error(hp.parse_response_head, b"SSH-2.0-OpenSSH").code == "INVALID_VERSION"
    assert error(hp.parse_chunk_header, b"zz").code == "INVALID_CHUNK_SIZE"


def test_too_many_headers(hp):
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(6)) + b"\r\n"
    e = error(hp.parse_request_head, head, max_headers=5)
    assert (e.code, e.status) == ("TOO_MANY_HEADERS", 431)
    assert e.offset == head.index(b"H5:")
    assert "more than 5 header fields" in str(e)
    # reported as soon as the first byte of the extra line is there
    assert error(hp.parse_request_head, head[: e.offset + 1], max_headers=5).code == "TOO_MANY_HEADERS"
    assert hp.parse_request_head(head[: e.offset], max_headers=5) is None
    assert error(hp.parse_response_head, b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", max_headers=0).code == "TOO_MANY_HEADERS"
    assert error(hp.parse_trailers, b"A: b\r\nC: d\r\n\r\n", max_headers=1).code == "TOO_MANY_HEADERS"


RESPONSE_ERRORS = [
    (b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n", "BARE_CR", 21),
    (b"HTTP/1.1 200 OK\nA: b\n\n", "BARE_LF", 15),
    (b"HTTP/1.1 200 O\x00K\r\n\r\n", "NUL", 14),
    (b"HTTP/2 200 OK\r\n\r\n", "INVALID_VERSION", 5),
    (b"HTTP/1.1  200 OK\r\n\r\n", "INVALID_STATUS", 9),
    (b"HTTP/1.1 20 OK\r\n\r\n", "INVALID_STATUS", 11),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "INVALID_STATUS", 12),
    (b"HTTP/1.1 099 OK\r\n\r\n", "INVALID_STATUS", 9),
    (b"HTTP/1.1 600 OK\r\n\r\n", "INVALID_STATUS", 9),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "INVALID_STATUS", 10),
    (b"HTTP/1.1 200 O\x01K\r\n\r\n", "INVALID_REASON", 14),
    (b"HTTP/1.1 200 OK\x7f\r\n\r\n", "INVALID_REASON", 15),
    (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "INVALID_VERSION", 0),  # no empty lines before a status-line
    (b"HTTP/1.1 200 OK\r\nA : b\r\n\r\n", "SPACE_BEFORE_COLON", 18),
    (b"HTTP/1.1 200 OK\r\nA: b\r\n  c\r\n\r\n", "OBS_FOLD", 23),
    (b"HTTP/1.1 200 OK\r\nA\r\n\r\n", "MISSING_COLON", 18),
    (b"HTTP/1.1 200 OK\r\nA: \x02\r\n\r\n", "INVALID_HEADER_VALUE", 20),
    (b"HTTP/1.1 200 OK\r\n{A}: b\r\n\r\n", "INVALID_TOKEN", 17),
]


@pytest.mark.parametrize("head, code, offset", RESPONSE_ERRORS)
def test_response_errors(hp, head, code, offset):
    e = error(hp.parse_response_head, head)
    assert (e.code, e.offset) == (code, offset)


CHUNK_ERRORS = [
    (b"\r\n", "INVALID_CHUNK_SIZE", 0),
    (b"g\r\n", "INVALID_CHUNK_SIZE", 0),
    (b"-1\r\n", "INVALID_CHUNK_SIZE", 0),
    (b"0x1a\r\n", "INVALID_CHUNK_SIZE", 1),
    (b"1a \r\n", "INVALID_CHUNK_SIZE", 2),  # no whitespace after the size
    (b"1a\t;x\r\n", "INVALID_CHUNK_SIZE", 2),
    (b" 1a\r\n", "INVALID_CHUNK_SIZE", 0),
    (b"+1a\r\n", "INVALID_CHUNK_SIZE", 0),
    (b"1a\n", "BARE_LF", 2),
    (b"1a\rx", "BARE_CR", 2),
    (b"1\x00\r\n", "NUL", 1),
    (b"00000000000000001\r\n", "INVALID_CHUNK_SIZE", 16),  # 17 digits
    (b"8000000000000000\r\n", "INVALID_CHUNK_SIZE", 0),  # 2**63
    (b"ffffffffffffffff\r\n", "INVALID_CHUNK_SIZE", 0),
    (b"1;\r\n", "INVALID_CHUNK_EXT", 2),
    (b"1;=x\r\n", "INVALID_CHUNK_EXT", 2),
    (b"1;a=\r\n", "INVALID_CHUNK_EXT", 4),
    (b"1;a b\r\n", "INVALID_CHUNK_EXT", 3),
    (b"1;a \r\n", "INVALID_CHUNK_EXT", 3),  # BWS only before ';' or '='
    (b"1;a=b \r\n", "INVALID_CHUNK_EXT", 5),
    (b'1;a="b\r\n', "INVALID_CHUNK_EXT", 6),
    (b'1;a="b\x01"\r\n', "INVALID_CHUNK_EXT", 6),
    (b'1;a="\\\x01"\r\n', "INVALID_CHUNK_EXT", 6),
    (b"1;a=b\x00\r\n", "NUL", 5),
    (b"1;a=b\rc\r\n", "BARE_CR", 5),
    (b"1;a@b\r\n", "INVALID_CHUNK_EXT", 3),
]


@pytest.mark.parametrize("line, code, offset", CHUNK_ERRORS)
def test_chunk_errors(hp, line, code, offset):
    e = error(hp.parse_chunk_header, line)
    assert (e.code, e.offset, e.status) == (code, offset, 400)


def test_every_code_is_exercised():
    exercised = {c for _, c, _ in REQUEST_ERRORS + RESPONSE_ERRORS + CHUNK_ERRORS} | {"TOO_MANY_HEADERS"}
    assert exercised == set(CODES)


# --- incomplete input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, data",
    [
        ("parse_request_head", b"\r\n" + BROWSER_HEAD),
        ("parse_request_head", b"OPTIONS * HTTP/1.0\r\nA:\r\nB: \t\r\nC : x\r\n\r\n"[:20] + b"\r\n"),
        ("parse_response_head", RESPONSE_HEAD),
        ("parse_response_head", b"HTTP/1.1 200\r\nA:b\r\n\r\n"),
        ("parse_trailers", b"A: b\r\nCc:\r\n\r\n"),
        ("parse_chunk_header", b'1aB;x="y\\z";q=r\r\n'),
    ],
)
def test_every_split_point_is_incomplete(hp, fn, data):
    parse = getattr(hp, fn)
    full = parse(data)
    assert full is not None and full[0] == len(data)
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, cut
        assert parse(bytearray(b"..." + data[:cut]), 3) is None, cut
    assert parse(data + b"trailing") == full


def test_partial_lines_that_can_still_become_valid(hp):
    # "Host " could still be followed by ':' (-> SPACE_BEFORE_COLON) or not (-> INVALID_TOKEN)
    assert hp.parse_request_head(b"GET / HTTP/1.1\r\nHost \t") is None
    assert hp.parse_request_head(b"GET / HTTP/1.1\r\nHost\r") is None
    assert hp.parse_request_head(b"GET / HTTP/1.1\r") is None
    assert hp.parse_response_head(b"HTTP/1.1 99") is None  # the range is checked at the third digit
    assert error(hp.parse_response_head, b"HTTP/1.1 999").code == "INVALID_STATUS"
    assert hp.parse_chunk_header(b"7fffffffffffffff") is None
    assert error(hp.parse_chunk_header, b"fffffffffffffffff").code == "INVALID_CHUNK_SIZE"


# --- the pure parser's slow path is a full parser of its own ---------------------------------------


@pytest.mark.parametrize(
    "head",
    [BROWSER_HEAD, b"\r\n" + BROWSER_HEAD, b"GET / HTTP/1.1\r\nA:\t x \r\nB:\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"],
)
def test_pure_scanner_agrees_with_fast_path(head):
    assert _headparser_py._Scanner(head, 0, 100).request() == _headparser_py.parse_request_head(head)
    response = b"HTTP/1.1 404 Not Found\r\n" + head[head.index(b"\n", 2) + 1 :]
    assert _headparser_py._Scanner(response, 0, 100).response() == _headparser_py.parse_response_head(response)


# --- which implementation is in use -----------------------------------------------------------------


def test_default_import_is_native_unless_forced():
    from proxy.l7 import headparser

    if os.environ.get("TRIOMESH_PURE_PARSER", "") not in ("", "0"):
        assert headparser.IMPLEMENTATION == "pure"
    else:
        # Fails when the cffi extension was not built: `pip install -e .` must build it.
        assert headparser.IMPLEMENTATION == "native"
        assert headparser.parse_request_head.__module__ == "proxy.l7._headparser_capi"


def test_environment_variable_forces_pure():
    code = (
        "from proxy.l7 import headparser as h;"
        "print(h.IMPLEMENTATION, h.parse_request_head.__module__, h.parse_request_head(b'GET / HTTP/1.1\\r\\n\\r\\n')[1])"
    )
    env = dict(os.environ, TRIOMESH_PURE_PARSER="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pure", "proxy.l7._headparser_py", "b'GET'"]


def test_error_pickles_with_its_fields():
    import pickle

    e = pickle.loads(pickle.dumps(HeadParseError("NUL", 7, "NUL byte at offset 7")))
    assert (e.code, e.offset, e.status, str(e)) == ("NUL", 7, 400, "NUL byte at offset 7")
