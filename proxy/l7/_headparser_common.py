"""What the native and pure head parsers share: the error type, its codes and its messages."""

from __future__ import annotations

# code -> (number used by the C parser, what is wrong). The numbers are the TM_E_* values of
# native/headparser.h; the pure parser uses the same codes so both raise identical errors.
CODES: dict[str, tuple[int, str]] = {
    "BARE_CR": (-3, "CR not followed by LF"),
    "BARE_LF": (-4, "LF without a preceding CR (lines must end in CRLF)"),
    "NUL": (-5, "NUL byte"),
    "INVALID_METHOD": (-6, "method is not a token followed by a single SP"),
    "INVALID_TARGET": (-7, "request-target is not one or more visible ASCII characters followed by SP"),
    "INVALID_VERSION": (-8, "HTTP version is not HTTP/1.<digit>"),
    "INVALID_STATUS": (-9, "status code is not three digits in 100..599"),
    "INVALID_REASON": (-10, "reason phrase contains a control character"),
    "INVALID_TOKEN": (-11, "header name is empty or has a character that is not allowed in a token"),
    "SPACE_BEFORE_COLON": (-12, "whitespace between header name and colon"),
    "MISSING_COLON": (-13, "header line without a colon"),
    "OBS_FOLD": (-14, "header line starts with whitespace (obsolete line folding)"),
    "INVALID_HEADER_VALUE": (-15, "header value contains a control character"),
    "TOO_MANY_HEADERS": (-16, "too many header fields"),
    "INVALID_CHUNK_SIZE": (-17, "chunk size is not 1 to 16 hex digits below 2**63 followed by CRLF or ';'"),
    "INVALID_CHUNK_EXT": (-18, "chunk extension is not ;name[=token|quoted-string] as in RFC 9112 7.1.1"),
}

CODE_BY_NUMBER: dict[int, str] = {number: code for code, (number, _) in CODES.items()}

INCOMPLETE = -2


class _FullPath:
    """forward_response_head's answer for a response outside the plain case (or a malformed one):
    the caller parses it with parse_response_head and relays it by the general rules."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FULL_PATH"


FULL_PATH = _FullPath()


class HeadParseError(ValueError):
    """A message head (or chunk-size line) that breaks RFC 9112.

    `code` names the rule (a key of CODES), `offset` is the absolute offset in the caller's buffer of
    the offending byte, `status` is the response a server should send (431 for too many headers,
    else 400).
    """

    def __init__(self, code: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.offset = offset
        self.status = 431 if code == "TOO_MANY_HEADERS" else 400

    def __reduce__(self):  # keep code/offset when pickled (e.g. across worker processes)
        return (type(self), (self.code, self.offset, str(self)))


def make_error(code: str, buf: bytes | bytearray | memoryview, offset: int, max_headers: int = 0) -> HeadParseError:
    """The error for `code` at `offset`, with a message naming the byte and where it is."""
    what = CODES[code][1]
    if code == "TOO_MANY_HEADERS":
        return HeadParseError(code, offset, f"more than {max_headers} header fields (field line at offset {offset})")
    byte = bytes(buf[offset : offset + 1])
    return HeadParseError(code, offset, f"{what}: byte {byte!r} at offset {offset}")
