"""Fuzz target: the HTTP/1.1 chunked body decoder (proxy/l7/h1.py ChunkedDecoder) on the chunk-line
parsers of both head parsers (native C and pure Python).

Properties: malformed input raises the decoder's error type (BadRequest), nothing else; the decoder
never yields more bytes than it was given nor consumes past the buffer; the result (data, done,
consumed, or an error) is the same however the body arrives in reads; the native and pure
chunk-size-line parsers agree on every input."""

from __future__ import annotations

from proxy.l7 import _headparser_py as pure
from proxy.l7 import h1
from proxy.l7.errors import BadRequest
from proxy.l7.headparser import HeadParseError
from proxy.l7.headparser import parse_chunk_header as selected_parse_chunk_header

MAX_LEN = 4096


class _Outcome:
    __slots__ = ("data", "done", "consumed", "error")

    def __init__(self, data: bytes, done: bool, consumed: int, error: bool) -> None:
        self.data, self.done, self.consumed, self.error = data, done, consumed, error

    def __repr__(self) -> str:
        return f"Outcome(data={self.data!r}, done={self.done}, consumed={self.consumed}, error={self.error})"


def _decode(reads: list[bytes]) -> _Outcome:
    """Feed the reads as BodyReader does: one growing buffer, decode() from the last position."""
    decoder = h1.ChunkedDecoder()
    buf = bytearray()
    pos = 0
    out = bytearray()
    given = 0
    try:
        for chunk in reads:
            buf += chunk
            given += len(chunk)
            pieces, new_pos = decoder.decode(buf, pos, len(buf))
            assert pos <= new_pos <= len(buf), (pos, new_pos, len(buf))
            for piece in pieces:
                out += piece
                piece.release()  # views pin the bytearray; the real driver drops them before growing it
            assert len(out) <= given, "more bytes out than in"
            pos = new_pos
            if decoder.done:
                break
    except BadRequest:
        return _Outcome(bytes(out), decoder.done, pos, True)
    return _Outcome(bytes(out), decoder.done, pos, False)


def _chunk_line(parse, data: bytes):
    try:
        return parse(data, 0)
    except HeadParseError as e:
        return ("error", e.code)


def _same(a: _Outcome, b: _Outcome) -> bool:
    # an error drops the connection: what was yielded before it, and where, depends on the reads
    return a.error and b.error or (a.data, a.done, a.consumed, a.error) == (b.data, b.done, b.consumed, b.error)


def check(data: bytes) -> None:
    whole = _decode([data])
    cut = data[0] * len(data) // 256 if data else 0
    split = _decode([data[:cut], data[cut:]])
    assert _same(whole, split), f"{whole} in one read, {split} in two"
    bytewise = _decode([data[i:i + 1] for i in range(min(len(data), 64))] + [data[64:]])
    assert _same(whole, bytewise), f"{whole} in one read, {bytewise} byte by byte"
    # differential: whichever parser is selected (native when built) agrees with the pure one
    if selected_parse_chunk_header is not pure.parse_chunk_header:
        assert _chunk_line(selected_parse_chunk_header, data) == _chunk_line(pure.parse_chunk_header, data), data[:80]
