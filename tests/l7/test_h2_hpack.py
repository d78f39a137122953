"""HPACK (proxy/l7/h2_hpack.py): RFC 7541 Appendix C, differentials against the `hpack` package, Huffman
coding (both decoder paths), decoding errors, RFC 9113 section 8.2.1 field checks and the header list
limit. Encoder tests run on the native encoder and its pure twin; tests/l7/test_h2_hpack_encoder.py
holds the two to the same bytes.

The `hpack` package is only an oracle here: blocks our Encoder writes must decode with hpack.Decoder to
the same fields and the same dynamic table, and blocks hpack.Encoder writes must decode with our
Decoder likewise, over many blocks of one connection (the tables must stay in step). The few
representation details that decoding cannot show (never-indexed bits, table size updates) are read
off the wire by `_walk` below, a deliberately naive parser written for these tests.
"""

from __future__ import annotations

import math
import os
import random
import re
import time

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman as oracle_huffman_decode

from proxy.l7 import h2_hpack
from proxy.l7.h2_hpack import (
    STATIC_TABLE,
    Decoder,
    HeaderListTooLarge,
    HpackError,
    PureEncoder,
    huffman_decode,
    huffman_encode,
)

BIG = 1 << 30  # a header list limit that never triggers

# Every encoder test runs on both twins. A failed import fails the native ones: the extension must be
# built by `pip install -e .` (or `python setup.py build_ext --inplace`).
ENCODERS = {"native": h2_hpack.native_encoder, "pure": lambda: PureEncoder}


@pytest.fixture(params=sorted(ENCODERS))
def encoder_type(request):
    try:
        return ENCODERS[request.param]()
    except ImportError:  # not built: a failure, unless the pure twin was asked for (no compiler)
        if os.environ.get("TRIOMESH_PURE_HPACK", "") in ("", "0"):
            raise
        pytest.skip("native/hpack_encoder.c was not built and TRIOMESH_PURE_HPACK=1")


def hx(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


# --- a naive wire reader for the tests ---------------------------------------------------------------------------


def _int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    mask = (1 << prefix_bits) - 1
    value = block[pos] & mask
    pos += 1
    if value == mask:
        shift = 0
        while True:
            b = block[pos]
            pos += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
    return value, pos


def _skip_string(block: bytes, pos: int) -> int:
    n, pos = _int(block, pos, 7)
    assert pos + n <= len(block)
    return pos + n


def _walk(block: bytes) -> tuple[list[int], list[str]]:
    """(table size updates at the start, kind of each field representation in order)."""
    updates: list[int] = []
    kinds: list[str] = []
    pos = 0
    while pos < len(block):
        b = block[pos]
        if b & 0x80:
            kind, bits = "indexed", 7
        elif b & 0x40:
            kind, bits = "incremental", 6
        elif b & 0x20:
            kind, bits = "update", 5
        elif b & 0x10:
            kind, bits = "never", 4
        else:
            kind, bits = "without", 4
        idx, pos = _int(block, pos, bits)
        if kind == "update":
            assert not kinds, "size update after a field"
            updates.append(idx)
            continue
        if kind != "indexed":
            if idx == 0:
                pos = _skip_string(block, pos)
            pos = _skip_string(block, pos)
        kinds.append(kind)
    return updates, kinds


def _enc_int(value: int, prefix_bits: int, flags: int) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = [flags | mask]
    value -= mask
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _lit(s: bytes, huffman: bool = False) -> bytes:
    """A string literal (section 5.2)."""
    if huffman:
        s = huffman_encode(s)
        return _enc_int(len(s), 7, 0x80) + s
    return _enc_int(len(s), 7, 0) + s


def _bits(bits: str) -> bytes:
    """A bit string, padded with ones to whole bytes."""
    bits += "1" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""


def _code(sym: int) -> str:
    code, n = h2_hpack.HUFFMAN_CODE[sym]
    return format(code, f"0{n}b")


def _oracle_decoder(table_size: int = 4096) -> hpack.Decoder:
    d = hpack.Decoder(max_header_list_size=BIG)
    d.header_table_size = table_size
    d.max_allowed_table_size = table_size
    return d


def _oracle_table(table) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in table.dynamic_entries]


# --- RFC 7541 Appendix C ------------------------------------------------------------------------------------------


def _check_block(dec: Decoder, block: bytes, fields, table, size: int, oracle: hpack.Decoder) -> None:
    assert [tuple(f) for f in oracle.decode(block, raw=True)] == fields  # the vector is typed right
    got, problem = dec.decode(block)
    assert problem is None
    assert got == fields
    assert dec.dynamic_table == table
    assert dec.table_size == size
    assert sum(len(n) + len(v) + 32 for n, v in table) == size


@pytest.mark.parametrize("block, fields, table, size", [
    # C.2.1 literal with indexing
    ("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
     [(b"custom-key", b"custom-header")], [(b"custom-key", b"custom-header")], 55),
    # C.2.2 literal without indexing
    ("040c 2f73 616d 706c 652f 7061 7468", [(b":path", b"/sample/path")], [], 0),
    # C.2.3 literal never indexed
    ("1008 7061 7373 776f 7264 0673 6563 7265 74", [(b"password", b"secret")], [], 0),
    # C.2.4 indexed
    ("82", [(b":method", b"GET")], [], 0),
])
def test_rfc7541_c2(block, fields, table, size):
    _check_block(Decoder(), hx(block), fields, table, size, _oracle_decoder())


C3_C4_FIELDS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com"),
     (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"), (b":authority", b"www.example.com"),
     (b"custom-key", b"custom-value")],
]
C3_C4_TABLES = [
    ([(b":authority", b"www.example.com")], 57),
    ([(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 110),
    ([(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 164),
]
C3 = [  # requests without Huffman coding
    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "8286 84be 5808 6e6f 2d63 6163 6865",
    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
]
C4 = [  # the same requests with Huffman coding
    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
    "8286 84be 5886 a8eb 1064 9cbf",
    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
]

DATE1 = b"Mon, 21 Oct 2013 20:13:21 GMT"
DATE2 = b"Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = b"https://www.example.com"
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
C5_C6_FIELDS = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE1), (b"location", LOCATION)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE1), (b"location", LOCATION)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", DATE2), (b"location", LOCATION),
     (b"content-encoding", b"gzip"), (b"set-cookie", COOKIE)],
]
C5_C6_TABLES = [
    ([(b"location", LOCATION), (b"date", DATE1), (b"cache-control", b"private"), (b":status", b"302")], 222),
    ([(b":status", b"307"), (b"location", LOCATION), (b"date", DATE1), (b"cache-control", b"private")], 222),
    ([(b"set-cookie", COOKIE), (b"content-encoding", b"gzip"), (b"date", DATE2)], 215),
]
C5 = [  # responses without Huffman coding, table size 256
    ("4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32"
     "3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
    "4803 3330 37c1 c0bf",
    ("88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970"
     "7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61"
     "6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31"),
]
C6 = [  # the same responses with Huffman coding
    ("4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad"
     "1718 63c7 8f0b 97c8 e9ae 82ae 43d3"),
    "4883 640e ffc1 c0bf",
    ("88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2"
     "e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07"),
]


@pytest.mark.parametrize("blocks, fields, tables, table_size", [
    (C3, C3_C4_FIELDS, C3_C4_TABLES, 4096),
    (C4, C3_C4_FIELDS, C3_C4_TABLES, 4096),
    (C5, C5_C6_FIELDS, C5_C6_TABLES, 256),
    (C6, C5_C6_FIELDS, C5_C6_TABLES, 256),
], ids=["C.3", "C.4", "C.5", "C.6"])
def test_rfc7541_sequences(blocks, fields, tables, table_size):
    dec = Decoder(max_table_size=table_size)
    oracle = _oracle_decoder(table_size)
    for block, want, (table, size) in zip(blocks, fields, tables):
        _check_block(dec, hx(block), want, table, size, oracle)
    # The table is usable afterwards: reference each entry by index.
    for i, pair in enumerate(tables[-1][0]):
        assert dec.decode(bytes((0x80 | (62 + i),))) == ([pair], None)


def test_rfc7541_c1_integers():
    # C.1.1-C.1.3 through the decoder: 10 as a 5-bit-prefix size update, 1337 likewise, 42 as an index.
    dec = Decoder(max_table_size=4096)
    assert dec.decode(bytes((0x20 | 10,))) == ([], None) and dec.table_limit == 10
    assert dec.decode(bytes((0x20 | 31, 0x9A, 0x0A))) == ([], None) and dec.table_limit == 1337
    assert dec.decode(bytes((0x80 | 42,))) == ([STATIC_TABLE[41]], None)
    assert _enc_int(1337, 5, 0x20) == bytes((0x3F, 0x9A, 0x0A))


def test_static_table_indexed():
    dec = Decoder()
    block = b"".join(_enc_int(i, 7, 0x80) for i in range(1, 62))
    fields, problem = dec.decode(block)
    assert fields == list(STATIC_TABLE) and problem is None
    assert [tuple(f) for f in _oracle_decoder().decode(block, raw=True)] == fields


# --- random header lists --------------------------------------------------------------------------------------------

TOKEN = b"abcdefghijklmnopqrstuvwxyz0123456789-_."
VALUE = bytes(range(0x20, 0x7F))
NAMES = [
    b":authority", b":path", b":method", b":status", b":scheme", b"accept", b"accept-encoding", b"user-agent",
    b"content-type", b"cache-control", b"etag", b"x-custom", b"x-forwarded-for", b"grpc-timeout",
    b"content-length", b"date", b"x-request-id", b"traceparent", b"authorization", b"proxy-authorization",
    b"cookie", b"set-cookie", b"www-authenticate",
]
NEVER = {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"}
STATIC_PAIRS = set(STATIC_TABLE)
_NAME_RE = re.compile(rb":?[!#$%&'*+\-.^_`|~0-9a-z]+")


def _field_ok(name: bytes, value: bytes) -> bool:
    """RFC 9113 section 8.2.1, written out independently of the module."""
    if not _NAME_RE.fullmatch(name):
        return False
    if b"\0" in value or b"\r" in value or b"\n" in value:
        return False
    return not value or (value[:1] not in (b" ", b"\t") and value[-1:] not in (b" ", b"\t"))


def _random_value(rng: random.Random, pool: list[bytes], valid_only: bool) -> bytes:
    r = rng.random()
    if r < 0.35:
        return rng.choice(pool)
    if r < 0.45:
        return b""
    if r < 0.55:  # around the 7-bit prefix boundaries, and long
        n = rng.choice([126, 127, 128, 254, 255, 256, 1000, 3000, 5000, 20000])
        return bytes(rng.choice(TOKEN) for _ in range(n))
    if r < 0.65:  # bytes with long Huffman codes (the state machine path)
        return bytes(rng.randrange(0x21, 0x100) for _ in range(rng.randrange(1, 60)))
    if r < 0.70 and not valid_only:  # malformed under section 8.2.1
        return rng.choice([b" lead", b"trail\t", b"nul\0x", b"cr\rx", b"lf\nx", b"\t", b" " * 20 + b"x" * 20])
    return bytes(rng.choice(VALUE) for _ in range(rng.randrange(1, 60))).strip(b" \t") or b"v"


def _random_fields(rng: random.Random, pool: list[bytes], valid_only: bool = True) -> list[tuple[bytes, bytes]]:
    fields = []
    for _ in range(rng.randrange(1, 16)):
        r = rng.random()
        if r < 0.15:
            fields.append(rng.choice(STATIC_TABLE))
            continue
        if r < 0.25:
            name = b"x-" + bytes(rng.choice(TOKEN) for _ in range(rng.randrange(1, 20)))
        elif r < 0.28 and not valid_only:
            name = rng.choice([b"X-Upper", b"has space", b"a:b", b""])
        else:
            name = rng.choice(NAMES)
        if name == b":path" and rng.random() < 0.3:
            value = b"/search?q=" + bytes(rng.choice(TOKEN) for _ in range(rng.randrange(0, 30)))
        else:
            value = _random_value(rng, pool, valid_only)
        fields.append((name, value))
    return fields


def _pool(rng: random.Random) -> list[bytes]:
    return [bytes(rng.choice(TOKEN) for _ in range(rng.randrange(1, 30))) for _ in range(8)]


def _size_changes(rng: random.Random) -> list[int]:
    if rng.random() > 0.2:
        return []
    return [rng.choice([0, 64, 100, 256, 1000, 4096, 8192, 100000]) for _ in range(rng.randrange(1, 4))]


@pytest.mark.parametrize("huffman", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_our_encoder_against_hpack_decoder(encoder_type, seed, huffman):
    rng = random.Random(seed * 2 + huffman)
    pool = _pool(rng)
    enc = encoder_type(huffman=huffman)
    oracle = _oracle_decoder()
    ours = Decoder(max_table_size=4096, max_header_list_size=BIG)
    ours.set_max_table_size(1 << 20)  # as if we advertised it and the peer acknowledged: any update is fine
    for _ in range(30):
        prev_limit = enc.table_limit
        changes = _size_changes(rng)
        for n in changes:
            enc.set_max_table_size(n)
            oracle.max_allowed_table_size = max(oracle.max_allowed_table_size, n)
        fields = _random_fields(rng, pool, valid_only=False)
        block = enc.encode(fields)
        updates, kinds = _walk(block)
        # Section 4.2: the smallest size since the last block, then the final one; nothing if nothing changed.
        capped = [min(n, 65536) for n in changes]
        if all(n == prev_limit for n in capped):
            assert updates == []
        else:
            assert updates[-1] == enc.table_limit == capped[-1]
            if min(capped) < prev_limit:  # the peer must evict down to it
                assert min(updates) == min(capped)
            assert len(updates) <= 2
        assert len(kinds) == len(fields)
        for (name, value), kind in zip(fields, kinds):
            if name in NEVER and (name, value) not in STATIC_PAIRS:
                assert kind == "never", (name, value)
            if name in (b"content-length", b"date", b"x-request-id", b"traceparent") and kind != "indexed":
                assert kind in ("without", "incremental")
        assert [tuple(f) for f in oracle.decode(block, raw=True)] == fields
        assert _oracle_table(oracle.header_table) == enc.dynamic_table
        assert oracle.header_table._current_size == enc.table_size <= enc.table_limit
        assert oracle.header_table.maxsize == enc.table_limit
        assert not any(name in NEVER for name, _ in enc.dynamic_table)
        # ... and our own decoder agrees, problem and all.
        got, problem = ours.decode(block)
        assert got == fields
        assert (problem is None) == all(_field_ok(n, v) for n, v in fields), problem
        assert ours.dynamic_table == enc.dynamic_table and ours.table_size == enc.table_size


@pytest.mark.parametrize("huffman", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_hpack_encoder_against_our_decoder(seed, huffman):
    rng = random.Random(1000 + seed * 2 + huffman)
    pool = _pool(rng)
    oracle = hpack.Encoder()
    dec = Decoder(max_table_size=4096, max_header_list_size=BIG)
    for _ in range(30):
        if rng.random() < 0.2:
            # We advertise a new SETTINGS_HEADER_TABLE_SIZE, the peer acknowledges it and picks a size within it.
            allowed = rng.choice([0, 100, 256, 1000, 4096, 8192, 65536])
            dec.set_max_table_size(allowed)
            size = rng.choice([0, allowed // 2, allowed])
            if size < oracle.header_table_size or (size != oracle.header_table_size and rng.random() < 0.5):
                oracle.header_table_size = size  # (the hpack encoder sends nothing when it did not change)
        fields = _random_fields(rng, pool, valid_only=False)
        sent = [(n, v, n in NEVER and rng.random() < 0.7) for n, v in fields]
        block = oracle.encode(sent, huffman=huffman)
        got, problem = dec.decode(block)
        assert got == fields
        assert (problem is None) == all(_field_ok(n, v) for n, v in fields), problem
        assert dec.dynamic_table == _oracle_table(oracle.header_table)
        assert dec.table_size == oracle.header_table._current_size
        assert dec.table_limit == oracle.header_table.maxsize


def test_large_tables_and_multibyte_indices(encoder_type):
    """Hundreds of entries: wire indices and name indices past every one- and two-byte boundary, both ways."""
    rng = random.Random(7)
    names = [b"n%03d" % i for i in range(300)]
    enc, oracle_dec = encoder_type(), _oracle_decoder(65536)
    enc.set_max_table_size(65536)
    oracle_enc = hpack.Encoder()
    oracle_enc.header_table_size = 65536
    ours, ours2 = Decoder(max_table_size=65536), Decoder(max_table_size=65536)
    for name in names:  # fill: 300 entries of 38 bytes
        block = enc.encode([(name, b"v")])
        assert oracle_dec.decode(block, raw=True) == [(name, b"v")]
        assert ours.decode(block) == ([(name, b"v")], None)
        block = oracle_enc.encode([(name, b"v")], huffman=False)
        assert ours2.decode(block) == ([(name, b"v")], None)
    for _ in range(20):
        fields = [(rng.choice(names), rng.choice([b"v", b"w%d" % rng.randrange(5)])) for _ in range(30)]
        block = enc.encode(fields)
        assert [tuple(f) for f in oracle_dec.decode(block, raw=True)] == fields
        assert ours.decode(block) == (fields, None)
        assert ours.dynamic_table == enc.dynamic_table == _oracle_table(oracle_dec.header_table)
        block = oracle_enc.encode(fields, huffman=rng.random() < 0.5)
        assert ours2.decode(block) == (fields, None)
        assert ours2.dynamic_table == _oracle_table(oracle_enc.header_table)
    assert len(ours.dynamic_table) > 300 and len(ours2.dynamic_table) > 300


@pytest.mark.parametrize("huffman", [False, True])
def test_encoder_never_indexed(encoder_type, huffman):
    enc, dec = encoder_type(huffman=huffman), Decoder()
    for _ in range(3):  # the second and third time come from the encoder's literal cache
        fields = [(b"authorization", b"Bearer abc.def"), (b"proxy-authorization", b"Basic eHl6"),
                  (b"cookie", b"a=1; b=2"), (b"set-cookie", b"id=42; HttpOnly"), (b"cookie", b""),
                  (b"x-other", b"secret-looking")]
        block = enc.encode(fields)
        _, kinds = _walk(block)
        assert kinds[:4] == ["never"] * 4
        assert kinds[4] == "indexed"  # (cookie, "") is a static full match: nothing to hide
        assert dec.decode(block) == (fields, None)
        assert [tuple(f) for f in hpack.Decoder().decode(encoder_type(huffman=huffman).encode(fields), raw=True)] \
            == fields
    assert all(name not in NEVER for name, _ in enc.dynamic_table)
    assert enc.dynamic_table == dec.dynamic_table == [(b"x-other", b"secret-looking")]
    # never indexed with a literal name (no static entry has it): flags 0x10 and index 0
    assert _walk(encoder_type().encode([(b"authorization", b"x")]))[1] == ["never"]


def test_encoder_table_size_updates(encoder_type):
    enc, dec = encoder_type(), Decoder(max_table_size=4096)
    enc.encode([(b"x-a", b"1"), (b"x-b", b"2")])
    dec.decode(encoder_type().encode([(b"x-a", b"1"), (b"x-b", b"2")]))
    enc.set_max_table_size(4096)  # unchanged: nothing to say
    assert _walk(enc.encode([]))[0] == []
    enc.set_max_table_size(0)
    enc.set_max_table_size(4096)  # smallest, then final (section 4.2)
    block = enc.encode([(b"x-a", b"1")])
    assert _walk(block)[0] == [0, 4096]
    assert dec.decode(block) == ([(b"x-a", b"1")], None)
    assert dec.dynamic_table == enc.dynamic_table == [(b"x-a", b"1")]
    assert _walk(enc.encode([(b"x-a", b"1")]))[0] == []  # only once
    enc.set_max_table_size(100)
    enc.set_max_table_size(200)
    assert _walk(enc.encode([]))[0] == [100, 200]
    enc.set_max_table_size(300)
    enc.set_max_table_size(250)
    assert _walk(enc.encode([]))[0] == [250]  # the smallest is the final one
    enc.set_max_table_size(1 << 20)  # we never keep more than 64 KiB, whatever the peer allows
    assert _walk(enc.encode([]))[0] == [65536] and enc.table_limit == 65536
    with pytest.raises(ValueError):
        enc.set_max_table_size(-1)


def test_encoder_literal_cache_turnover(encoder_type):
    """More distinct literals than the encoder caches: the cache is forgotten and refilled, nothing breaks."""
    enc, dec, oracle = encoder_type(), Decoder(), _oracle_decoder()
    for _ in range(2):
        for i in range(600):
            fields = [(b"content-length", b"%d" % i), (b":path", b"/q?i=%d" % (i % 300)), (b"x-a", b"1"),
                      (b"cookie", b"c=%d" % (i % 7))]
            block = enc.encode(fields)
            assert dec.decode(block) == (fields, None)
            assert [tuple(f) for f in oracle.decode(block, raw=True)] == fields
    assert enc.dynamic_table == dec.dynamic_table == [(b"x-a", b"1")]


def test_decoder_accepts_buffers():
    block = hx(C3[0])
    for buf in (bytearray(block), memoryview(block)):
        assert Decoder().decode(buf) == (C3_C4_FIELDS[0], None)


# --- Huffman ------------------------------------------------------------------------------------------------------

_ORACLE_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def test_huffman_zlib_path_is_active():
    assert h2_hpack._ZLIB_BASE is not None  # else only the state machine is being tested


def test_huffman_every_byte():
    for b in range(256):
        for s in (bytes((b,)), bytes((b,)) * 20):  # 20 copies: at least 13 coded bytes, the zlib path
            coded = huffman_encode(s)
            assert coded == _ORACLE_HUFFMAN.encode(s)
            assert huffman_decode(coded) == s
            assert h2_hpack._huffman_decode_py(coded) == s
    for s in (bytes(range(256)), bytes(range(255, -1, -1))):
        coded = huffman_encode(s)
        assert coded == _ORACLE_HUFFMAN.encode(s)
        assert huffman_decode(coded) == s


def test_huffman_random_strings():
    rng = random.Random(3)
    alphabets = [bytes(range(256)), TOKEN, VALUE, b"\x00\r\n\t \x7f\x80\xff\\{<", b"0123456789 "]
    for n in range(301):
        for alphabet in alphabets:
            s = bytes(rng.choice(alphabet) for _ in range(n))
            coded = huffman_encode(s)
            assert coded == _ORACLE_HUFFMAN.encode(s)
            assert huffman_decode(coded) == s
            assert h2_hpack._huffman_decode_py(coded) == s  # the state machine alone
            # the validity verdict that comes with the value, on both paths
            assert h2_hpack._huffman_value(coded) == (s, _field_ok(b"x", s))


def _pad(body: str, padding: str) -> bytes:
    """body then padding, which must end the string on a byte boundary."""
    assert (len(body) + len(padding)) % 8 == 0
    return int(body + padding, 2).to_bytes((len(body) + len(padding)) // 8, "big")


def _invalid_huffman(prefix_symbols: int) -> dict[str, bytes]:
    a = _code(ord("a"))  # 5 bits
    body = a * (prefix_symbols + 1)
    while not 1 <= -len(body) % 8 <= 4:  # padding too short to hold a whole code (5 bits at least)
        body += a
    pad = -len(body) % 8
    eos = "1" * 30
    return {
        "padding starts with 0": _pad(body, "0" + "1" * (pad - 1)),
        "padding ends with 0": _pad(body, "1" * (pad - 1) + "0"),
        "padding all zeros": _pad(body, "0" * pad),
        "padding of 8+ bits": _pad(body, "1" * (pad + 8)),
        "padding of 16+ bits": _pad(body, "1" * (pad + 16)),
        "a whole byte of padding": _pad(a * 8, "1" * 8),
        "EOS inside": _bits(a * prefix_symbols + eos + a),
        "EOS at the end": _bits(a * prefix_symbols + eos),
        "EOS first": _bits(eos + a * prefix_symbols),
        "truncated long code": _pad(body, "1" * pad) + b"\xff\xfe",  # 15 ones then a 0: a code prefix
    }


@pytest.mark.parametrize("prefix_symbols", [0, 1, 5, 30, 200])  # from the state machine only to zlib first
def test_huffman_invalid(prefix_symbols):
    for why, data in _invalid_huffman(prefix_symbols).items():
        with pytest.raises(hpack.HPACKDecodingError):
            oracle_huffman_decode(data)  # the case is really invalid
        with pytest.raises(HpackError) as e:
            huffman_decode(data)
        assert ("EOS symbol" if why.startswith("EOS") else "padding") in str(e.value), (why, str(e.value))
        with pytest.raises(HpackError):
            h2_hpack._huffman_decode_py(data)
        # ... and inside a header block, as a value and as a name
        with pytest.raises(HpackError):
            Decoder().decode(b"\x41" + _enc_int(len(data), 7, 0x80) + data)
        with pytest.raises(HpackError):
            Decoder().decode(b"\x40" + _enc_int(len(data), 7, 0x80) + data + b"\x00")


def test_huffman_random_bytes_against_oracle():
    """Arbitrary and slightly broken codings: accepted and decoded exactly when the oracle does."""
    rng = random.Random(11)
    for i in range(4000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        else:
            coded = bytearray(huffman_encode(bytes(rng.choice(VALUE) for _ in range(rng.randrange(1, 60)))))
            what = rng.randrange(4)
            if what == 0:
                coded[-1] ^= 1 << rng.randrange(8)
            elif what == 1:
                coded.append(rng.choice([0xFF, 0xFE, 0x7F, rng.randrange(256)]))
            elif what == 2:
                coded[rng.randrange(len(coded))] = 0xFF
            data = bytes(coded)
        try:
            want = oracle_huffman_decode(data)
        except hpack.HPACKDecodingError:
            want = None
        try:
            got = huffman_decode(data)
        except HpackError:
            got = None
        assert got == want, data.hex()


def test_huffman_error_is_linear_time():
    """A long string of long codes with bad padding: the error path must not be quadratic (a peer could
    make each such block cost seconds of CPU). Judged by how the CPU time grows with the input (4x the
    codes: about 4x the time if linear, 16x if quadratic), not by a wall-clock limit a busy machine
    would break; each size's best of three runs."""

    def cpu_seconds(codes: int) -> float:
        data = huffman_encode(b"\x01" * codes) + b"\x00"  # 28-bit codes, then padding of zeros
        block = b"\x41" + _enc_int(len(data), 7, 0x80) + data
        best = math.inf
        for _ in range(3):
            start = time.process_time()
            with pytest.raises(HpackError, match="padding"):
                huffman_decode(data)
            with pytest.raises(HpackError, match="padding"):
                Decoder().decode(block)
            best = min(best, time.process_time() - start)
        return best

    small, large = cpu_seconds(5_000), cpu_seconds(20_000)
    assert large < 8 * max(small, 1e-3), (small, large)


# --- decoding errors (connection errors) ----------------------------------------------------------------------

INVALID_BLOCKS = {
    "index 0": b"\x80",
    "index 0 after a field": b"\x82\x80",
    "index 62, empty table": b"\xbe",
    "index 127, long form": b"\xff\x00",
    "index far beyond": b"\xff\xff\xff\xff\x0f",
    "name index beyond (incremental)": b"\x7e" + _lit(b"v"),
    "name index beyond (without)": b"\x0f\x2f" + _lit(b"v"),
    "name index beyond (never)": b"\x1f\x2f" + _lit(b"v"),
    "truncated index": b"\xff",
    "truncated index continuation": b"\xff\x80",
    "truncated size update": b"\x3f",
    "truncated size update continuation": b"\x3f\xe1",
    "truncated name index": b"\x7f",
    "truncated name index (without)": b"\x0f",
    "truncated name index continuation": b"\x0f\x80",
    "truncated name length": b"\x40\x7f",
    "truncated value length": b"\x41\x7f\x80",
    "missing name": b"\x40",
    "missing value": b"\x41",
    "missing value after name": b"\x40" + _lit(b"x-a"),
    "integer overflow (index)": b"\xff" + b"\xff" * 10 + b"\x01",
    "integer overflow (2^32)": b"\xff" + _enc_int(1 << 32, 7, 0x80)[1:],
    "integer overflow (zero groups)": b"\x3f" + b"\x80" * 8 + b"\x00",
    "integer overflow (value length)": b"\x41\x7f\xff\xff\xff\xff\x7f",
    "name longer than the block": b"\x40\x05abc",
    "value longer than the block": b"\x41\x05ab",
    "huffman value longer than the block": b"\x41\x85ab",
    "long value longer than the block": b"\x41\x7f\x10" + b"x" * 100,
    "size update above the limit": _enc_int(4097, 5, 0x20),
    "size update above the limit, huge": b"\x3f\xff\xff\xff\xff\x0f",
    "size update after the first field": b"\x82\x20",
    "size update after a literal": b"\x41" + _lit(b"a") + b"\x20",
    "size update after an indexed dynamic field": b"\x40" + _lit(b"x-a") + _lit(b"1") + b"\xbe\x20",
    "bad huffman value": b"\x41\x81\x00",
    "EOS value": b"\x41\x84\xff\xff\xff\xff",
    "bad huffman name": b"\x40\x81\x00" + _lit(b"v"),
}


@pytest.mark.parametrize("block", INVALID_BLOCKS.values(), ids=INVALID_BLOCKS.keys())
def test_decoder_errors(block):
    with pytest.raises(HpackError):
        Decoder(max_table_size=4096).decode(block)
    with pytest.raises(hpack.HPACKError):  # the cases really are invalid
        hpack.Decoder().decode(block, raw=True)


def test_size_update_limits():
    assert Decoder(max_table_size=4096).decode(_enc_int(4096, 5, 0x20)) == ([], None)  # at the limit
    with pytest.raises(HpackError):
        Decoder(max_table_size=0).decode(b"\x21")
    dec = Decoder(max_table_size=4096)
    assert dec.decode(b"\x40" + _lit(b"x-a") + _lit(b"1")) == ([(b"x-a", b"1")], None)
    # several updates at the start: allowed; 0 empties the table
    assert dec.decode(b"\x20" + _enc_int(4096, 5, 0x20) + b"\x82") == ([(b":method", b"GET")], None)
    assert dec.dynamic_table == [] and dec.table_size == 0 and dec.table_limit == 4096
    with pytest.raises(HpackError):
        dec.decode(b"\xbe")  # the entry is gone
    # We lower our setting: the peer's next block must start with an update within it.
    dec = Decoder(max_table_size=4096)
    dec.decode(b"\x40" + _lit(b"x-a") + _lit(b"1"))  # 36 bytes
    dec.set_max_table_size(100)
    assert dec.max_table_size == 100
    with pytest.raises(HpackError):
        dec.decode(b"\xbe")
    dec = Decoder(max_table_size=4096)
    dec.decode(b"\x40" + _lit(b"x-a") + _lit(b"1"))
    dec.set_max_table_size(100)
    with pytest.raises(HpackError):
        dec.decode(_enc_int(101, 5, 0x20) + b"\xbe")
    dec = Decoder(max_table_size=4096)
    dec.decode(b"\x40" + _lit(b"x-a") + _lit(b"1"))
    dec.set_max_table_size(100)
    assert dec.decode(_enc_int(50, 5, 0x20) + b"\xbe") == ([(b"x-a", b"1")], None)
    assert dec.table_limit == 50 and dec.table_size == 36
    assert dec.decode(b"\xbe") == ([(b"x-a", b"1")], None)  # only the first block needs one
    # Raising our setting needs no update, and allows one up to it.
    dec.set_max_table_size(8192)
    assert dec.decode(b"\xbe") == ([(b"x-a", b"1")], None)
    assert dec.decode(_enc_int(8192, 5, 0x20)) == ([], None) and dec.table_limit == 8192
    with pytest.raises(ValueError):
        dec.set_max_table_size(-1)
    with pytest.raises(ValueError):
        Decoder(max_table_size=-1)


def test_eviction_rules():
    # Section 4.4: an entry larger than the table empties it and is not inserted (the field still decodes).
    dec = Decoder(max_table_size=100)
    dec.decode(b"\x40" + _lit(b"x-a") + _lit(b"1"))
    assert dec.decode(b"\x40" + _lit(b"x-big") + _lit(b"v" * 70)) == ([(b"x-big", b"v" * 70)], None)
    assert dec.dynamic_table == [] and dec.table_size == 0
    # A new entry may name the entry its insertion evicts: the name is read before eviction.
    dec = Decoder(max_table_size=36)
    dec.decode(b"\x40" + _lit(b"x-a") + _lit(b"1"))
    assert dec.decode(b"\x7e" + _lit(b"2")) == ([(b"x-a", b"2")], None)
    assert dec.dynamic_table == [(b"x-a", b"2")] and dec.table_size == 36
    oracle = _oracle_decoder(36)
    oracle.decode(b"\x40" + _lit(b"x-a") + _lit(b"1"))
    assert oracle.decode(b"\x7e" + _lit(b"2"), raw=True) == [(b"x-a", b"2")]
    # Eviction of entries reachable by one-byte indices, then an index into the freed range.
    dec = Decoder(max_table_size=4096)
    dec.decode(b"".join(b"\x40" + _lit(b"n%02d" % i) + _lit(b"v") for i in range(80)))  # 80 x 36 bytes
    assert dec.decode(b"\xbe\xff\x00") == ([(b"n79", b"v"), (b"n14", b"v")], None)
    dec.set_max_table_size(36 * 10)
    assert dec.decode(_enc_int(360, 5, 0x20) + b"\xc7") == ([(b"n70", b"v")], None)
    with pytest.raises(HpackError):
        dec.decode(b"\xc8")


# --- RFC 9113 section 8.2.1: reported, not raised ----------------------------------------------------------------

MALFORMED = [
    (b"X-Upper", b"v"), (b"x-Upper", b"v"), (b"has space", b"v"), (b"a:b", b"v"), (b"x-a:", b"v"), (b"", b"v"),
    (b"::a", b"v"), (b"x-a\x00", b"v"), (b"x-a", b"a\0b"), (b"x-a", b"a\rb"), (b"x-a", b"a\nb"), (b"x-a", b"\0"),
    (b"x-a", b" v"), (b"x-a", b"v "), (b"x-a", b"\tv"), (b"x-a", b"v\t"), (b"x-a", b" "), (b"x-a", b"\t"),
    (b"x-a", b" " + b"v" * 30), (b"x-a", b"v" * 30 + b" "), (b"x-a", b"v" * 30 + b"\0" + b"v" * 30),
    (b"x-a", b"\t" + b"v" * 30), (b"x-a", b"v" * 30 + b"\r\n"),
]


@pytest.mark.parametrize("rep", [0x40, 0x00, 0x10], ids=["incremental", "without", "never"])
@pytest.mark.parametrize("huffman", [False, True])
@pytest.mark.parametrize("name, value", MALFORMED)
def test_field_problems(name, value, huffman, rep):
    assert not _field_ok(name, value)
    dec = Decoder()
    block = b"\x82" + bytes((rep,)) + _lit(name, huffman) + _lit(value, huffman) + b"\x84"
    fields, problem = dec.decode(block)
    assert fields == [(b":method", b"GET"), (name, value), (b":path", b"/")]
    assert problem is not None and problem.startswith("field 2:")
    if rep != 0x40:
        assert dec.dynamic_table == []
        return
    # The entry went into the table anyway: the next blocks, by index and by name, still decode.
    assert dec.dynamic_table == [(name, value)]
    fields, problem = dec.decode(b"\x82\xbe")
    assert fields == [(b":method", b"GET"), (name, value)] and problem.startswith("field 2:")
    fields, problem = dec.decode(b"\x0f\x2f" + _lit(b"ok", huffman))  # name of entry 62, a good value
    assert fields == [(name, b"ok")]
    assert (problem is None) == _field_ok(name, b"ok")
    assert dec.decode(b"\x82\x84") == ([(b":method", b"GET"), (b":path", b"/")], None)


def test_field_problem_static_name_and_first_only():
    dec = Decoder()
    fields, problem = dec.decode(b"\x04" + _lit(b"/a\nb") + b"\x40" + _lit(b"Bad") + _lit(b"v"))
    assert fields == [(b":path", b"/a\nb"), (b"Bad", b"v")] and problem.startswith("field 1:")
    fields, problem = dec.decode(b"\x82" + b"\x41" + _lit(b"secret-token\0"))
    assert fields == [(b":method", b"GET"), (b":authority", b"secret-token\0")]
    assert "secret-token" not in problem  # values may be credentials: not quoted
    fields, problem = dec.decode(b"\xbf")  # entry 63 is "Bad: v"; 62 is the :authority
    assert fields == [(b"Bad", b"v")] and problem.startswith("field 1:")


def test_good_fields_have_no_problem():
    dec = Decoder()
    good = [(b"x-a", b""), (b"x-a", b"v v"), (b"x-a", b"\x80\xff\x7f\x01"), (b":x", b"v"),
            (b"!#$%&'*+-.^_`|~09az", b"v"), (b"x-a", b"v\tv"), (b"x-a", b'"quoted, with ; stuff"')]
    for huffman in (False, True):
        block = b"".join(b"\x40" + _lit(n, huffman) + _lit(v, huffman) for n, v in good)
        assert dec.decode(block) == (good, None)
        assert dec.decode(b"".join(bytes((0x80 | i,)) for i in range(62, 62 + len(good)))) == (good[::-1], None)


# --- the header list limit (RFC 9113 section 6.5.2) ---------------------------------------------------------------


def test_header_list_too_large_keeps_the_table_in_step():
    fields = [(b"x-%d" % i, b"v" * 5) for i in range(6)]  # 40 bytes each
    block = b"".join(b"\x40" + _lit(n) + _lit(v) for n, v in fields)
    assert Decoder(max_header_list_size=240).decode(block) == (fields, None)  # exactly at the limit
    dec = Decoder(max_header_list_size=239)
    with pytest.raises(HeaderListTooLarge) as e:
        dec.decode(block)
    assert (e.value.size, e.value.limit) == (240, 239)
    assert dec.dynamic_table == fields[::-1] and dec.table_size == 240
    # The next block references entries the refused block inserted.
    assert dec.decode(b"\xbe\xc3\x82") == ([fields[5], fields[0], (b":method", b"GET")], None)
    # A refused block with a malformed field and a size update still updates the table.
    dec = Decoder(max_header_list_size=100)
    with pytest.raises(HeaderListTooLarge):
        dec.decode(b"\x3f\xe1\x01" + b"\x40" + _lit(b"X-Bad") + _lit(b"v" * 100))  # update to 256
    assert dec.table_limit == 256 and dec.dynamic_table == [(b"X-Bad", b"v" * 100)]
    dec.max_header_list_size = 1000
    fields, problem = dec.decode(b"\xbe")
    assert fields == [(b"X-Bad", b"v" * 100)] and problem.startswith("field 1:")


def test_header_list_bomb():
    """One big entry referenced by one byte, thousands of times: refused, counted exactly."""
    dec = Decoder(max_header_list_size=64 * 1024)
    with pytest.raises(HeaderListTooLarge) as e:
        dec.decode(b"\x40" + _lit(b"x-big") + _lit(b"v" * 4000) + b"\xbe" * 5000)
    assert e.value.size == 5001 * (5 + 4000 + 32)
    assert dec.decode(b"\x82") == ([(b":method", b"GET")], None)
    assert dec.dynamic_table == [(b"x-big", b"v" * 4000)]


@pytest.mark.parametrize("huffman", [False, True])
def test_header_list_size_counts_decoded_bytes(huffman):
    value = b"0" * 1000  # Huffman: 5 bits each, 625 bytes on the wire
    block = b"\x00" + _lit(b"x-a", huffman) + _lit(value, huffman)
    size = 3 + 1000 + 32
    assert Decoder(max_header_list_size=size).decode(block) == ([(b"x-a", value)], None)
    with pytest.raises(HeaderListTooLarge) as e:
        Decoder(max_header_list_size=size - 1).decode(block)
    assert e.value.size == size


# --- bounded memory: caches keyed by peer input ------------------------------------------------------------------


def test_module_name_caches_keep_no_long_names(encoder_type):
    """The name caches are module-wide and keyed by peer input: long names must not be kept."""
    dec = Decoder(max_header_list_size=BIG)
    enc = encoder_type(huffman=True)
    for i in range(50):
        name = b"x-%d-" % i + b"n" * 10000
        assert dec.decode(b"\x00" + _lit(name) + _lit(b"v")) == ([(name, b"v")], None)
        assert dec.decode(b"\x00" + _lit(name.upper()) + _lit(b"v"))[1] is not None
        assert dec.decode(enc.encode([(name, b"v")]))[0] == [(name, b"v")]
        assert dec.decode(encoder_type().encode([(b"x-%d" % i, b"v"), (name, b"w")]))[0] == \
            [(b"x-%d" % i, b"v"), (name, b"w")]
    assert all(len(name) <= 64 for name in h2_hpack._NAME_ERRORS)
    # the pure encoder's policy cache (the native one keeps none: its policies are a fixed dict)
    assert all(len(name) <= 64 for cache in h2_hpack._POLICIES for name in cache)
    PureEncoder().encode([(b"x-short", b"v")])
    assert b"x-short" in h2_hpack._POLICIES[False]  # short names still are cached


def test_encoder_literal_cache_is_bounded_in_bytes(encoder_type):
    enc, dec = encoder_type(), Decoder(max_header_list_size=BIG)
    for i in range(300):  # cookies are cached literals (never indexed); 300 distinct ones of 20 KB
        fields = [(b"cookie", b"%d=" % i + b"c" * 20000), (b"content-length", b"%d" % i)]
        assert dec.decode(enc.encode(fields)) == (fields, None)
        cached = enc._fixed[len(STATIC_TABLE):]
        assert enc._fixed_bytes == sum(map(len, cached)) <= h2_hpack._FIXED_CACHE_BYTES
    big = [(b"cookie", b"b" * 100000)]  # larger than the whole budget: sent, not cached
    for _ in range(2):
        block = enc.encode(big)
        assert _walk(block)[1] == ["never"]
        assert dec.decode(block) == (big, None)
    assert big[0] not in enc._index
    # small recurring literals are still cached and still right
    for _ in range(3):
        fields = [(b"cookie", b"a=1"), (b"content-length", b"0")]
        assert dec.decode(enc.encode(fields)) == (fields, None)
    assert fields[0] in enc._index and fields[1] in enc._index


def test_decoder_string_cache_is_bounded():
    dec = Decoder(max_header_list_size=BIG)
    for i in range(2000):
        value = b"value-%d" % i
        assert dec.decode(b"\x00" + _lit(b"x-a") + _lit(value, True)) == \
            ([(b"x-a", value)], None)
        assert len(dec._strings) <= h2_hpack._STRING_CACHE_MAX
    long_value = b"v" * 200
    dec.decode(b"\x00" + _lit(b"x-a") + _lit(long_value, True))
    assert all(len(key) <= h2_hpack._STRING_CACHE_LEN for key in dec._strings)


def test_never_indexed_fields_are_reported_and_can_be_sent_so_again(encoder_type):
    """RFC 7541 section 7.1.3: an intermediary forwards a field it received never indexed as never
    indexed. The decoder says which fields of the last block were; the encoder sends them so."""
    import hpack as oracle

    peer = oracle.Encoder()
    ours_in = Decoder()
    secret = oracle.NeverIndexedHeaderTuple(b"x-api-key", b"s3cret")
    for _ in range(2):  # the second time too: never indexed, so never in the peer's table
        block = peer.encode([(b":method", b"GET"), secret, (b"accept", b"*/*")])
        fields, problem = ours_in.decode(block)
        assert problem is None and (b"x-api-key", b"s3cret") in fields
        assert ours_in.never_indexed == frozenset({(b"x-api-key", b"s3cret")})
    ours_in.decode(peer.encode([(b"accept", b"*/*")]))
    assert ours_in.never_indexed is None, "reset per block"

    for huffman in (False, True):
        ours_out = encoder_type(huffman=huffman)
        far = oracle.Decoder()
        ours_out.set_max_table_size(2048)  # a pending size update must still come first
        fields = [(b":method", b"GET"), (b"x-api-key", b"s3cret"), (b"accept", b"*/*"), (b"x-api-key", b"other")]
        sensitive = frozenset({(b"x-api-key", b"s3cret")})
        for _ in range(2):
            got = far.decode(ours_out.encode(fields, sensitive), raw=True)
            assert [tuple(f) for f in got] == fields
            kinds = [type(f).__name__ for f in got]
            assert kinds[1] == "NeverIndexedHeaderTuple" and kinds[3] == "HeaderTuple", kinds
        assert all(entry[0] != b"x-api-key" or entry[1] != b"s3cret" for entry in ours_out.dynamic_table)
        # the name is in the table (from the indexed x-api-key: other): the never-indexed literal uses it
        assert (b"x-api-key", b"other") in ours_out.dynamic_table
