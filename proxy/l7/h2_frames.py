"""HTTP/2 frames on the wire (RFC 9113 §4, §6): the frame header, the types, flags, error and setting
codes, and the serializers the connection writes with. Sans-IO, no state."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
FRAME_HEADER_BYTES = 9

# frame types (§6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# error codes (§7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

ERROR_NAMES = {
    NO_ERROR: "NO_ERROR", PROTOCOL_ERROR: "PROTOCOL_ERROR", INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR", SETTINGS_TIMEOUT: "SETTINGS_TIMEOUT", STREAM_CLOSED: "STREAM_CLOSED",
    FRAME_SIZE_ERROR: "FRAME_SIZE_ERROR", REFUSED_STREAM: "REFUSED_STREAM", CANCEL: "CANCEL",
    COMPRESSION_ERROR: "COMPRESSION_ERROR", CONNECT_ERROR: "CONNECT_ERROR", ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM",
    INADEQUATE_SECURITY: "INADEQUATE_SECURITY", HTTP_1_1_REQUIRED: "HTTP_1_1_REQUIRED",
}

# settings (§6.5.2)
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME_SIZE = 16384
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1  # §5.1.1: stream identifiers are 31 bits
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

_HEADER = struct.Struct(">HBBBI")  # the 24-bit length as 16 + 8 bits, type, flags, stream id
FRAME_HEADER = _HEADER  # for a hot path that packs without frame_header's call: (length >> 8, length & 0xFF, ...)
_U32 = struct.Struct(">I")
_U16_U32 = struct.Struct(">HI")
_U32_U32 = struct.Struct(">II")


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id)


def parse_header(buf, pos: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the frame header at buf[pos:pos+9]; the reserved bit is
    ignored on receipt (§4.1)."""
    length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
    return length, buf[pos + 3], buf[pos + 4], _U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF


def settings_frame(settings: dict[int, int]) -> bytes:
    payload = b"".join(_U16_U32.pack(k, v) for k, v in settings.items())
    return frame_header(len(payload), SETTINGS, 0, 0) + payload


SETTINGS_ACK_FRAME = frame_header(0, SETTINGS, ACK, 0)


def parse_settings(payload) -> list[tuple[int, int]]:
    return [_U16_U32.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return frame_header(4, RST_STREAM, 0, stream_id) + _U32.pack(code)


def ping_frame(payload: bytes, ack: bool) -> bytes:
    return frame_header(8, PING, ACK if ack else 0, 0) + payload


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame_header(8 + len(debug), GOAWAY, 0, 0) + _U32_U32.pack(last_stream_id, code) + debug


def u32(buf, pos: int) -> int:
    return _U32.unpack_from(buf, pos)[0]
