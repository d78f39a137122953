"""The upstream request head's writer: the C one (native/h1_write.c) byte for byte the pure one
(h1._serialize_request_head_py), on what the proxy passes and on every uncommon shape it hands on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.l7 import h1

pure = h1._serialize_request_head_py
try:  # the C writer itself, whichever h1 uses (so these tests compare the two under TRIOMESH_PURE_PARSER=1 too)
    from proxy.l7 import _h1_write
except ImportError:  # test_native_unless_forced fails then, unless the pure twin was asked for
    _h1_write = None
else:
    _h1_write.configure(pure)
needs_native = pytest.mark.skipif(_h1_write is None, reason="native/h1_write.c was not built")


def test_native_unless_forced():
    if os.environ.get("TRIOMESH_PURE_PARSER", "") not in ("", "0"):
        assert h1.WRITER_IMPLEMENTATION == "pure"
    else:
        # fails when the extension was not built: `pip install -e .` must build it
        assert h1.WRITER_IMPLEMENTATION == "native"
        assert h1.serialize_request_head.__module__ == "proxy.l7._h1_write"


def test_environment_variable_forces_pure():
    code = "from proxy.l7 import h1; print(h1.WRITER_IMPLEMENTATION, h1.serialize_request_head.__name__)"
    env = dict(os.environ, TRIOMESH_PURE_PARSER="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pure", "_serialize_request_head_py"]


def _both(*args, **kwargs) -> bytes:
    expected = pure(*args, **kwargs)
    assert _h1_write.serialize_request_head(*args, **kwargs) == expected
    return expected


@needs_native
def test_the_proxys_shapes():
    headers = [(b"user-agent", b"curl/8"), (b"accept", b"*/*"), (b"x-request-id", b"abc")]
    assert _both(b"GET", b"/small", headers, h1.FRAMING_NONE, b"backend", b"x-triomesh-peer: a=b\r\n") == (
        b"GET /small HTTP/1.1\r\nhost: backend\r\nuser-agent: curl/8\r\naccept: */*\r\nx-request-id: abc\r\n"
        b"x-triomesh-peer: a=b\r\n\r\n")
    assert _both(b"POST", b"/u", [], h1.Framing(h1.LENGTH, 0)) == b"POST /u HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
    assert _both(b"POST", b"/u", [], h1.Framing(h1.LENGTH, 10**18), authority=b"a").endswith(
        b"content-length: 1000000000000000000\r\n\r\n")
    assert _both(b"PUT", b"/c", [(b"a", b"")], h1.FRAMING_CHUNKED, extra_fields=b"") == (
        b"PUT /c HTTP/1.1\r\na: \r\ntransfer-encoding: chunked\r\n\r\n")
    assert _both(b"GET", b"/", [], h1.FRAMING_CLOSE) == b"GET / HTTP/1.1\r\n\r\n"


@needs_native
def test_the_proxys_shapes_never_reach_the_python_writer():
    """What the router and mirrors pass is written in C: a fast path that handed everything to the
    Python twin would pass the comparisons here and cost every request the Python writer."""
    def refuse(*args, **kwargs):
        raise AssertionError("handed to the Python writer")

    _h1_write.configure(refuse)
    try:
        headers = [(b"user-agent", b"curl/8"), (b"x-request-id", b"abc")]
        for framing in (h1.FRAMING_NONE, h1.FRAMING_CHUNKED, h1.Framing(h1.LENGTH, 42)):
            _h1_write.serialize_request_head(b"GET", b"/", headers, framing, b"backend", b"x-p: 1\r\n")
            _h1_write.serialize_request_head(b"GET", b"/", headers, framing, authority=b"a", extra_fields=b"")
            _h1_write.serialize_request_head(b"GET", b"/", [], framing)
        with pytest.raises(AssertionError, match="Python writer"):  # and an uncommon shape does reach it
            _h1_write.serialize_request_head(b"GET", b"/", [(b"a", bytearray(b"b"))], h1.FRAMING_NONE)
    finally:
        _h1_write.configure(pure)


@pytest.mark.parametrize("case", [
    # a value or a name some stage made as another bytes-like type
    ((b"GET", b"/", [(b"a", bytearray(b"b"))], h1.FRAMING_NONE), {}),
    ((b"GET", b"/", [[b"a", b"b"]], h1.FRAMING_NONE), {}),
    ((b"GET", b"/", ((b"a", b"b"),), h1.FRAMING_NONE), {}),
    ((bytearray(b"GET"), b"/", [], h1.FRAMING_NONE), {}),
    ((b"GET", b"/", [], h1.FRAMING_NONE), {"authority": memoryview(b"h")}),
    ((b"GET", b"/", [], h1.FRAMING_NONE), {"extra_fields": bytearray(b"e: f\r\n")}),
    # lengths beyond a long long, negative, or not ints; kinds not ints
    ((b"POST", b"/", [], h1.Framing(h1.LENGTH, 2**70)), {}),
    ((b"POST", b"/", [], h1.Framing(h1.LENGTH, -5)), {}),
    ((b"POST", b"/", [], h1.Framing(h1.LENGTH, True)), {}),
    ((b"POST", b"/", [], h1.Framing(True, 7)), {}),
    ((b"POST", b"/", [], h1.Framing(2**80, 7)), {}),
])
@needs_native
def test_uncommon_shapes_write_as_python_does(case):
    args, kwargs = case
    _both(*args, **kwargs)


@pytest.mark.parametrize("args, kwargs", [
    ((b"GET", b"/", [(b"a", b"b", b"c")], h1.FRAMING_NONE), {}),   # not a pair
    ((b"GET", b"/", [(b"a", "b")], h1.FRAMING_NONE), {}),           # str, not bytes
    ((b"GET", b"/", [], object()), {}),                             # no framing
    ((b"GET", b"/", []), {}),                                       # too few arguments
    ((b"GET", b"/", [], h1.FRAMING_NONE), {"authority": b"a", "bogus": 1}),
    ((b"GET", b"/", [], h1.FRAMING_NONE, b"a"), {"authority": b"b"}),  # given twice
])
@needs_native
def test_bad_arguments_fail_as_in_python(args, kwargs):
    with pytest.raises((TypeError, ValueError, AttributeError)) as in_python:
        pure(*args, **kwargs)
    with pytest.raises(in_python.type):
        _h1_write.serialize_request_head(*args, **kwargs)


_token = st.binary(min_size=1, max_size=20)
_value = st.binary(max_size=60)
_framing = st.one_of(
    st.sampled_from([h1.FRAMING_NONE, h1.FRAMING_CHUNKED, h1.FRAMING_CLOSE]),
    st.integers(min_value=-(2**64), max_value=2**64).map(lambda n: h1.Framing(h1.LENGTH, n)),
)


@needs_native
@given(method=_token, target=_value, headers=st.lists(st.tuples(_token, _value), max_size=30), framing=_framing,
       authority=st.one_of(st.none(), _value), extra=st.one_of(st.none(), _value))
def test_native_matches_pure(method, target, headers, framing, authority, extra):
    if extra is None:
        _both(method, target, headers, framing, authority)
    else:
        _both(method, target, headers, framing, authority=authority, extra_fields=extra)
