"""The head parser API on the C parser (native/): the two calls every proxied HTTP/1.1 request makes,
parse_request_head and forward_response_head, come from the CPython extension
proxy.l7._headparser_capi (native/headparser_capi.c: the call and the building of the result objects
in C, several thousand instructions less per call than through cffi); the others from the cffi
module proxy.l7._headparser_c.

Through cffi, per call: one C call on the caller's buffer (bytes are passed as is; a bytearray or
memoryview goes through ffi.from_buffer, which does not copy), then one copy of the parsed strings out
of a preallocated `pack` area, split on NUL in a single bytes.split (see headparser.h): that makes every
bytes object of the result in C, instead of two slices and a lower() per header in Python.

Not thread-safe: the result areas are preallocated once per process and reused by every call (the
data plane parses on its one Trio thread). Identical behaviour to _headparser_py, checked by the tests.
"""

from __future__ import annotations

from . import _headparser_capi
from ._headparser_c import ffi, lib
from ._headparser_common import CODE_BY_NUMBER, FULL_PATH, INCOMPLETE, HeadParseError, make_error

__all__ = ["parse_request_head", "parse_response_head", "parse_trailers", "parse_chunk_header",
           "forward_response_head", "HeadParseError"]

# Field indexes of tm_head read as a flat size_t array.
_MINOR, _STATUS, _ERROR_OFFSET, _PACK_LEN = 6, 7, 9, 10
_PACK_FULL = lib.TM_PACK_FULL
assert INCOMPLETE == lib.TM_INCOMPLETE == _headparser_capi.INCOMPLETE
assert all(getattr(lib, "TM_E_" + code) == number for number, code in CODE_BY_NUMBER.items())


def _make():
    """Build the parse functions as closures over the preallocated C areas (cell lookups are
    cheaper than module globals on this hot path)."""
    head = ffi.new("tm_head *")
    meta = memoryview(ffi.buffer(head)).cast("N")
    headers_cap = 128
    headers = ffi.new("tm_header[]", headers_cap)
    pack = bytearray(16384)
    pack_ptr = ffi.from_buffer(pack)
    pack_mv = memoryview(pack)
    pack_cap = len(pack)
    chunk_size = ffi.new("uint64_t *")
    chunk_error = ffi.new("size_t *")
    from_buffer = ffi.from_buffer
    c_response, c_fields = lib.tm_parse_response, lib.tm_parse_fields
    c_chunk = lib.tm_parse_chunk_size

    def call(fn, buf, start: int, max_headers: int) -> int:
        """Run a head parser; returns consumed or INCOMPLETE. The common case (a bytes buffer, results
        that fit the areas) is one C call; anything else goes through call_growing."""
        if max_headers <= headers_cap and type(buf) is bytes:
            rc = fn(buf, len(buf), start, head, headers, max_headers, pack_ptr, pack_cap)
            if rc >= 0 or rc == INCOMPLETE:
                return rc
        return call_growing(fn, buf, start, max_headers)

    def call_growing(fn, buf, start: int, max_headers: int) -> int:
        """Run a head parser, growing the result areas when needed, and turn error codes into
        HeadParseError."""
        nonlocal headers, headers_cap, pack, pack_ptr, pack_mv, pack_cap
        if max_headers > headers_cap:
            headers_cap = max_headers
            headers = ffi.new("tm_header[]", headers_cap)
        ptr = buf if type(buf) is bytes else from_buffer(buf)
        rc = fn(ptr, len(buf), start, head, headers, max_headers, pack_ptr, pack_cap)
        if rc == _PACK_FULL:
            pack = bytearray(max(2 * pack_cap, meta[_PACK_LEN]))
            pack_ptr = from_buffer(pack)
            pack_mv = memoryview(pack)
            pack_cap = len(pack)
            rc = fn(ptr, len(buf), start, head, headers, max_headers, pack_ptr, pack_cap)
        if rc < 0 and rc != INCOMPLETE:
            raise make_error(CODE_BY_NUMBER[rc], buf, meta[_ERROR_OFFSET], max_headers)
        return rc

    def parse_response_head(buf, start: int = 0, max_headers: int = 100):
        """None if incomplete, else (end, minor_version, status, reason, headers)."""
        rc = call(c_response, buf, start, max_headers)
        if rc < 0:
            return None
        parts = iter(pack_mv[: meta[_PACK_LEN]].tobytes().split(b"\0"))
        reason = next(parts)
        return (start + rc, meta[_MINOR], meta[_STATUS], reason, list(zip(parts, parts)))

    def parse_trailers(buf, start: int = 0, max_headers: int = 100):
        """None if incomplete, else (end, headers) for a field section ending in a blank line."""
        rc = call(c_fields, buf, start, max_headers)
        if rc < 0:
            return None
        n = meta[_PACK_LEN]
        if n == 0:
            return (start + rc, [])
        parts = iter(pack_mv[:n].tobytes().split(b"\0"))
        return (start + rc, list(zip(parts, parts)))

    def parse_chunk_header(buf, start: int = 0):
        """None if incomplete, else (end, chunk_size)."""
        ptr = buf if type(buf) is bytes else from_buffer(buf)
        rc = c_chunk(ptr, len(buf), start, chunk_size, chunk_error)
        if rc < 0:
            if rc == INCOMPLETE:
                return None
            raise make_error(CODE_BY_NUMBER[rc], buf, chunk_error[0])
        return (start + rc, chunk_size[0])

    return parse_response_head, parse_trailers, parse_chunk_header


parse_response_head, parse_trailers, parse_chunk_header = _make()


def _error_for_code(number: int, buf, offset: int, max_headers: int) -> HeadParseError:
    return make_error(CODE_BY_NUMBER[number], buf, offset, max_headers)


_headparser_capi.configure(_error_for_code, FULL_PATH)
parse_request_head = _headparser_capi.parse_request_head
forward_response_head = _headparser_capi.forward_response_head
