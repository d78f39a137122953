"""Sans-IO HTTP/1.1 rules: framing decisions, chunked decoding at every split point, hop-by-hop."""

from __future__ import annotations

import pytest

from proxy.l7 import h1
from proxy.l7.errors import BadRequest, UnsupportedTransferCoding, UpstreamProtocolError


def H(*pairs: str) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in (p.split(": ", 1) for p in pairs)]


@pytest.mark.parametrize("headers,minor,kind,length", [
    ([], 1, h1.NONE, 0),
    (["content-length: 0"], 1, h1.NONE, 0),
    (["content-length: 12"], 1, h1.LENGTH, 12),
    (["content-length: 12", "content-length: 12"], 1, h1.LENGTH, 12),
    (["content-length: 12, 12"], 1, h1.LENGTH, 12),
    (["transfer-encoding: chunked"], 1, h1.CHUNKED, 0),
    (["transfer-encoding: Chunked"], 1, h1.CHUNKED, 0),
])
def test_request_framing_accepted(headers, minor, kind, length):
    f = h1.request_framing(H(*headers), minor)
    assert (f.kind, f.length) == (kind, length)


@pytest.mark.parametrize("headers,minor,error", [
    (["content-length: 1", "transfer-encoding: chunked"], 1, BadRequest),
    (["content-length: 1", "content-length: 2"], 1, BadRequest),
    (["content-length: 1,2"], 1, BadRequest),
    (["content-length: +1"], 1, BadRequest),
    (["content-length: 0x10"], 1, BadRequest),
    (["content-length: 99999999999999999999"], 1, BadRequest),
    (["transfer-encoding: chunked"], 0, BadRequest),
    (["transfer-encoding: gzip"], 1, UnsupportedTransferCoding),
    (["transfer-encoding: chunked, gzip"], 1, BadRequest),
    (["transfer-encoding: chunked", "transfer-encoding: chunked"], 1, BadRequest),
    (["transfer-encoding: gzip, chunked"], 1, UnsupportedTransferCoding),
])
def test_request_framing_rejected(headers, minor, error):
    with pytest.raises(error):
        h1.request_framing(H(*headers), minor)


@pytest.mark.parametrize("method,status,headers,kind", [
    (b"GET", 200, ["content-length: 5"], h1.LENGTH),
    (b"HEAD", 200, ["content-length: 5"], h1.NONE),
    (b"GET", 204, [], h1.NONE),
    (b"GET", 304, ["content-length: 5"], h1.NONE),
    (b"GET", 200, [], h1.CLOSE),
    (b"GET", 200, ["transfer-encoding: chunked"], h1.CHUNKED),
    (b"GET", 200, ["transfer-encoding: gzip"], h1.CLOSE),
])
def test_response_framing(method, status, headers, kind):
    assert h1.response_framing(method, status, H(*headers)).kind == kind


def test_response_framing_bad_length_is_upstream_protocol_error():
    with pytest.raises(UpstreamProtocolError):
        h1.response_framing(b"GET", 200, H("content-length: 1", "content-length: 2"))


def test_keep_alive_rules():
    assert h1.wants_keep_alive(1, set())
    assert not h1.wants_keep_alive(1, {b"close"})
    assert not h1.wants_keep_alive(0, set())
    assert h1.wants_keep_alive(0, {b"keep-alive"})


def test_hop_by_hop_stripped_with_connection_named_fields():
    headers = H("connection: close, x-secret", "x-secret: 1", "keep-alive: 5", "te: trailers", "te: gzip",
                "upgrade: websocket", "x-kept: 2", "transfer-encoding: chunked", "content-length: 3")
    tokens = h1.connection_tokens(headers)
    out = h1.strip_hop_by_hop(headers, tokens)
    assert out == [(b"te", b"trailers"), (b"x-kept", b"2")]
    up = h1.strip_hop_by_hop(H("connection: upgrade", "upgrade: websocket"), {b"upgrade"}, keep_upgrade=True)
    assert up == [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]


CHUNKED_BODY = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nx-trailer: 1\r\n\r\n"


@pytest.mark.parametrize("split", range(1, len(CHUNKED_BODY)))
def test_chunked_decoder_every_split(split):
    dec = h1.ChunkedDecoder()
    buf = CHUNKED_BODY[:split]
    pieces, pos = dec.decode(buf, 0, len(buf))
    out = b"".join(bytes(p) for p in pieces)
    buf = buf[pos:] + CHUNKED_BODY[split:]
    pieces, pos = dec.decode(buf, 0, len(buf))
    out += b"".join(bytes(p) for p in pieces)
    assert dec.done and pos == len(buf)
    assert out == b"hello world!"


def test_chunked_decoder_stops_at_message_end():
    dec = h1.ChunkedDecoder()
    data = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n"
    pieces, pos = dec.decode(data, 0, len(data))
    assert dec.done and data[pos:] == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("bad", [b"zz\r\n", b"3\r\nabcXY", b"-1\r\n", b"3\r\nabc\r\n0\r\nno-colon\r\n\r\n",
                                 b"1" * 5000])
def test_chunked_decoder_rejects(bad):
    dec = h1.ChunkedDecoder(UpstreamProtocolError)
    with pytest.raises(UpstreamProtocolError):
        dec.decode(bad, 0, len(bad))


def test_serialize_heads():
    assert h1.serialize_request_head(b"GET", b"/", [(b"host", b"a")], h1.FRAMING_NONE) == \
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    assert h1.serialize_request_head(b"POST", b"/", [], h1.Framing(h1.LENGTH, 3)).endswith(
        b"content-length: 3\r\n\r\n")
    assert h1.serialize_response_head(200, b"OK", [], h1.FRAMING_CHUNKED, close=True) == \
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    assert h1.serialize_response_head(200, b"OK", [], h1.FRAMING_NONE, close=False,
                                      content_length_header=b"1234").endswith(b"content-length: 1234\r\n\r\n")


def test_classify_request_one_pass():
    raw = H("Host: a.example", "connection: keep-alive, x-hop", "x-hop: 1", "expect: 100-continue",
            "content-length: 4", "x-app: 2", "te: trailers", "keep-alive: 5")
    raw = [(n.lower(), v) for n, v in raw]
    headers, host, framing, keep, expect, upgrade = h1.classify_request(raw, 1)
    assert host == b"a.example"
    assert headers == [(b"x-app", b"2"), (b"te", b"trailers")]
    assert (framing.kind, framing.length, keep, expect, upgrade) == (h1.LENGTH, 4, True, True, False)


def test_classify_request_upgrade_and_http10():
    raw = H("host: a", "connection: Upgrade", "upgrade: websocket")
    headers, _, framing, keep, expect, upgrade = h1.classify_request(raw, 1)
    assert upgrade and not keep
    assert headers == [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]
    _, host, _, keep, expect, _ = h1.classify_request(H("expect: 100-continue"), 0)
    assert host is None and not keep and not expect
    with pytest.raises(BadRequest):
        h1.classify_request(H("host: a", "host: b"), 1)
    with pytest.raises(BadRequest):
        h1.classify_request(H("host: a", "content-length: 1", "transfer-encoding: chunked"), 1)


def test_classify_response_one_pass():
    raw = H("content-length: 12", "connection: close, x-hop", "x-hop: 1", "server: s")
    headers, framing, keep, raw_length, tokens = h1.classify_response(b"GET", 200, 1, raw)
    assert headers == [(b"server", b"s")]
    assert (framing.kind, framing.length, keep, raw_length) == (h1.LENGTH, 12, False, b"12")
    headers, framing, keep, raw_length, _ = h1.classify_response(b"HEAD", 200, 1, H("content-length: 99"))
    assert (framing.kind, keep, raw_length) == (h1.NONE, True, b"99")
    _, framing, keep, _, _ = h1.classify_response(b"GET", 200, 1, [])
    assert framing.kind == h1.CLOSE and not keep
    _, framing, keep, _, _ = h1.classify_response(b"GET", 200, 0, H("content-length: 1"))
    assert not keep


def test_local_replies_without_content_for_204_and_304():
    from proxy.l7.local_reply import local_reply_bytes
    for status in (204, 304):
        data = local_reply_bytes(status, b"must not be sent", close=False)
        assert data.endswith(b"\r\n\r\n") and b"content-length" not in data and b"must not" not in data
    assert b"content-length: 5\r\n" in local_reply_bytes(200, b"hello", close=False)
