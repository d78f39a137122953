"""Every crash the fuzz targets found, as a plain test (no atheris): the input, the property it broke."""

from __future__ import annotations

import pytest

from proxy.l7 import _headparser_py as pure
from proxy.l7 import h1
from proxy.l7.errors import BadRequest
from proxy.l7.headparser import IMPLEMENTATION, HeadParseError, parse_chunk_header
from tests.fuzz import fuzz_chunked


@pytest.mark.parametrize("parse", [pure.parse_chunk_header, parse_chunk_header], ids=["pure", IMPLEMENTATION])
def test_oversized_chunk_size_is_refused_before_its_line_ends(parse) -> None:
    # fuzz_chunked: the C parser refused 16 hex digits above 2^63-1 at once, the pure one waited for LF
    with pytest.raises(HeadParseError) as e:
        parse(b"FFFFFFDFF1FFFD34\r", 0)
    assert e.value.code == "INVALID_CHUNK_SIZE"
    fuzz_chunked.check(b"FFFFFFDFF1FFFD34\r")


def _trailer_body() -> bytes:
    fields = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
    body = b"1\r\na\r\n0\r\n" + fields + b"\r\n"
    assert len(fields) > h1.MAX_TRAILER_BYTES
    return body


@pytest.mark.parametrize("cut", [None, 66000], ids=["one-read", "two-reads"])
def test_trailer_section_limit_does_not_depend_on_reads(cut) -> None:
    # found while fuzzing the chunked decoder (its split-invariance property): a trailer section above
    # MAX_TRAILER_BYTES was accepted when it came in one read, refused when it came in two
    body = _trailer_body()
    reads = [body] if cut is None else [body[:cut], body[cut:]]
    decoder = h1.ChunkedDecoder()
    buf = bytearray()
    pos = 0
    with pytest.raises(BadRequest, match="trailer section too large"):
        for read in reads:
            buf += read
            pieces, pos = decoder.decode(buf, pos, len(buf))
            for p in pieces:
                p.release()


def test_a_long_chunk_size_line_is_refused_however_it_arrives():
    """A chunk size line (with extensions) longer than the 4 KiB bound was refused when it came in
    pieces but accepted when it came in one read; now both are refused, and one just within the
    bound is accepted both ways."""
    from proxy.l7.errors import BadRequest
    from proxy.l7.h1 import ChunkedDecoder

    def run(data: bytes, step: int):
        decoder = ChunkedDecoder(BadRequest)
        buf, pos, out = b"", 0, b""
        for i in range(0, len(data), step):
            buf += data[i:i + step]
            pieces, pos = decoder.decode(buf, pos, len(buf))
            out += b"".join(bytes(p) for p in pieces)
        return out

    for extension_len, refused in ((4096 - 8, False), (4200, True)):
        body = b"5;x=" + b"a" * extension_len + b"\r\nhello\r\n0\r\n\r\n"
        for step in (len(body), 1):
            if refused:
                with pytest.raises(BadRequest, match="chunk size line too long"):
                    run(body, step)
            else:
                assert run(body, step) == b"hello"
