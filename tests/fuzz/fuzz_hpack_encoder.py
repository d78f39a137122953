"""Fuzz target: the native HPACK encoder (native/hpack_encoder.c) against its pure twin (h2_hpack.PureEncoder).

The input is a program for one connection's encoder. Byte 0 bit 0: Huffman. Then, per operation, a
byte `op`: below 0x10, a new SETTINGS_HEADER_TABLE_SIZE (SIZES[op]); else a block of `op & 0x0F`
fields, each a name byte (bit 7: send it never indexed; the rest picks NAMES, or past their end a
name of that many bytes read from the input) and a value (a length byte, then that many bytes; 0xFF:
20,000 copies of the next byte: four such literals fill the literal cache's 64 KiB). Properties:
both encoders write the same bytes and end with the same table, literal cache and generation, and
our Decoder decodes every block to the fields sent."""

from __future__ import annotations

from proxy.l7 import h2_hpack
from proxy.l7.h2_hpack import Decoder, PureEncoder

MAX_LEN = 4096

NativeEncoder = h2_hpack.native_encoder()
SIZES = [0, 1, 31, 32, 33, 64, 100, 256, 1000, 2048, 4096, 4097, 8192, 65535, 65536, 1 << 20]
NAMES = [b":authority", b":method", b":path", b":status", b"user-agent", b"accept", b"content-length", b"date",
         b"x-request-id", b"traceparent", b"authorization", b"cookie", b"set-cookie", b"x-custom", b"te",
         b"content-type"]


def _fields(data: bytes, pos: int, count: int) -> tuple[list[tuple[bytes, bytes]], frozenset, int]:
    fields, hidden = [], []
    for _ in range(count):
        if pos >= len(data):
            break
        selector = data[pos]
        pos += 1
        pick = selector & 0x7F
        if pick < len(NAMES):
            name = NAMES[pick]
        else:
            name = data[pos:pos + pick - len(NAMES)]
            pos += pick - len(NAMES)
        length = data[pos] if pos < len(data) else 0
        pos += 1
        if length == 0xFF:
            value = (data[pos:pos + 1] or b"v") * 20000
            pos += 1
        else:
            value = data[pos:pos + length]
            pos += length
        fields.append((name, value))
        if selector & 0x80:
            hidden.append((name, value))
    return fields, frozenset(hidden), pos


def check(data: bytes) -> None:
    if not data:
        return
    huffman = bool(data[0] & 1)
    native, pure = NativeEncoder(huffman=huffman), PureEncoder(huffman=huffman)
    decoder = Decoder(max_table_size=4096, max_header_list_size=1 << 30)
    decoder.set_max_table_size(1 << 20)  # as if acknowledged: any size update is allowed
    pos = 1
    while pos < len(data):
        op = data[pos]
        pos += 1
        if op < 0x10:
            native.set_max_table_size(SIZES[op])
            pure.set_max_table_size(SIZES[op])
        else:
            fields, hidden, pos = _fields(data, pos, op & 0x0F)
            block = native.encode(fields, hidden or None)
            assert block == pure.encode(fields, hidden or None), (fields, hidden)
            assert decoder.decode(block)[0] == fields
            assert decoder.dynamic_table == native.dynamic_table
        assert native.dynamic_table == pure.dynamic_table
        assert (native.table_size, native.table_limit, native.generation) == \
            (pure.table_size, pure.table_limit, pure.generation)
        assert native._index == pure._index and native._fixed == pure._fixed
        assert native.table_size <= native.table_limit
