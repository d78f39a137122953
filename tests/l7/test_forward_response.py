"""forward_response_head: the native and pure versions agree byte for byte (with and without a field
to take out), and for every response they call plain, the head the proxy builds from the result is
exactly the one the general path (parse_response_head + h1.classify_response +
h1.serialize_response_head) builds, and the HTTP/2 fields built from it are those the general path
gives an HTTP/2 stream (h2_codec.response_fields)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.l7 import _headparser_native as native
from proxy.l7 import _headparser_py as pure
from proxy.l7 import h1
from proxy.l7._headparser_common import FULL_PATH, HeadParseError
from proxy.l7.h1 import serialize_plain_response_head
from proxy.l7.h2_codec import plain_response_fields, response_fields
from proxy.telemetry.peer import PEER_HEADER

IMPLEMENTATIONS = [pytest.param(native, id="native"), pytest.param(pure, id="pure")]

NAMES = [b"Server", b"Date", b"Content-Type", b"X-A", b"content-length", b"Content-Length", b"CONNECTION",
         b"Connection", b"Keep-Alive", b"Proxy-Connection", b"Transfer-Encoding", b"TE", b"Trailer", b"Upgrade",
         b"grpc-status", b"Grpc-Status", b"Set-Cookie", b"ETag", b"X-Triomesh-Peer", b"x-triomesh-peer"]
VALUES = [b"", b"0", b"5", b"100", b"007", b"1" * 18, b"1" * 19, b"5, 5", b"-1", b" 12 ", b"chunked", b"trailers",
          b"close", b"keep-alive", b"Keep-Alive", b"close, keep-alive", b"keep-alive close", b"upgrade",
          b"x-drop", b"keep-alive, x-drop", b" , close ,", b"14", b"nginx/1.22", b'"abc"', b"\xe9t\xe9"]


@st.composite
def responses(draw) -> bytes:
    status = draw(st.sampled_from([b"200", b"200", b"204", b"304", b"101", b"103", b"404", b"503", b"599"]))
    reason = draw(st.sampled_from([b" OK", b" Not Found", b"", b" ", b" a b\tc"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [version + b" " + status + reason]
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.sampled_from(NAMES))
        sep = draw(st.sampled_from([b":", b": ", b":\t"]))
        lines.append(name + sep + draw(st.sampled_from(VALUES)))
    return b"\r\n".join(lines) + b"\r\n\r\n" + draw(st.sampled_from([b"", b"hello", b"HTTP/1.1 200 OK\r\n"]))


@st.composite
def mostly_plain_responses(draw) -> bytes:
    """One Content-Length, ordinary fields, Connection close/keep-alive and dropped hop-by-hop fields,
    in random case and order: the responses the C path takes, so the equivalence test sees many."""
    status = draw(st.sampled_from([b"200", b"201", b"404", b"503"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    fields = [draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"])) + b": "
              + draw(st.sampled_from([b"0", b"5", b"100", b"007", b"1" * 18]))]
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from([b"Server", b"Date", b"X-A", b"ETag", b"Set-Cookie", b"grpc-status",
                                     b"Grpc-Status", b"Connection", b"Keep-Alive", b"Proxy-Connection",
                                     b"Trailer", b"Upgrade", b"x-triomesh-peer", b"X-TrioMesh-Peer"]))
        value = draw(st.sampled_from([b"close", b"keep-alive", b"Keep-Alive", b" , close ,", b"close, keep-alive"]
                                     if name == b"Connection" else [b"", b"14", b"0", b"nginx", b"a b\tc", b'"x"', b"a: b"]))
        fields.insert(draw(st.integers(0, len(fields))), name + draw(st.sampled_from([b":", b": ", b":\t"])) + value)
    return b"\r\n".join([version + b" " + status + b" OK", *fields]) + b"\r\n\r\nhello"


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.integers(0, 3), st.sampled_from([b"", PEER_HEADER]))
def test_native_and_pure_agree(data, cut, take):
    data = data[:len(data) - cut] if cut else data
    assert native.forward_response_head(data, 0, 100, take) == pure.forward_response_head(data, 0, 100, take)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mostly_plain_responses(), st.sampled_from([b"", PEER_HEADER]))
def test_native_and_pure_agree_on_plain_responses(data, take):
    assert native.forward_response_head(data, 0, 100, take) == pure.forward_response_head(data, 0, 100, take)


def _general_head(data: bytes, close: bool) -> tuple[bytes, int, bool, bytes | None]:
    """(head sent downstream, body length, upstream keep-alive, grpc-status) by the general path."""
    end, minor, status, reason, headers = pure.parse_response_head(data)
    out, framing, keep, _, _ = h1.classify_response(b"GET", status, minor, headers)
    grpc = next((v for n, v in headers if n == b"grpc-status"), None)
    head = h1.serialize_response_head(status, reason, out, framing, close=close)
    return head, framing.length, keep, grpc or None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mostly_plain_responses(), st.booleans())
def test_plain_results_build_the_general_paths_head(data, close):
    result = native.forward_response_head(data)
    assume(result is not None and result is not FULL_PATH)
    end, minor, status, reason, fields, length, keep_alive, grpc, taken = result
    assert taken is None  # nothing asked for
    head, general_length, general_keep, general_grpc = _general_head(data, close)
    assert serialize_plain_response_head(status, reason, fields, length, close=close) == head
    assert (length, keep_alive, grpc) == (general_length, general_keep, general_grpc)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mostly_plain_responses(), st.sampled_from([b"", PEER_HEADER]))
def test_plain_results_build_the_general_paths_http2_fields(data, take):
    result = native.forward_response_head(data, 0, 100, take)
    assume(result is not None and result is not FULL_PATH)
    status, fields, length, taken = result[2], result[4], result[5], result[8]
    _, minor, _, _, headers = pure.parse_response_head(data)
    if take:  # the field taken out of the block is not sent on either way
        headers = [(name, value) for name, value in headers if name != take]
    out, framing, _, _, _ = h1.classify_response(b"GET", status, minor, headers)
    assert list(plain_response_fields(status, fields, length)) == response_fields(status, out, framing.length)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTE: trailers\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-drop\r\nX-Drop: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",  # no length: the body ends with the connection
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",  # malformed: the general path raises the precise error
])
def test_outside_the_plain_case_is_full_path(impl, head):
    assert impl.forward_response_head(head) is FULL_PATH


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_plain_response(impl):
    data = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nConnection: Keep-Alive\r\n"
            b"Keep-Alive: timeout=5\r\nX-Trace: A b\r\nGrpc-Status: 14\r\ngrpc-status: 0\r\n\r\nhello")
    end, minor, status, reason, fields, length, keep_alive, grpc, taken = impl.forward_response_head(data)
    assert data[end:] == b"hello"
    assert (minor, status, reason, length, keep_alive, grpc, taken) == (1, 200, b"OK", 5, True, b"14", None)
    assert fields == b"server: nginx\r\nx-trace: A b\r\ngrpc-status: 14\r\ngrpc-status: 0\r\n"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_field_taken_out_of_the_block(impl):
    """The field named by `take`, in any case, is left out of the block and its last value returned
    (the proxy's peer metadata: the one its peer sidecar appended last counts)."""
    data = (b"HTTP/1.1 200 OK\r\nX-Triomesh-Peer: app=first\r\nContent-Length: 2\r\nServer: app\r\n"
            b"x-triomesh-peer:  app=last \r\n\r\nok")
    *_, fields, length, keep_alive, grpc, taken = impl.forward_response_head(data, 0, 100, PEER_HEADER)
    assert (fields, taken) == (b"server: app\r\n", b"app=last")
    *_, fields, length, keep_alive, grpc, taken = impl.forward_response_head(data)  # nothing to take
    assert taken is None and fields.count(b"x-triomesh-peer: ") == 2
    empty = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-triomesh-peer:\r\n\r\n"
    assert impl.forward_response_head(empty, 0, 100, PEER_HEADER)[4:] == (b"", 0, True, None, b"")
    absent = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-triomesh-peers: a\r\n\r\n"
    assert impl.forward_response_head(absent, 0, 100, PEER_HEADER)[4:] == (b"x-triomesh-peers: a\r\n", 0, True, None, None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_keep_alive_rules(impl):
    def keep(version: bytes, connection: bytes | None) -> bool:
        extra = b"Connection: " + connection + b"\r\n" if connection is not None else b""
        return impl.forward_response_head(version + b" 200 OK\r\nContent-Length: 0\r\n" + extra + b"\r\n")[6]

    assert keep(b"HTTP/1.1", None) and not keep(b"HTTP/1.1", b"close")
    assert not keep(b"HTTP/1.0", None) and keep(b"HTTP/1.0", b"keep-alive")
    assert not keep(b"HTTP/1.0", b"keep-alive, close")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_incomplete_is_none(impl):
    assert impl.forward_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n") is None


def test_a_field_block_bigger_than_the_area_takes_the_general_path():
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(90)) + b"\r\n"
    assert native.forward_response_head(big) is FULL_PATH
    assert pure.forward_response_head(big) is FULL_PATH


def test_malformed_heads_are_reported_by_the_general_parser():
    with pytest.raises(HeadParseError):
        pure.parse_response_head(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n")
