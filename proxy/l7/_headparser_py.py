"""The head parser API in pure Python, behaving exactly like the C parser (native/headparser.c).

Theory of operation: two paths.
- Fast path (nearly every call): find the blank line with bytes.find, check the whole head against
  one anchored regex that accepts exactly what the C parser accepts, then cut it up with a second
  regex (findall) and a list comprehension. All per-byte work happens inside `re` and `bytes`.
- Slow path (only for invalid heads, and for incomplete heads whose prefix the cheap checks cannot
  clear): `_Scanner`, a byte-by-byte transcription of the C parser, which finds the first offending
  byte and its error code in the same order the C code does. Being a full parser, it is also run
  on its own by the tests against the C parser and the fast path.
"""

from __future__ import annotations

import re

from ._headparser_common import CODES, FULL_PATH, HeadParseError, make_error

__all__ = ["parse_request_head", "parse_response_head", "parse_trailers", "parse_chunk_header",
           "forward_response_head", "HeadParseError"]

# Character classes, as regex sets (RFC 9110 5.6.2 token, 5.5 field-value; RFC 9112 3.2 target).
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_VCHAR = rb"\x21-\x7e"
_FVAL = rb"\t\x20-\x7e\x80-\xff"  # HTAB / SP / VCHAR / obs-text
_QDTEXT = rb"\t \x21\x23-\x5b\x5d-\x7e\x80-\xff"

_FIELD_LINE = rb"[" + _TCHAR + rb"]+:[" + _FVAL + rb"]*\r\n"
# A whole request head after the leading empty lines, ending with the blank line.
_REQUEST_RE = re.compile(
    rb"([" + _TCHAR + rb"]+) ([" + _VCHAR + rb"]+) HTTP/1\.([0-9])\r\n((?:" + _FIELD_LINE + rb")*)\r\n"
)
_RESPONSE_RE = re.compile(rb"HTTP/1\.([0-9]) ([1-5][0-9][0-9])(?: ([" + _FVAL + rb"]*))?\r\n((?:" + _FIELD_LINE + rb")*)\r\n")
_FIELDS_RE = re.compile(rb"(?:" + _FIELD_LINE + rb")*\r\n")
# Cuts an already validated field block into (name, value) with OWS stripped from the value.
_FIELD_SPLIT_RE = re.compile(rb"([^:]+):[ \t]*((?:[^\r]*[^\r \t])?)[ \t]*\r\n")



def _prefix_of(atoms: list[bytes]) -> bytes:
    """A regex matching any prefix (including none) of the sequence of regex atoms."""
    out = b""
    for atom in reversed(atoms):
        out = b"(?:" + atom + out + b")?"
    return out


# Prefixes that are certainly "incomplete, nothing wrong yet": complete lines, then a partial line.
_VERSION_ATOMS = [b"H", b"T", b"T", b"P", b"/", b"1", rb"\.", b"[0-9]"]
_PARTIAL_REQUEST_LINE_RE = re.compile(
    rb"[" + _TCHAR + rb"]*|[" + _TCHAR + rb"]+ [" + _VCHAR + rb"]*"
    rb"|[" + _TCHAR + rb"]+ [" + _VCHAR + rb"]+ " + _prefix_of(_VERSION_ATOMS + [b"\r"])
)
_PARTIAL_STATUS_LINE_RE = re.compile(
    _prefix_of(_VERSION_ATOMS + [b" ", b"[0-9]", b"[0-9]"])
    + rb"|HTTP/1\.[0-9] [1-5][0-9][0-9](?: [" + _FVAL + rb"]*)?\r?"
)
_PARTIAL_FIELD_LINE_RE = re.compile(rb"\r?|[" + _TCHAR + rb"]+(?:[ \t]*|\r|:[" + _FVAL + rb"]*\r?)")
_REQUEST_LINE_RE = re.compile(rb"[" + _TCHAR + rb"]+ [" + _VCHAR + rb"]+ HTTP/1\.[0-9]\r\n")
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.[0-9] [1-5][0-9][0-9](?: [" + _FVAL + rb"]*)?\r\n")
_FIELD_LINES_RE = re.compile(rb"(?:" + _FIELD_LINE + rb")*")

# chunk-size [ chunk-ext ] CRLF; no whitespace right after the size, BWS only around ';' and '='.
_CHUNK_EXT_BODY = (
    rb"[ \t]*[" + _TCHAR + rb"]+(?:[ \t]*=[ \t]*(?:[" + _TCHAR + rb"]+|\"(?:[" + _QDTEXT + rb"]|\\[" + _FVAL + rb"])*\"))?"
)
_CHUNK_RE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;" + _CHUNK_EXT_BODY + rb"(?:[ \t]*;" + _CHUNK_EXT_BODY + rb")*)?\r\n"
)
_PARTIAL_CHUNK_RE = re.compile(rb"[0-9A-Fa-f]{0,16}|[0-9A-Fa-f]{1,16}\r")

_MAX_CHUNK_SIZE = 2**63 - 1


# ---------------------------------------------------------------------------------------------------
# Fast path


def parse_request_head(buf, start: int = 0, max_headers: int = 100):
    """None if incomplete, else (end, method, target, minor_version, headers)."""
    p = start
    while buf.startswith(b"\r\n", p):  # RFC 9112 2.2: skip empty lines before the request-line
        p += 2
    end = buf.find(b"\r\n\r\n", p)
    if end < 0:
        if _request_prefix_ok(buf, p, max_headers):
            return None
        return _Scanner(buf, start, max_headers).request()
    end += 4
    head = buf[p:end] if type(buf) is bytes else bytes(buf[p:end])
    m = _REQUEST_RE.fullmatch(head)
    if m is not None:
        block = m.group(4)
        fields = _FIELD_SPLIT_RE.findall(block) if block else []
        if len(fields) <= max_headers:
            return (
                end,
                m.group(1),
                m.group(2),
                head[m.end(3) - 1] - 48,
                [(name.lower(), value) for name, value in fields],
            )
    return _Scanner(buf, start, max_headers).request()


def parse_response_head(buf, start: int = 0, max_headers: int = 100):
    """None if incomplete, else (end, minor_version, status, reason, headers)."""
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if _response_prefix_ok(buf, start, max_headers):
            return None
        return _Scanner(buf, start, max_headers).response()
    end += 4
    head = buf[start:end] if type(buf) is bytes else bytes(buf[start:end])
    m = _RESPONSE_RE.fullmatch(head)
    if m is not None:
        block = m.group(4)
        fields = _FIELD_SPLIT_RE.findall(block) if block else []
        if len(fields) <= max_headers:
            return (
                end,
                head[7] - 48,
                int(m.group(2)),
                m.group(3) or b"",
                [(name.lower(), value) for name, value in fields],
            )
    return _Scanner(buf, start, max_headers).response()


# forward_response_head: fields dropped as hop-by-hop (RFC 9110 7.6.1) and those that make a response
# leave the plain case; the same lists as native/forward.c.
_DROPPED = frozenset({b"keep-alive", b"proxy-connection", b"trailer", b"upgrade"})
_NOT_PLAIN = frozenset({b"transfer-encoding", b"te"})
_FIELDS_OUT_BYTES = 16384  # as the native area: a bigger field block takes the general path


def forward_response_head(buf, start: int = 0, max_headers: int = 100, take: bytes = b""):
    """The twin of the native forward_response_head (see native/forward.c): None if incomplete,
    FULL_PATH outside the plain case or for a malformed head, else (end, minor_version, status,
    reason, fields, content_length, keep_alive, grpc_status, taken)."""
    try:
        parsed = parse_response_head(buf, start, max_headers)
    except HeadParseError:
        return FULL_PATH
    if parsed is None:
        return None
    end, minor, status, reason, headers = parsed
    if status < 200 or status in (204, 304):
        return FULL_PATH
    out: list[bytes] = []
    size = 0
    length = None
    close = keep_alive_token = False
    grpc_status = None
    grpc_seen = False
    taken = None
    for name, value in headers:
        if name == take:  # left out of the block; the last one counts
            taken = value
            continue
        if name == b"content-length":
            if length is not None or not 1 <= len(value) <= 18 or not value.isdigit():
                return FULL_PATH
            length = int(value)
            continue
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token == b"close":
                    close = True
                elif token == b"keep-alive":
                    keep_alive_token = True
                elif token:
                    return FULL_PATH
            continue
        if name in _NOT_PLAIN:
            return FULL_PATH
        if name in _DROPPED:
            continue
        if name == b"grpc-status" and not grpc_seen:  # the first one counts
            grpc_status = value or None
            grpc_seen = True
        size += len(name) + len(value) + 4
        if size > _FIELDS_OUT_BYTES:
            return FULL_PATH
        out.append(b"%s: %s\r\n" % (name, value))
    if length is None:
        return FULL_PATH
    keep_alive = not close and (minor >= 1 or keep_alive_token)
    return end, minor, status, reason, b"".join(out), length, keep_alive, grpc_status, taken


def parse_trailers(buf, start: int = 0, max_headers: int = 100):
    """None if incomplete, else (end, headers) for a field section ending in a blank line."""
    if buf.startswith(b"\r\n", start):
        return (start + 2, [])
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if _fields_prefix_ok(buf, start, max_headers):
            return None
        return _Scanner(buf, start, max_headers).trailers()
    end += 4
    block = buf[start:end] if type(buf) is bytes else bytes(buf[start:end])
    if _FIELDS_RE.fullmatch(block) is not None:
        fields = _FIELD_SPLIT_RE.findall(block)
        if len(fields) <= max_headers:
            return (end, [(name.lower(), value) for name, value in fields])
    return _Scanner(buf, start, max_headers).trailers()


def parse_chunk_header(buf, start: int = 0):
    """None if incomplete, else (end, chunk_size)."""
    m = _CHUNK_RE.match(buf, start)
    if m is not None:
        size = int(m.group(1), 16)
        if size <= _MAX_CHUNK_SIZE:
            return (m.end(), size)
    elif _PARTIAL_CHUNK_RE.fullmatch(buf, start) is not None:
        # an incomplete line whose digits already exceed the limit is refused now, as the C parser
        # does (found by tests/fuzz/fuzz_chunked.py); the scanner raises the error
        if int(bytes(buf[start:]).rstrip(b"\r") or b"0", 16) <= _MAX_CHUNK_SIZE:
            return None
    return _Scanner(buf, start, 0).chunk()


# Incomplete heads: cheap checks that the bytes so far are a valid prefix. False means "not sure";
# the scanner then decides (and finds the error, if there is one).


def _request_prefix_ok(buf, p: int, max_headers: int) -> bool:
    data = buf[p:] if type(buf) is bytes else bytes(buf[p:])
    nl = data.find(b"\r\n")
    if nl < 0:
        return _PARTIAL_REQUEST_LINE_RE.fullmatch(data) is not None
    if _REQUEST_LINE_RE.match(data) is None:
        return False
    return _fields_prefix_ok(data, nl + 2, max_headers)


def _response_prefix_ok(buf, p: int, max_headers: int) -> bool:
    data = buf[p:] if type(buf) is bytes else bytes(buf[p:])
    nl = data.find(b"\r\n")
    if nl < 0:
        return _PARTIAL_STATUS_LINE_RE.fullmatch(data) is not None
    if _STATUS_LINE_RE.match(data) is None:
        return False
    return _fields_prefix_ok(data, nl + 2, max_headers)


def _fields_prefix_ok(data, p: int, max_headers: int) -> bool:
    """data[p:] holds complete field lines and then a partial one, and no blank line."""
    last = data.rfind(b"\r\n", p)
    complete_end = p if last < 0 else last + 2
    if complete_end > p:
        m = _FIELD_LINES_RE.match(data, p)
        if m.end() != complete_end:
            return False
        if data.count(b"\r\n", p, complete_end) > max_headers:
            return False
    partial = data[complete_end:]
    if not partial:
        return True
    if data.count(b"\r\n", p, complete_end) >= max_headers and partial != b"\r":
        return False
    return _PARTIAL_FIELD_LINE_RE.fullmatch(partial) is not None


# ---------------------------------------------------------------------------------------------------
# Slow path: the C parser, byte by byte.

_TCHAR_SET = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VCHAR_SET = frozenset(range(0x21, 0x7F))
_FVAL_SET = frozenset([0x09, 0x20, *range(0x21, 0x7F), *range(0x80, 0x100)])
_HEX_SET = frozenset(b"0123456789abcdefABCDEF")
_QDTEXT_SET = frozenset([0x09, 0x20, 0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F), *range(0x80, 0x100)])
_WS = (0x20, 0x09)
_CR, _LF = 0x0D, 0x0A


class _Incomplete(Exception):
    pass


class _Error(Exception):
    def __init__(self, code: str, offset: int) -> None:
        self.code = code
        self.offset = offset


class _Scanner:
    """A direct transcription of native/headparser.c; raises HeadParseError, returns None when
    incomplete. Each method mirrors the C function of the same purpose."""

    def __init__(self, buf, start: int, max_headers: int) -> None:
        self.buf = buf
        self.end = len(buf)
        self.start = start
        self.max_headers = max_headers

    # -- helpers, as in C --

    def need(self, p: int) -> None:
        if p >= self.end:
            raise _Incomplete

    def byte(self, p: int) -> int:
        self.need(p)
        return self.buf[p]

    def classify(self, p: int, element_code: str) -> _Exception:
        c = self.buf[p]
        if c == 0:
            return _Error("NUL", p)
        if c == _CR:
            if p + 1 == self.end:
                return _Incomplete()
            return _Error(element_code if self.buf[p + 1] == _LF else "BARE_CR", p)
        if c == _LF:
            return _Error("BARE_LF", p)
        return _Error(element_code, p)

    def skip(self, p: int, allowed) -> int:
        buf, end = self.buf, self.end
        while p < end and buf[p] in allowed:
            p += 1
        return p

    def skip_ws(self, p: int) -> int:
        buf, end = self.buf, self.end
        while p < end and buf[p] in _WS:
            p += 1
        return p

    def expect_crlf(self, p: int, element_code: str) -> int:
        if self.byte(p) != _CR:
            raise self.classify(p, element_code)
        if self.byte(p + 1) != _LF:
            raise _Error("BARE_CR", p)
        return p + 2

    def version(self, p: int) -> tuple[int, int]:
        for expected in b"HTTP/1.":
            if self.byte(p) != expected:
                raise self.classify(p, "INVALID_VERSION")
            p += 1
        c = self.byte(p)
        if not 0x30 <= c <= 0x39:
            raise self.classify(p, "INVALID_VERSION")
        return p + 1, c - 0x30

    def fields(self, p: int) -> tuple[int, list[tuple[bytes, bytes]]]:
        buf = self.buf
        headers: list[tuple[bytes, bytes]] = []
        while True:
            c = self.byte(p)
            if c == _CR:
                if self.byte(p + 1) != _LF:
                    raise _Error("BARE_CR", p)
                return p + 2, headers
            if c == _LF:
                raise _Error("BARE_LF", p)
            if c in _WS:
                raise _Error("OBS_FOLD", p)
            if len(headers) == self.max_headers:
                raise _Error("TOO_MANY_HEADERS", p)
            name = p
            p = self.skip(p, _TCHAR_SET)
            c = self.byte(p)
            if c != 0x3A or p == name:  # ':'
                if c in _WS and p != name:
                    q = self.skip_ws(p)
                    self.need(q)
                    raise _Error("SPACE_BEFORE_COLON" if buf[q] == 0x3A else "INVALID_TOKEN", p)
                if c == _CR and p != name:
                    raise _Error("MISSING_COLON" if self.byte(p + 1) == _LF else "BARE_CR", p)
                raise self.classify(p, "INVALID_TOKEN")
            name_end = p
            p = self.skip_ws(p + 1)
            value = p
            p = self.skip(p, _FVAL_SET)
            if self.byte(p) != _CR:
                raise self.classify(p, "INVALID_HEADER_VALUE")
            if self.byte(p + 1) != _LF:
                raise _Error("BARE_CR", p)
            value_end = p
            while value_end > value and buf[value_end - 1] in _WS:
                value_end -= 1
            headers.append((bytes(buf[name:name_end]).lower(), bytes(buf[value:value_end])))
            p += 2

    def run(self, parse):
        try:
            return parse()
        except _Incomplete:
            return None
        except _Error as e:
            raise make_error(e.code, self.buf, e.offset, self.max_headers) from None

    # -- the four entry points --

    def request(self):
        return self.run(self._request)

    def _request(self):
        buf, p = self.buf, self.start
        if p > self.end:
            raise _Incomplete
        while self.byte(p) == _CR:
            if self.byte(p + 1) != _LF:
                raise _Error("BARE_CR", p)
            p += 2
        method = p
        p = self.skip(p, _TCHAR_SET)
        if self.byte(p) != 0x20 or p == method:
            raise self.classify(p, "INVALID_METHOD")
        method_end = p
        target = p = p + 1
        p = self.skip(p, _VCHAR_SET)
        if self.byte(p) != 0x20 or p == target:
            raise self.classify(p, "INVALID_TARGET")
        target_end = p
        p, minor = self.version(p + 1)
        p = self.expect_crlf(p, "INVALID_VERSION")
        end, headers = self.fields(p)
        return (end, bytes(buf[method:method_end]), bytes(buf[target:target_end]), minor, headers)

    def response(self):
        return self.run(self._response)

    def _response(self):
        buf, p = self.buf, self.start
        if p > self.end:
            raise _Incomplete
        p, minor = self.version(p)
        if self.byte(p) != 0x20:
            raise self.classify(p, "INVALID_VERSION")
        p += 1
        status_at = p
        status = 0
        for _ in range(3):
            c = self.byte(p)
            if not 0x30 <= c <= 0x39:
                raise self.classify(p, "INVALID_STATUS")
            status = status * 10 + c - 0x30
            p += 1
        if not 100 <= status <= 599:  # RFC 9110 15
            raise _Error("INVALID_STATUS", status_at)
        c = self.byte(p)
        reason = p
        if c == 0x20:
            reason = p = p + 1
            p = self.skip(p, _FVAL_SET)
            if self.byte(p) != _CR:
                raise self.classify(p, "INVALID_REASON")
        elif c != _CR:
            raise self.classify(p, "INVALID_STATUS")
        reason_end = p
        p = self.expect_crlf(p, "INVALID_REASON")
        end, headers = self.fields(p)
        return (end, minor, status, bytes(buf[reason:reason_end]), headers)

    def trailers(self):
        return self.run(self._trailers)

    def _trailers(self):
        if self.start > self.end:
            raise _Incomplete
        return self.fields(self.start)

    def chunk(self):
        return self.run(self._chunk)

    def _chunk(self):
        buf, end, p = self.buf, self.end, self.start
        if p > end:
            raise _Incomplete
        digits = p
        while p < end and buf[p] in _HEX_SET:
            if p - digits == 16:
                raise _Error("INVALID_CHUNK_SIZE", p)
            p += 1
        self.need(p)
        if p == digits:
            raise self.classify(p, "INVALID_CHUNK_SIZE")
        size = int(bytes(buf[digits:p]), 16)
        if size > _MAX_CHUNK_SIZE:
            raise _Error("INVALID_CHUNK_SIZE", digits)
        while buf[p] == 0x3B:  # ';'
            p = self.skip_ws(p + 1)
            name = p
            p = self.skip(p, _TCHAR_SET)
            self.need(p)
            if p == name:
                raise self.classify(p, "INVALID_CHUNK_EXT")
            q = self.skip_ws(p)
            self.need(q)
            if buf[q] == 0x3D:  # '='
                p = self.skip_ws(q + 1)
                if self.byte(p) == 0x22:  # '"'
                    p += 1
                    while True:
                        p = self.skip(p, _QDTEXT_SET)
                        c = self.byte(p)
                        if c == 0x22:
                            break
                        if c != 0x5C:  # '\\'
                            raise self.classify(p, "INVALID_CHUNK_EXT")
                        p += 1
                        if self.byte(p) not in _FVAL_SET:
                            raise self.classify(p, "INVALID_CHUNK_EXT")
                        p += 1
                    p += 1
                else:
                    value = p
                    p = self.skip(p, _TCHAR_SET)
                    self.need(p)
                    if p == value:
                        raise self.classify(p, "INVALID_CHUNK_EXT")
                q = self.skip_ws(p)
                self.need(q)
            if buf[q] == 0x3B:
                p = q
                continue
            if buf[p] != _CR:
                raise self.classify(p, "INVALID_CHUNK_EXT")
            break
        p = self.expect_crlf(p, "INVALID_CHUNK_SIZE")
        return (p, size)


_Exception = Exception  # annotation alias for classify()'s return (an exception to raise)
assert set(CODES) >= {"BARE_CR", "BARE_LF", "NUL", "INVALID_CHUNK_EXT"}
