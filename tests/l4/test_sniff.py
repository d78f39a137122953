"""sniff.detect on real bytes: OpenSSL ClientHellos, the HTTP/2 preface, HTTP/1 request lines, others."""

from __future__ import annotations

import ssl

import pytest

from proxy.l4 import sniff
from proxy.l4.sniff import NEED_MORE, Detection, Protocol, detect, parse_client_hello
from .tls_fixtures import client_hello, refragment

SNI = "reviews.default.svc.cluster.local"


@pytest.fixture(scope="module")
def hello() -> bytes:
    return client_hello(SNI, ["h2", "http/1.1"])


def test_client_hello_sni_and_alpn(hello: bytes) -> None:
    assert detect(hello) == Detection(Protocol.TLS, sni=SNI, alpn=("h2", "http/1.1"))


def test_client_hello_needs_more_at_every_split(hello: bytes) -> None:
    decided_early = [i for i in range(len(hello)) if detect(hello[:i]) is not NEED_MORE]
    assert decided_early == []
    # and the bytes after a split arrive as a second read: same answer as in one piece
    assert detect(hello[:7] + hello[7:]) == detect(hello)


def test_client_hello_split_over_records_and_reads(hello: bytes) -> None:
    fragmented = refragment(hello, 100)
    assert fragmented.count(b"\x16\x03") >= len(hello) // 100
    assert detect(fragmented) == detect(hello)
    assert all(detect(fragmented[:i]) is NEED_MORE for i in range(len(fragmented)))


def test_client_hello_partial_at_eof_is_opaque(hello: bytes) -> None:
    assert detect(hello[:50], at_eof=True).protocol is Protocol.OPAQUE


def test_client_hello_without_sni_or_alpn() -> None:
    assert detect(client_hello(None, None)) == Detection(Protocol.TLS, sni=None, alpn=())


def test_tls12_client_hello() -> None:
    hello = client_hello("api.example.com", ["http/1.1"], max_version=ssl.TLSVersion.TLSv1_2)
    assert detect(hello) == Detection(Protocol.TLS, sni="api.example.com", alpn=("http/1.1",))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h[:1] + b"\x09" + h[2:],  # record major version 9
        lambda h: h[:5] + b"\x02" + h[6:],  # handshake type ServerHello, not ClientHello
        lambda h: h[:3] + b"\x00\x00" + h[5:],  # zero-length handshake record
        lambda h: h[:3] + b"\x48\x01" + h[5:],  # record longer than 2^14
    ],
    ids=["record-version", "not-client-hello", "empty-record", "oversized-record"],
)
def test_not_tls_is_decided_without_waiting(hello: bytes, mutate) -> None:  # noqa: ANN001
    bad = mutate(hello)
    assert detect(bad[:6]).protocol is Protocol.OPAQUE


def test_malformed_client_hello_is_opaque(hello: bytes) -> None:
    # point the session id length past the end of the message: parses as nothing sensible
    body_start = 5 + 4 + 2 + 32
    bad = hello[:body_start] + b"\xff" + hello[body_start + 1 :]
    assert parse_client_hello(bad) is None
    assert detect(bad).protocol is Protocol.OPAQUE


def _hello_with_extensions(block: bytes) -> bytes:
    """A TLS 1.2-layout ClientHello record whose extensions are `block` as given (lengths and all)."""
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(block).to_bytes(2, "big") + block)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def _extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


SNI_EXTENSION = _extension(0, b"\x00\x0e\x00\x00\x0bexample.com")
ALPN_EXTENSION = _extension(16, b"\x00\x0c\x02h2\x08http/1.1")


def test_client_hello_extensions_walked_by_their_lengths() -> None:
    # unknown and empty extensions around the two read, in any order
    block = _extension(0xFF01, b"\x00") + ALPN_EXTENSION + _extension(23, b"") + SNI_EXTENSION + _extension(43, b"\x02\x03\x04")
    assert parse_client_hello(_hello_with_extensions(block)) == sniff.ClientHello("example.com", ("h2", "http/1.1"))
    assert parse_client_hello(_hello_with_extensions(b"")) == sniff.ClientHello(None, ())
    # a server_name list whose first entry is not a host name: the host name after it
    other_then_host = _extension(0, b"\x00\x0b\x01\x00\x01x\x00\x00\x04a.io")
    assert parse_client_hello(_hello_with_extensions(other_then_host)) == sniff.ClientHello("a.io", ())


@pytest.mark.parametrize("block", [
    SNI_EXTENSION + b"\x00\x10\x00",  # a partial extension header after the last extension
    SNI_EXTENSION[:-1],  # the last extension's data shorter than its length
    _extension(16, b"\x00\x05\x02h2") + SNI_EXTENSION,  # ALPN list longer than its extension
    _extension(0, b""),  # server_name without its list
    _extension(0, b"\x00\x05\x00\x00\x02\xc3\xa9"),  # a host name that is not ASCII
    _extension(0, b"\x00\x03\x00\x00\x00"),  # an empty host name
    _extension(16, b"\x00\x03\x00\x01a"),  # an empty protocol name before "a"
    _extension(16, b"\x00\x03\x05h2"),  # a protocol name running past its list
], ids=["partial-header", "short-data", "inner-overrun", "empty-sni", "sni-not-ascii", "sni-empty-name",
        "alpn-empty-name", "alpn-name-overrun"])
def test_client_hello_malformed_extensions_are_opaque(block: bytes) -> None:
    hello = _hello_with_extensions(block)
    assert parse_client_hello(hello) is None
    assert detect(hello).protocol is Protocol.OPAQUE


def test_huge_client_hello_is_tls_without_buffering() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (sniff.MAX_CLIENT_HELLO_BYTES + 1).to_bytes(3, "big")
    assert detect(header) == Detection(Protocol.TLS)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_h2_preface() -> None:
    assert detect(PREFACE) is sniff.HTTP2
    assert detect(PREFACE + SETTINGS_FRAME).protocol is Protocol.HTTP2
    assert all(detect(PREFACE[:i]) is NEED_MORE for i in range(1, len(PREFACE)))
    assert detect(PREFACE[:10], at_eof=True).protocol is Protocol.OPAQUE


@pytest.mark.parametrize(
    "request_line, method, version",
    [
        (b"GET / HTTP/1.1\r\n", b"GET", b"1.1"),
        (b"HEAD /index.html HTTP/1.0\r\n", b"HEAD", b"1.0"),
        (b"POST /api/v1/items?x=1 HTTP/1.1\r\n", b"POST", b"1.1"),
        (b"PUT /a HTTP/1.1\r\n", b"PUT", b"1.1"),
        (b"DELETE /a/b HTTP/1.1\r\n", b"DELETE", b"1.1"),
        (b"OPTIONS * HTTP/1.1\r\n", b"OPTIONS", b"1.1"),
        (b"PATCH /x HTTP/1.1\r\n", b"PATCH", b"1.1"),
        (b"CONNECT reviews:9080 HTTP/1.1\r\n", b"CONNECT", b"1.1"),
        (b"TRACE / HTTP/1.1\r\n", b"TRACE", b"1.1"),
        (b"PROPFIND /dav/ HTTP/1.1\r\n", b"PROPFIND", b"1.1"),  # extension methods are tokens too
        (b"GET http://example.com/ HTTP/1.1\n", b"GET", b"1.1"),  # absolute-form, bare LF
    ],
)
def test_http1_request_lines(request_line: bytes, method: bytes, version: bytes) -> None:
    data = request_line + b"Host: example.com\r\n\r\n"
    assert detect(data) == Detection(Protocol.HTTP1, http_method=method, http_version=version)
    newline = request_line.index(b"\n")
    # every cut before the LF, including one between CR and LF, waits for more
    assert [i for i in range(1, newline + 1) if detect(data[:i]) is not NEED_MORE] == []


def test_http1_partial_line_at_eof_is_guessed_from_the_method() -> None:
    assert detect(b"GET /slow", at_eof=True) == Detection(Protocol.HTTP1, http_method=b"GET")
    assert detect(b"FETCH /slow", at_eof=True).protocol is Protocol.OPAQUE


def test_http1_overlong_request_line_decided_by_method() -> None:
    line = b"GET /" + b"a" * sniff.MAX_REQUEST_LINE_BYTES
    assert detect(line) == Detection(Protocol.HTTP1, http_method=b"GET")
    assert detect(b"WHATEVER /" + b"a" * sniff.MAX_REQUEST_LINE_BYTES).protocol is Protocol.OPAQUE


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",  # token, SP, but no HTTP version at the end of the line
        b"*1\r\n$4\r\nPING\r\n",  # redis RESP
        b"SET key value\r\n",  # redis inline command: a token and SP, but no HTTP version
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # postgres SSLRequest
        b"GET / HTTP/2.0\r\n",  # not HTTP/1.x
        b"GET  / HTTP/1.1\r\n",  # two spaces: not a request line
        b"A" * (sniff.MAX_METHOD_BYTES + 1) + b" / HTTP/1.1\r\n",
        b"\x16\x03\x01\x00",  # TLS-looking but cut and then the peer closed: judged at eof below
    ],
)
def test_opaque(data: bytes) -> None:
    assert detect(data, at_eof=True).protocol is Protocol.OPAQUE


def test_binary_after_method_is_opaque_early() -> None:
    assert detect(b"SET \x00\x01").protocol is Protocol.OPAQUE
    assert detect(b"SET a\rb").protocol is Protocol.OPAQUE  # a CR that is not the line's last byte


def test_empty_needs_more_until_eof() -> None:
    assert detect(b"") is NEED_MORE
    assert detect(b"", at_eof=True) is sniff.OPAQUE
