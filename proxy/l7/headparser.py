"""Strict RFC 9112 HTTP/1.1 head parsing: the C parser when built, else the identical pure-Python one.

    parse_request_head(buf, start=0, max_headers=100)
        -> None (incomplete) | (end, method, target, minor_version, headers)
    parse_response_head(buf, start=0, max_headers=100)
        -> None | (end, minor_version, status, reason, headers)
    parse_trailers(buf, start=0, max_headers=100) -> None | (end, headers)   # after the last chunk
    parse_chunk_header(buf, start=0) -> None | (end, chunk_size)
    forward_response_head(buf, start=0, max_headers=100, take=b"")
        -> None | FULL_PATH | (end, minor_version, status, reason, fields, content_length,
                              keep_alive, grpc_status, taken)
        a response head as the proxy forwards it, for the plain case (one Content-Length, no
        Connection option but close/keep-alive, no Transfer-Encoding/TE, a status with content):
        `fields` is the field block without the hop-by-hop fields; anything else is FULL_PATH, and
        the caller parses and relays it by the general rules (h1.classify_response); a field named
        `take` (lowercase) is left out of `fields` too and its last value returned as `taken`

`buf` is bytes or bytearray and is never copied whole; `end` is the absolute offset just after what
was parsed. Header names come back lowercased, values with surrounding OWS stripped. Invalid input
raises HeadParseError (.code, .offset, .status) as soon as the offending byte is in the buffer, even
before the head is complete. The caller bounds the head size (431 when no complete head fits).

IMPLEMENTATION says which parser is in use: "native" (proxy.l7._headparser_native, on the extensions
built from native/ at install time) or "pure"; TRIOMESH_PURE_PARSER=1 in the environment forces
"pure".
"""

from __future__ import annotations

import os

from ._headparser_common import CODES, FULL_PATH, HeadParseError

__all__ = [
    "IMPLEMENTATION",
    "CODES",
    "HeadParseError",
    "parse_request_head",
    "parse_response_head",
    "parse_trailers",
    "parse_chunk_header",
    "forward_response_head",
    "FULL_PATH",
]

IMPLEMENTATION: str
if os.environ.get("TRIOMESH_PURE_PARSER", "") not in ("", "0"):
    from ._headparser_py import (
        forward_response_head,
        parse_chunk_header,
        parse_request_head,
        parse_response_head,
        parse_trailers,
    )

    IMPLEMENTATION = "pure"
else:
    try:
        from ._headparser_native import (
            forward_response_head,
            parse_chunk_header,
            parse_request_head,
            parse_response_head,
            parse_trailers,
        )

        IMPLEMENTATION = "native"
    except ImportError:  # extension not built (e.g. no C compiler at install time)
        from ._headparser_py import (
            forward_response_head,
            parse_chunk_header,
            parse_request_head,
            parse_response_head,
            parse_trailers,
        )

        IMPLEMENTATION = "pure"
