"""HPACK (RFC 7541): turns HTTP/2 header blocks into lists of (name, value) bytes pairs and back.

One job: header compression for our HTTP/2 layer. No framing (the caller joins HEADERS + CONTINUATION
payloads into one block first), no HTTP semantics beyond the RFC 9113 section 8.2.1 field checks that
must run on every decoded field, and which this module caches per table entry so they cost nothing on
the common path.

Theory of operation
-------------------
Cost model: on CPython one bytecode costs about 50 machine instructions and a call a thousand, so the
budget per field is a few dozen bytecodes; everything per *byte* must happen inside C (bytes methods,
dict lookups, zlib), never in a Python loop.

Decoder. The static table (Appendix A) and the dynamic table live in ONE list, `_t`: index 0 is a
hole, 1..61 are the static entries, 62.. the dynamic entries newest first, so the wire index IS the
list index (section 2.3.3) and an indexed field is one list subscript. Inserting is `list.insert(62,
entry)` (a memmove of at most a few hundred pointers), evicting is `list.pop()` from the end (section
4.4). Each entry is a tuple (pair, size, error, name_error): `pair` is the (name, value) tuple handed
to the caller as is (no copy), `size` its RFC 7541 section 4.1 size (which is also its RFC 9113 section
6.5.2 header-list size), `error` the section 8.2.1 verdict computed once when the field entered the
table, `name_error` the verdict on the name alone (for literals that reuse the name by index). Static
entries are known valid. So an indexed field costs a subscript, an append and an addition; only
literal strings are ever looked at byte by byte, and that is done by C code:
- validity: one compiled regex per name (cached per distinct name) and a few bytes operations per value;
- Huffman (section 5.2): a table-driven state machine, 8 input bits per step, built once at import
  from the code table typed in below (Appendix B): state = internal node of the code tree, entry =
  (bytes emitted, next state). Running that loop in Python costs about 640 instructions per input
  byte, so strings of 12 bytes and more go through zlib instead: HPACK's code is canonical, exactly
  like DEFLATE's, so a raw-DEFLATE dynamic block header that declares HPACK's code lengths turns
  zlib's inflate into an HPACK Huffman decoder (bits reversed per byte, since DEFLATE packs bits
  LSB first). DEFLATE codes stop at 15 bits: every HPACK code longer than that starts with fifteen
  1s, and that 15-bit prefix is given to DEFLATE's end-of-block symbol, so a string containing such
  a symbol (control characters, bytes >= 0x80, backslash) or EOS ends the block early, and is
  decoded again by the state machine, which also owns every error message. Padding (section 5.2:
  at most 7 bits, all ones) is checked by feeding fifteen 1 bits and a 0 after the string: the
  block ends there if and only if the bits left over were all ones (see _huffman_decode). A decoded-string cache catches strings that repeat as literals.
  The whole block is processed even when it is malformed under section 8.2.1 or exceeds the header
  list limit, so the dynamic table always stays in step with the peer's encoder; those two are
  reported after the fact (return value, HeaderListTooLarge), only real decoding faults raise
  HpackError, which is a connection error (COMPRESSION_ERROR) because the table is then lost.

Encoder. One dict maps each (name, value) the encoder knows to an int: the absolute insertion number
of its dynamic entry (>= 0: the n-th field ever inserted, whose wire index is 61 + inserted - n, so
nothing is renumbered on insert), or ~i (< 0) for a representation that never changes, kept in a
list: static full matches, and the literals of recurring non-indexed fields (content-length: 0). So
every field costs one dict lookup and one append of precomputed bytes; only a field seen for the
first time is assembled. Per name a policy is cached (section 6.2):
- values that change on every request (x-request-id, trace ids: FRESH_NAMES) are literals without
  indexing (6.2.2), their name by index: the first such field of a connection is inserted, to give
  the name an index (one entry per name, not one per request);
- content-length, date and a :path with a query are literals without indexing;
- credentials (authorization, proxy-authorization, cookie, set-cookie) are never indexed (6.2.3);
- everything else is indexed incrementally (6.2.1), with a static or dynamic name index when a table
  has the name, unless the entry would take over half the table.
Strings go out as plain octets: Huffman coding in Python costs ~20k instructions for a 36-byte value
against ~0 for plain (measured), for a literal 20-25% smaller, which for indexed fields is sent once
per connection anyway; `Encoder(huffman=True)` Huffman-codes each string that gets shorter (in C a
few instructions per byte).

Two encoders, one behaviour. `Encoder` is the native one (native/hpack_encoder.c, proxy.l7._hpack_c)
when it was built, else `PureEncoder`, written out below; TRIOMESH_PURE_HPACK=1 in the environment
forces the pure one, and IMPLEMENTATION says which is in use ("native" or "pure"). The C encoder keeps
PureEncoder's state in the same shapes (the dict, the list of representations, the entries oldest
first, the same caps), takes its tables from this module (native_encoder() hands them over), and
writes the same bytes for any sequence of calls; the tests drive both with the same random calls and
compare bytes, tables, caches and generations, PureEncoder being the oracle. In Python the encoder
was the largest single Python function of an h2c -> h2c request (~330 bytecodes for its two blocks);
a 9-field request block costs ~14k instructions in Python, ~4.9k in C, two thirds of them the dict
lookups (tuple hash and compare).

The decoder is Python only. A C port would keep the same shapes: one entry array indexed by wire
index, a 257x256 transition table for Huffman.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import deque
from itertools import chain

__all__ = ["IMPLEMENTATION", "Decoder", "Encoder", "HeaderListTooLarge", "HpackError", "PureEncoder", "STATIC_TABLE",
           "native_encoder"]

Fields = list[tuple[bytes, bytes]]


class HpackError(Exception):
    """The block is not valid HPACK: an HTTP/2 connection error of type COMPRESSION_ERROR (RFC 9113
    section 4.3). The decoder's dynamic table is no longer usable afterwards."""


class HeaderListTooLarge(Exception):
    """The decoded header list is larger than max_header_list_size (RFC 9113 section 6.5.2: the sum of
    len(name) + len(value) + 32 per field). Raised only after the whole block was processed, so the
    dynamic table is still in step with the peer: the caller may refuse just this stream (e.g. 431 or
    RST_STREAM) and keep the connection."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"header list of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


# --- RFC 7541 Appendix A: the static table (index 1..61) ------------------------------------------------------

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"), (b":status", b"200"),
    (b":status", b"204"), (b":status", b"206"), (b":status", b"304"), (b":status", b"400"),
    (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""), (b"access-control-allow-origin", b""),
    (b"age", b""), (b"allow", b""), (b"authorization", b""), (b"cache-control", b""),
    (b"content-disposition", b""), (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""), (b"cookie", b""),
    (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""), (b"last-modified", b""),
    (b"link", b""), (b"location", b""), (b"max-forwards", b""), (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""), (b"range", b""), (b"referer", b""), (b"refresh", b""),
    (b"retry-after", b""), (b"server", b""), (b"set-cookie", b""), (b"strict-transport-security", b""),
    (b"transfer-encoding", b""), (b"user-agent", b""), (b"vary", b""), (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_LEN = len(STATIC_TABLE)  # 61; dynamic indices start at 62 (section 2.3.3)
assert _STATIC_LEN == 61

# --- RFC 7541 Appendix B: the Huffman code, (code, bit length) for symbols 0..255 and EOS (256) ----------------

HUFFMAN_CODE: tuple[tuple[int, int], ...] = (
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28),  # 0
    (0xfffffe4, 28), (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28),  # 4
    (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),  # 8
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28),  # 12
    (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),  # 16
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),  # 20
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28),  # 24
    (0xffffff8, 28), (0xffffff9, 28), (0xffffffa, 28), (0xffffffb, 28),  # 28
    (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),  # 32 ' ' '!' '"' '#'
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),  # 36 '$' '%' '&' "'"
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11),  # 40 '(' ')' '*' '+'
    (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),  # 44 ',' '-' '.' '/'
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6),  # 48 '0' '1' '2' '3'
    (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6),  # 52 '4' '5' '6' '7'
    (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),  # 56 '8' '9' ':' ';'
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10),  # 60 '<' '=' '>' '?'
    (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7),  # 64 '@' 'A' 'B' 'C'
    (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),  # 68 'D' 'E' 'F' 'G'
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7),  # 72 'H' 'I' 'J' 'K'
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),  # 76 'L' 'M' 'N' 'O'
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),  # 80 'P' 'Q' 'R' 'S'
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7),  # 84 'T' 'U' 'V' 'W'
    (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13),  # 88 'X' 'Y' 'Z' '['
    (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),  # 92 '\' ']' '^' '_'
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),  # 96 '`' 'a' 'b' 'c'
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6),  # 100 'd' 'e' 'f' 'g'
    (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),  # 104 'h' 'i' 'j' 'k'
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5),  # 108 'l' 'm' 'n' 'o'
    (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5),  # 112 'p' 'q' 'r' 's'
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),  # 116 't' 'u' 'v' 'w'
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15),  # 120 'x' 'y' 'z' '{'
    (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28),  # 124 '|' '}' '~' DEL
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),  # 128
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23),  # 132
    (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),  # 136
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),  # 140
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23),  # 144
    (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23),  # 148
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),  # 152
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),  # 156
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22),  # 160
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),  # 164
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24),  # 168
    (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23),  # 172
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),  # 176
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23),  # 180
    (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22),  # 184
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),  # 188
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19),  # 192
    (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),  # 196
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),  # 200
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25),  # 204
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27),  # 208
    (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),  # 212
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),  # 216
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27),  # 220
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),  # 224
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23),  # 228
    (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25), (0x1ffffef, 25),  # 232
    (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),  # 236
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26),  # 240
    (0x7ffffe7, 27), (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27),  # 244
    (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),  # 248
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26),  # 252
    (0x3fffffff, 30),  # 256 EOS
)
_EOS = 256


def _check_canonical() -> None:
    """The code is canonical (codes of each length consecutive, in symbol order, right after the shorter
    ones): the zlib fast path below depends on it, and it catches a mistyped entry."""
    code, length = -1, 0
    for sym in sorted(range(257), key=lambda s: (HUFFMAN_CODE[s][1], s)):
        want, n = HUFFMAN_CODE[sym]
        code = (code + 1) << (n - length)
        length = n
        assert want == code, f"Huffman code of symbol {sym} mistyped"
    assert code == (1 << 30) - 1  # complete: the last code is all ones


_check_canonical()

# --- Huffman decoding: the 8-bits-a-step state machine (section 5.2) --------------------------------------------


def _build_huffman_decoder() -> tuple[list[int], list[bytes], frozenset[int]]:
    """(next state, bytes emitted) per (state, input byte), as two flat lists indexed by state * 256 +
    byte (states are kept multiplied by 256), and the accepting end states. Two flat lists of shared
    objects take 1.7 MB; a list of (emitted, next) tuples would take 8 MB for 8% fewer instructions."""
    # The code tree: internal nodes 0.. (0 = root); a child is a node number, or ~symbol for a leaf.
    kids: list[list[int | None]] = [[None, None]]
    for sym, (code, n) in enumerate(HUFFMAN_CODE):
        node = 0
        for i in range(n - 1, 0, -1):
            bit = (code >> i) & 1
            nxt = kids[node][bit]
            if nxt is None:
                kids.append([None, None])
                nxt = kids[node][bit] = len(kids) - 1
            node = nxt  # type: ignore[assignment]
        kids[node][code & 1] = ~sym
    nodes = len(kids)  # 256 internal nodes for 257 leaves
    err = nodes  # one more state: EOS was decoded; it never leaves
    # 4 bits at a time first (cheap to build), then 8 bits as two 4-bit steps.
    nibble: list[tuple[tuple[int, ...], int]] = []
    for node in range(nodes):
        for x in range(16):
            out, s = [], node
            for i in (3, 2, 1, 0):
                child = kids[s][(x >> i) & 1]
                assert child is not None
                if child >= 0:
                    s = child
                elif ~child == _EOS:
                    s = err
                    break
                else:
                    out.append(~child)
                    s = 0
            nibble.append((tuple(out), s))
    shifted = [s << 8 for s in range(nodes + 1)]  # shared int objects
    emitted: dict[tuple[int, ...], bytes] = {}
    nxt_table: list[int] = []
    emit_table: list[bytes] = []
    for node in range(nodes):
        for hi in range(16):
            out1, s1 = nibble[node * 16 + hi]
            for lo in range(16):
                out, s = (), err
                if s1 != err:
                    out2, s2 = nibble[s1 * 16 + lo]
                    if s2 != err:
                        out, s = out1 + out2, s2
                nxt_table.append(shifted[s])
                emit_table.append(emitted.get(out) or emitted.setdefault(out, bytes(out)))
    nxt_table.extend([shifted[err]] * 256)
    emit_table.extend([b""] * 256)
    # Accepting end states (section 5.2): at most 7 bits into the all-ones path, i.e. a prefix of EOS.
    accept, node = [0], 0
    for _ in range(7):
        node = kids[node][1]  # type: ignore[assignment]
        accept.append(node << 8)
    return nxt_table, emit_table, frozenset(accept)


_HUFF_NEXT, _HUFF_EMIT, _HUFF_ACCEPT = _build_huffman_decoder()


def _huffman_decode_py(data: bytes) -> bytes:
    """The reference decoder (and the fallback of the zlib one): one table step per input byte."""
    state = 0
    nxt, emitted = _HUFF_NEXT, _HUFF_EMIT
    parts: list[bytes] = []
    emit = parts.append
    for byte in data:
        i = state + byte
        emit(emitted[i])
        state = nxt[i]
    if state not in _HUFF_ACCEPT:
        raise HpackError(_huffman_fault(data))
    return b"".join(parts)


# Every code as a string of "0"/"1" -> its symbol, for _huffman_fault.
_CODE_OF_BITS = {f"{code:0{n}b}": sym for sym, (code, n) in enumerate(HUFFMAN_CODE)}
_BYTE_BITS = [f"{b:08b}" for b in range(256)]


def _huffman_fault(data: bytes) -> str:
    """Why a Huffman string does not decode: walk it bit by bit (error path only).

    Linear in len(data): the bits are one str, sliced at most 30 characters at a time. (It used to
    shift the whole string, as one int, once per code length tried per symbol: quadratic, so a peer
    could make one block with a long badly padded string cost seconds of CPU.)"""
    bits = "".join(map(_BYTE_BITS.__getitem__, data))
    total = len(bits)
    pos = 0
    codes = _CODE_OF_BITS
    while pos < total:
        for n in range(5, 31):
            if pos + n > total:
                if "0" in bits[pos:]:
                    return "invalid Huffman padding (not a prefix of EOS)"
                return "invalid Huffman padding (longer than 7 bits)"
            sym = codes.get(bits[pos:pos + n])
            if sym is not None:
                if sym == _EOS:
                    return "EOS symbol inside a Huffman string"
                pos += n
                break
    return "invalid Huffman string"  # not reached for strings the state machine refused


# --- Huffman decoding through zlib: inflate with a DEFLATE block header declaring HPACK's code -----------------

_BITREV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))
_ZLIB_MIN = 12  # below this many bytes the state machine is cheaper than setting up inflate


def _deflate_header() -> bytes:
    """A raw-DEFLATE (RFC 1951 section 3.2.7) final dynamic block header whose literal code is HPACK's
    for every symbol of at most 15 bits, and whose end-of-block symbol (256) is the 15-bit all-ones
    prefix shared by all longer HPACK codes. Canonical codes on both sides make the codes identical.
    Chosen to end on a byte boundary, so string bytes can follow it directly."""
    lengths = [n if n <= 15 else 0 for code, n in HUFFMAN_CODE[:256]] + [15] + [0]  # 257 literal + 1 distance
    used = sorted(set(lengths))  # code lengths 0, 5..8, 10..15: eleven symbols of the code-length code
    counts = {n: lengths.count(n) for n in used}
    order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]
    # The code-length code: five symbols of 3 bits, six of 4 (complete: 5/8 + 6/16 = 1); pick which
    # five so the header is a whole number of bytes.
    for mask in range(1 << len(used)):
        three = [n for i, n in enumerate(used) if mask >> i & 1]
        if len(three) != 5:
            continue
        cl = {n: 3 if n in three else 4 for n in used}
        bits = 3 + 5 + 5 + 4 + 3 * 19 + sum(counts[n] * cl[n] for n in used)
        if bits % 8 == 0:
            break
    else:  # pragma: no cover - there is always one
        raise AssertionError("no byte-aligned DEFLATE header")
    ccode, code = {}, 0  # canonical codes of the code-length code
    for n in (3, 4):
        for sym in sorted(s for s in used if cl[s] == n):
            ccode[sym] = code
            code += 1
        code <<= 1
    acc = nbits = 0

    def put(value: int, n: int) -> None:  # DEFLATE packs values LSB first
        nonlocal acc, nbits
        acc |= value << nbits
        nbits += n

    put(1, 1)  # BFINAL
    put(2, 2)  # BTYPE = dynamic Huffman
    put(257 - 257, 5)  # HLIT
    put(1 - 1, 5)  # HDIST
    put(19 - 4, 4)  # HCLEN
    for sym in order:
        put(cl.get(sym, 0), 3)
    for n in lengths:  # Huffman codes go MSB first
        for i in range(cl[n] - 1, -1, -1):
            put((ccode[n] >> i) & 1, 1)
    assert nbits == bits
    return acc.to_bytes(bits // 8, "little")


def _zlib_base():
    try:
        base = zlib.decompressobj(-9)
        if base.decompress(_deflate_header()) != b"" or base.eof:
            return None
        return base
    except zlib.error:  # pragma: no cover
        return None


_ZLIB_BASE = _zlib_base()
if _ZLIB_BASE is None:  # pragma: no cover - zlib refused the header: the state machine does it all
    _ZLIB_MIN = 1 << 62


_ZLIB_END = b"\xff\x7f"  # fifteen 1 bits then a 0 (bit-reversed): see _huffman_value


def _huffman_value(data: bytes) -> tuple[bytes, bool]:
    """Decode a Huffman string (section 5.2), raising HpackError for EOS or bad padding; with it, whether
    it is a valid field value (RFC 9113 section 8.2.1: no NUL, CR or LF, no SP or HTAB at either end).

    The zlib path feeds the string and then fifteen 1 bits and a 0. If the bits left after the last
    symbol are all ones (r <= 7 of them), they and the first 15 - r of ours form the 15-bit
    end-of-block code: the stream ends, with at most one byte of ours unused. If they are not (a
    partial code with a 0 in it), completing it eats at least one of our 1s, so fifteen 1s never
    again stand at a code boundary: the stream does not end. A code over 15 bits or EOS in the
    string ends the stream early, leaving our two bytes unused. That r <= 7 needs a last byte other
    than 0xff (else the last byte could be all padding); for 0xff, a symbol must end in it.
    What zlib decodes has no CR, LF or HTAB (their codes are over 15 bits), which shortens the check."""
    if len(data) >= _ZLIB_MIN:
        inflate = _ZLIB_BASE.copy()  # type: ignore[union-attr]
        if data[-1] != 0xFF:
            out = inflate.decompress(data.translate(_BITREV) + _ZLIB_END)
            last = True
        else:
            out = inflate.decompress(data[:-1].translate(_BITREV))
            last = inflate.decompress(b"\xff" + _ZLIB_END)  # must not be empty
            out += last
        if last and inflate.eof and len(inflate.unused_data) <= 1:  # then out is not empty
            return out, not (0 in out or out[0] == 32 or out[-1] == 32)
    value = _huffman_decode_py(data)
    return value, not (value and (0 in value or 13 in value or 10 in value or value[0] in _SP_HTAB
                                  or value[-1] in _SP_HTAB))


def _huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman string (section 5.2), raising HpackError for EOS or bad padding."""
    return _huffman_value(data)[0]


# --- Huffman encoding (optional, Encoder(huffman=True)) ----------------------------------------------------------

_CODE_BITS = [f"{code:0{n}b}" for code, n in HUFFMAN_CODE[:256]]
_PAD_BITS = ["1" * i for i in range(8)]  # padding: the most significant bits of EOS (section 5.2)


def huffman_encode(data: bytes) -> bytes:
    """The Huffman coding of `data` (section 5.2), padded with ones to a whole byte."""
    if not data:
        return b""
    bits = "".join(map(_CODE_BITS.__getitem__, data))
    pad = -len(bits) & 7
    return int(bits + _PAD_BITS[pad], 2).to_bytes((len(bits) + pad) >> 3, "big")


def huffman_decode(data: bytes) -> bytes:
    """Public form of the decoder, for tests and tools."""
    return _huffman_decode(bytes(data))


# --- integers and strings (sections 5.1, 5.2) --------------------------------------------------------------------

_MAX_INT = 1 << 32  # larger integers are refused (nothing in HTTP/2 needs them)


def _decode_int(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """Continuation bytes of an integer whose prefix was all ones (`value` = 2^N - 1), from data[pos]."""
    shift = 0
    while True:
        try:
            byte = data[pos]
        except IndexError:
            raise HpackError("truncated integer") from None
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= _MAX_INT:
                raise HpackError("integer overflow")
            return value, pos
        shift += 7
        if shift > 28:  # a sixth continuation byte: above 2^32, or padded with zero groups
            raise HpackError("integer overflow")


def _encode_int(value: int, prefix_max: int, flags: int) -> bytes:
    """An integer with an N-bit prefix (prefix_max = 2^N - 1) OR-ed with the representation's flags."""
    if value < prefix_max:
        return bytes((flags | value,))
    out = [flags | prefix_max]
    value -= prefix_max
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_string(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """A string literal (section 5.2) starting at data[pos]: (octets, position after it)."""
    first = data[pos]
    n = first & 0x7F
    pos += 1
    if n == 0x7F:
        n, pos = _decode_int(data, pos, 0x7F)
    s = data[pos:pos + n]
    pos += n
    if pos > end:
        raise HpackError("truncated string")
    if first & 0x80:
        s = _huffman_decode(s)
    return s, pos


# --- RFC 9113 section 8.2.1 field checks ------------------------------------------------------------------------

_NAME_OK = re.compile(rb":?[!#$%&'*+\-.^_`|~0-9a-z]+").fullmatch
_SP_HTAB = frozenset(b" \t")
_NAME_ERRORS: dict[bytes, str | None] = {}  # name -> verdict; names are few, values are not
# Longest name kept in the module-wide name caches (_NAME_ERRORS, _POLICIES). They are keyed by peer
# input and shared by all connections: 4096 keys of up to a whole header block each could pin
# hundreds of MB. Real names are short; a longer one is simply checked (or assessed) again.
_NAME_CACHE_LEN = 64


def _name_error(name: bytes) -> str | None:
    err = _NAME_ERRORS.get(name, 0)
    if err != 0:
        return err  # type: ignore[return-value]
    if _NAME_OK(name):
        err = None
    elif not name:
        err = "empty field name"
    else:
        err = f"field name {name[:40]!r} is not lowercase token characters (or a pseudo-header)"
    if len(name) <= _NAME_CACHE_LEN:  # bounded memory: see _NAME_CACHE_LEN
        if len(_NAME_ERRORS) >= 4096:
            _NAME_ERRORS.clear()
        _NAME_ERRORS[name] = err
    return err


def _value_error(name: bytes, value: bytes) -> str | None:
    """Section 8.2.1: no NUL, CR or LF; no leading or trailing SP or HTAB. The value is not quoted in
    the description (it may be a credential)."""
    if 0 in value or 13 in value or 10 in value:
        return f"value of {name[:40]!r} contains NUL, CR or LF"
    if value and (value[0] in _SP_HTAB or value[-1] in _SP_HTAB):
        return f"value of {name[:40]!r} starts or ends with whitespace"
    return None


# --- Decoder ----------------------------------------------------------------------------------------------------

# Entries of the full table: (pair, size, error, name_error); see the theory of operation.
_STATIC_ENTRIES = [None] + [(pair, len(pair[0]) + len(pair[1]) + 32, None, None) for pair in STATIC_TABLE]
_FIRST_DYNAMIC = _STATIC_LEN + 1  # 62
# The one-byte index table: position 0x80 | i holds the pair at wire index i (i <= 126) if that entry
# is valid, else None; positions 0..0x80 (literals, updates, index 0) and 0xff (long index) hold None.
_ONE_BYTE = [None] * 0x81 + list(STATIC_TABLE) + [None] * (0x100 - 0x81 - _STATIC_LEN)
_ONE_BYTE_DYNAMIC = 0x80 | _FIRST_DYNAMIC  # 190
_ONE_BYTE_LAST = 0x7E  # the largest wire index with a one-byte representation
_STATIC_MAX_ENTRY = 64  # no static entry is larger (section 4.1 size)
_STRING_CACHE_MAX = 512  # decoded Huffman strings (and their validity) kept per decoder, then cleared
_STRING_CACHE_LEN = 64  # longer strings are not cached


class Decoder:
    """Decodes the header blocks of one connection (they must be decoded in the order sent).

    max_table_size: the largest dynamic table the peer may select (our SETTINGS_HEADER_TABLE_SIZE), in
    effect from the first block; for HTTP/2, construct with the protocol's initial 4096 and call
    set_max_table_size when the peer acknowledges a different value.
    max_header_list_size: decode raises HeaderListTooLarge above this (RFC 9113 section 6.5.2 sizes);
    a plain attribute, change it at will.
    """

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 64 * 1024) -> None:
        if max_table_size < 0:
            raise ValueError("table size must not be negative")
        self.max_header_list_size = max_header_list_size
        # the fields of the last block sent "never indexed" (section 6.2.3), None if none: an
        # intermediary must forward them so (section 7.1.3), see Encoder.encode(sensitive=)
        self.never_indexed: frozenset | None = None
        self._allowed = max_table_size  # the most a table size update may ask for
        self._limit = max_table_size  # the table's current maximum size (section 4.2)
        self._size = 0  # the table's current size (section 4.1)
        self._t: list = list(_STATIC_ENTRIES)  # [hole, static 1..61, dynamic newest first]
        self._t1: list = list(_ONE_BYTE)  # first byte of an indexed field -> pair, when that is all to do
        self._max_entry = _STATIC_MAX_ENTRY  # no entry ever in the table was larger (list size bound)
        self._update_required = False
        self._strings: dict[bytes, tuple[bytes, bool]] = {}  # Huffman octets -> _huffman_value()
        # counts the changes to the table and its limits (an insertion that is dropped at once into an
        # empty table changes nothing): a block that left it unchanged decodes the same while it
        # stays unchanged (H2Connection caches such blocks' results by this)
        self.generation = 0

    @property
    def max_table_size(self) -> int:
        """The largest table size an update may select (what we advertised)."""
        return self._allowed

    def set_max_table_size(self, n: int) -> None:
        """Our SETTINGS_HEADER_TABLE_SIZE is now n and the peer acknowledged it. If n is below the
        table's current maximum, the peer's next block must start with a size update to at most n
        (section 4.2); a block without one is refused."""
        if n < 0:
            raise ValueError("table size must not be negative")
        self._allowed = n
        self.generation += 1
        if n < self._limit:
            self._update_required = True

    @property
    def table_size(self) -> int:
        """Current size of the dynamic table (section 4.1)."""
        return self._size

    @property
    def table_limit(self) -> int:
        """Current maximum size of the dynamic table, as last set by the peer (section 4.2)."""
        return self._limit

    @property
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table, newest entry (index 62) first."""
        return [entry[0] for entry in self._t[_FIRST_DYNAMIC:]]

    def _evict(self, size: int, limit: int) -> int:
        """Evict from the end until size <= limit (section 4.4); returns the new size."""
        t, t1 = self._t, self._t1
        while size > limit:
            wire = len(t) - 1
            size -= t.pop()[1]
            if wire <= _ONE_BYTE_LAST:
                t1[0x80 | wire] = None
        return size

    def _size_update(self, data: bytes, pos: int) -> int:
        """A dynamic table size update at data[pos] (sections 4.2, 6.3); returns the position after it."""
        n = data[pos] & 0x1F
        pos += 1
        if n == 0x1F:
            n, pos = _decode_int(data, pos, 0x1F)
        if n > self._allowed:
            raise HpackError(f"table size update to {n} exceeds the maximum of {self._allowed}")
        self._limit = n
        self._size = self._evict(self._size, n)
        self.generation += 1
        return pos

    def decode(self, block: bytes | bytearray | memoryview) -> tuple[Fields, str | None]:
        """Decode one complete header block: (fields in order, None or a description of the first field
        that is malformed under RFC 9113 section 8.2.1). Raises HpackError (connection error) or,
        after processing the whole block, HeaderListTooLarge."""
        data = block if type(block) is bytes else bytes(block)
        end = len(data)
        if self._update_required:  # section 4.2: the peer must acknowledge our smaller maximum
            if not end or data[0] & 0xE0 != 0x20:
                raise HpackError("expected a dynamic table size update at the start of the block")
            self._update_required = False
        t, t1 = self._t, self._t1
        out: Fields = []
        never: list | None = None  # fields sent never indexed
        bad = None  # (field number, description) of the first malformed field
        pos = 0
        it = iter(data)
        try:
            for b in it:
                pair = t1[b]
                if pair is not None:  # indexed field, one byte, valid entry (section 6.1): the common case
                    out.append(pair)
                    continue
                pos = end - it.__length_hint__() - 1  # where b is
                if b & 0x80:  # indexed field: index 0, a long index, or an entry holding a malformed field
                    if b == 0xFF:
                        idx, pos = _decode_int(data, pos + 1, 0x7F)
                        it.__setstate__(pos)
                    else:
                        idx = b & 0x7F
                        if not idx:
                            raise HpackError("indexed field with index 0")
                    pair, _, err, _ = t[idx]
                    out.append(pair)
                    if err is not None and bad is None:
                        bad = (len(out), err)
                    continue

                if b & 0x40:  # literal with incremental indexing (section 6.2.1)
                    idx = b & 0x3F
                    pos += 1
                    if idx == 0x3F:
                        idx, pos = _decode_int(data, pos, 0x3F)
                    indexing = True
                    hidden = False
                elif b & 0x20:  # dynamic table size update: only before the first field (section 4.2)
                    if out:
                        raise HpackError("dynamic table size update after the start of the block")
                    it.__setstate__(self._size_update(data, pos))
                    continue
                else:  # literal without indexing (6.2.2) or never indexed (6.2.3)
                    hidden = b & 0x10
                    idx = b & 0x0F
                    pos += 1
                    if idx == 0x0F:  # any dynamic name: two bytes, mostly
                        idx = data[pos]
                        if idx < 0x80:
                            idx += 0x0F
                            pos += 1
                        else:
                            idx, pos = _decode_int(data, pos, 0x0F)
                    indexing = False

                if idx:
                    npair, _, _, nerr = t[idx]
                    name = npair[0]
                else:
                    name, pos = _read_string(data, pos, end)
                    nerr = _name_error(name)

                # The value, inlined: this is the path of every fresh literal.
                first = data[pos]
                n = first & 0x7F
                pos += 1
                if n == 0x7F:  # 127 bytes or more: two bytes up to 254
                    n = data[pos]
                    if n < 0x80:
                        n += 0x7F
                        pos += 1
                    else:
                        n, pos = _decode_int(data, pos, 0x7F)
                value = data[pos:pos + n]
                pos += n
                if pos > end:
                    raise HpackError("truncated string")
                it.__setstate__(pos)
                if first & 0x80:
                    decoded = self._strings.get(value)
                    if decoded is None:
                        decoded = _huffman_value(value)
                        if n <= _STRING_CACHE_LEN:
                            strings = self._strings
                            if len(strings) >= _STRING_CACHE_MAX:
                                strings.clear()
                            strings[value] = decoded
                    value, ok = decoded
                else:  # `0 in value`, not `b"\0" in value`: six times cheaper
                    ok = not (value and (0 in value or 13 in value or 10 in value or value[0] in _SP_HTAB
                                         or value[-1] in _SP_HTAB))
                err = nerr if ok else nerr or _value_error(name, value)
                pair = (name, value)
                out.append(pair)
                if hidden:
                    if never is None:
                        never = []
                    never.append(pair)
                if err is not None and bad is None:
                    bad = (len(out), err)
                if indexing:  # insert, then evict (sections 4.3, 4.4)
                    n = len(name) + len(value) + 32
                    if n > self._limit and not self._size:
                        # larger than an empty table: dropped, the table stays as it was (always, with
                        # a table of size 0: upstream connections advertise one)
                        continue
                    self.generation += 1
                    t.insert(_FIRST_DYNAMIC, (pair, n, err, nerr))
                    t1.insert(_ONE_BYTE_DYNAMIC, pair if err is None else None)
                    del t1[0xFF]  # what was wire index 126 is now 127: no longer one byte
                    size = self._size + n
                    if n > self._max_entry:
                        self._max_entry = n
                    limit = self._limit
                    while size > limit:  # an entry larger than the table empties it and is dropped
                        wire = len(t) - 1
                        size -= t.pop()[1]
                        if wire <= _ONE_BYTE_LAST:
                            t1[0x80 | wire] = None
                    self._size = size
        except IndexError:  # reading past the end of the block, or past the end of the table
            if pos >= end:
                raise HpackError("truncated header block") from None
            raise HpackError(f"table index out of range at offset {pos} "
                             f"(the dynamic table has {len(t) - _FIRST_DYNAMIC} entries)") from None
        # Header list size (RFC 9113 section 6.5.2): every field is at most the largest entry ever
        # in a table plus what its literal strings decode to (Huffman: under 2 bytes per byte), so
        # the exact sum is only needed when that bound is over the limit.
        if len(out) * self._max_entry + 2 * end > self.max_header_list_size:
            total = sum(map(len, chain.from_iterable(out))) + 32 * len(out)
            if total > self.max_header_list_size:
                raise HeaderListTooLarge(total, self.max_header_list_size)
        self.never_indexed = frozenset(never) if never is not None else None
        if bad is not None:
            return out, f"field {bad[0]}: {bad[1]}"
        return out, None


# --- Encoder ----------------------------------------------------------------------------------------------------

# How a field is represented when (name, value) is in no table (section 6.2), chosen per name.
_INDEX = 0  # literal with incremental indexing (6.2.1)
_PATH = 1  # :path: indexed unless it has a query
_LITERAL = 2  # literal without indexing (6.2.2) or never indexed (6.2.3); the encoding is cached per field
_FRESH = 3  # literal without indexing, name by index, a new value every time: not cached
FRESH_NAMES = frozenset({  # a new value on every request: indexing would only churn the table
    b"x-request-id", b"traceparent", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
    b"x-cloud-trace-context", b"uber-trace-id"})
NOT_INDEXED = FRESH_NAMES | {b"content-length", b"date"}  # section 6.2.2
NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})  # 6.2.3
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(STATIC_TABLE, 1):
    _STATIC_NAME.setdefault(_n, _i)
_POLICIES: tuple[dict, dict] = ({}, {})  # per huffman flag: name -> (kind, static name index or 0, bytes)
_ENCODER_TABLE_CAP = 65536  # we never keep a larger table, whatever the peer allows
# Indexed field representations (section 6.1) for every wire index a table of _ENCODER_TABLE_CAP can have.
_INDEXED = [_encode_int(i, 0x7F, 0x80) for i in range(_STATIC_LEN + _ENCODER_TABLE_CAP // 32 + 1)]
_NOT_INDEXED_NAME = [_encode_int(i, 0x0F, 0x00) for i in range(len(_INDEXED))]  # 6.2.2, name by index
_STATIC_FIXED = {pair: ~i for i, pair in enumerate(STATIC_TABLE)}  # full matches: ~ their place in _FIXED
_FIXED = [_INDEXED[i] for i in range(1, _STATIC_LEN + 1)]
_PLAIN_LEN = [bytes((n,)) for n in range(0x7F)]  # one-byte lengths of plain strings
_FIXED_CACHE_MAX = 256  # encoded literal fields kept per encoder (then forgotten)
# ... and at most this many bytes of them: values come from the peer (a proxy forwards them), and
# 256 cookies of 60 KB each would pin 30 MB per connection (twice: the key and the representation).
# A representation larger than this is not cached at all.
_FIXED_CACHE_BYTES = 64 * 1024


def _string_bytes(s: bytes, huffman: bool) -> bytes:
    """A string literal (section 5.2): plain, or Huffman if asked for and shorter."""
    if huffman:
        coded = huffman_encode(s)
        if len(coded) < len(s):
            return _encode_int(len(coded), 0x7F, 0x80) + coded
    if len(s) < 0x7F:
        return _PLAIN_LEN[len(s)] + s
    return _encode_int(len(s), 0x7F, 0) + s


def _name_policy(name: bytes) -> tuple[int, int, int]:
    """(kind, static name index or 0, flags of a _LITERAL's representation: 0x10 never indexed)."""
    static = _STATIC_NAME.get(name, 0)
    if name in FRESH_NAMES:
        return _FRESH, static, 0x00
    if name in NOT_INDEXED or name in NEVER_INDEXED:
        return _LITERAL, static, 0x10 if name in NEVER_INDEXED else 0x00
    return _PATH if name == b":path" else _INDEX, static, 0x00


def _policy(name: bytes, huffman: bool) -> tuple[int, int, bytes]:
    """(kind, static name index or 0, bytes): for _LITERAL the whole representation up to the value;
    for the others the name as a string literal, for when no table has it."""
    kind, static, flags = _name_policy(name)
    if kind == _LITERAL:
        prefix = _encode_int(static, 0x0F, flags) if static else bytes((flags,)) + _string_bytes(name, huffman)
        policy = (kind, static, prefix)
    else:
        policy = (kind, static, _string_bytes(name, huffman))
    if len(name) <= _NAME_CACHE_LEN:  # bounded memory: see _NAME_CACHE_LEN
        cache = _POLICIES[huffman]
        if len(cache) >= 4096:
            cache.clear()
        cache[name] = policy
    return policy


class PureEncoder:
    """Encodes the header blocks of one connection. huffman=True: Huffman-code each string that gets
    shorter (costs ~0.5k instructions per byte; saves ~20% of literal bytes); by default strings go
    plain. The pure-Python twin of the native encoder (see native_encoder), and its oracle in the tests."""

    def __init__(self, *, huffman: bool = False) -> None:
        self._huffman = huffman
        # field -> insertion number of its dynamic entry (>= 0), or ~i (< 0) where _fixed[i] is its
        # representation when that never changes: static full matches, and literals without
        # indexing of fields that recur (content-length: 0, a :path with a query, ...). One dict, so
        # one lookup per field whatever happens to it.
        self._index: dict[tuple[bytes, bytes], int] = dict(_STATIC_FIXED)
        self._fixed: list[bytes] = list(_FIXED)
        self._fixed_bytes = 0  # total length of the cached literals in _fixed (beyond the static ones)
        self._names: dict[bytes, int] = {}  # name -> insertion number of its newest entry
        self._entries: deque[tuple[tuple[bytes, bytes], bytes, int]] = deque()  # oldest first
        self._inserted = 0  # insertion numbers handed out so far
        self._evicted = 0  # insertion number of the oldest entry still in the table
        self._size = 0
        self._limit = 4096  # the table's maximum size (initial SETTINGS_HEADER_TABLE_SIZE)
        self._updates: tuple[int, int] | None = None  # (smallest, final) limit since the last block
        # counts what changes how fields encode (insertions, table size changes and their announcement):
        # while it stays the same, the same fields encode to the same bytes (H2Connection keeps some)
        self.generation = 0

    def set_max_table_size(self, n: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE is now n: use a table of min(n, 64 KiB), evicting at
        once, and say so at the start of the next block (sections 4.2, 6.3: after several changes,
        the smallest value and then the final one)."""
        if n < 0:
            raise ValueError("table size must not be negative")
        n = min(n, _ENCODER_TABLE_CAP)
        if n == self._limit and self._updates is None:
            return
        smallest = n if self._updates is None else min(self._updates[0], n)
        self._updates = (smallest, n)
        self.generation += 1
        self._limit = n
        self._evict()

    @property
    def table_size(self) -> int:
        """Current size of the dynamic table (section 4.1)."""
        return self._size

    @property
    def table_limit(self) -> int:
        """Current maximum size of the dynamic table (what the next block announces, if it changed)."""
        return self._limit

    @property
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table, newest entry (index 62) first."""
        return [pair for pair, _, _ in reversed(self._entries)]

    def _evict(self) -> None:
        entries, dynamic, names = self._entries, self._index, self._names
        while self._size > self._limit:
            pair, name, n = entries.popleft()
            number = self._evicted
            self._evicted = number + 1
            self._size -= n
            if dynamic.get(pair) == number:
                del dynamic[pair]
            if names.get(name) == number:
                del names[name]

    def _forget_literals(self) -> None:
        """Drop the cached literal representations (not the static ones)."""
        first_literal = ~_STATIC_LEN
        self._index = {field: i for field, i in self._index.items() if i > first_literal}
        del self._fixed[_STATIC_LEN:]
        self._fixed_bytes = 0

    def _encode_with_sensitive(self, fields: list[tuple[bytes, bytes]], sensitive: frozenset) -> bytes:
        """The rare block with never-indexed fields: those go out as literals never indexed (the name
        by index when a table has it), the others in runs through the common path, in order."""
        parts = [self.encode([])]  # a pending table size update comes first (section 4.2)
        run: list = []
        for field in fields:
            if field not in sensitive:
                run.append(field)
                continue
            if run:
                parts.append(self.encode(run))
                run = []
            name, value = field
            i = self._names.get(name)
            static = _STATIC_NAME.get(name, 0)
            index = _STATIC_LEN + self._inserted - i if i is not None else static
            parts.append(_encode_int(index, 0x0F, 0x10) if index else b"\x10" + _string_bytes(name, self._huffman))
            parts.append(_string_bytes(value, self._huffman))
        if run:
            parts.append(self.encode(run))
        return b"".join(parts)

    def encode(self, fields: list[tuple[bytes, bytes]], sensitive: frozenset | None = None) -> bytes:
        """One header block for `fields`: (name, value) tuples of bytes, in order (tuples: they are
        dict keys). `sensitive`: fields to send never indexed (section 6.2.3) whatever their name,
        those a peer sent so (Decoder.never_indexed), which an intermediary must keep (7.1.3)."""
        if sensitive:
            return self._encode_with_sensitive(fields, sensitive)
        parts: list[bytes] = []
        if self._updates is not None:  # section 4.2
            smallest, final = self._updates
            self._updates = None
            self.generation += 1
            if smallest < final:
                parts.append(_encode_int(smallest, 0x1F, 0x20))
            parts.append(_encode_int(final, 0x1F, 0x20))
        index, fixed, indexed = self._index, self._fixed, _INDEXED
        base = _STATIC_LEN + self._inserted  # wire index of insertion number i: base - i
        for field in fields:
            i = index.get(field)
            if i is not None:
                # indexed field, dynamic table (section 6.1); or static table, or a literal seen before
                parts.append(indexed[base - i] if i >= 0 else fixed[~i])
                continue
            name, value = field
            kind, static, prefix = _POLICIES[self._huffman].get(name) or _policy(name, self._huffman)
            if self._huffman:
                value_bytes = _string_bytes(value, True)
            elif len(value) < 0x7F:
                value_bytes = _PLAIN_LEN[len(value)] + value
            else:
                value_bytes = _encode_int(len(value), 0x7F, 0) + value
            if kind == _FRESH:  # not indexed, the name by index (the first one is inserted, below)
                i = self._names.get(name)
                if i is not None or static:
                    parts.append(_NOT_INDEXED_NAME[base - i if i is not None else static])
                    parts.append(value_bytes)
                    continue
            size = len(name) + len(value) + 32
            if kind == _LITERAL or size > self._limit >> 1 or (kind == _PATH and b"?" in value):
                # a literal without indexing
                if kind == _LITERAL:
                    representation = prefix + value_bytes
                else:
                    representation = (_NOT_INDEXED_NAME[static] if static else b"\0" + prefix) + value_bytes
                    if kind == _FRESH:  # too large to index, and not worth remembering
                        parts.append(representation)
                        continue
                parts.append(representation)
                if len(representation) > _FIXED_CACHE_BYTES:  # bounded memory: not worth remembering
                    continue
                if (len(fixed) >= _STATIC_LEN + _FIXED_CACHE_MAX
                        or self._fixed_bytes + len(representation) > _FIXED_CACHE_BYTES):
                    self._forget_literals()
                    index = self._index
                self._fixed_bytes += len(representation)
                index[field] = ~len(fixed)
                fixed.append(representation)
                continue
            # literal with incremental indexing (section 6.2.1), the name by index if a table has it
            if not static:
                i = self._names.get(name)
                if i is not None:
                    static = base - i
            if static:
                parts.append(_encode_int(static, 0x3F, 0x40))
            else:
                parts.append(b"\x40")
                parts.append(prefix)
            parts.append(value_bytes)
            number = self._inserted
            self._inserted = number + 1
            self.generation += 1
            base += 1
            index[field] = number
            self._names[name] = number
            self._entries.append((field, name, size))
            self._size += size
            if self._size > self._limit:
                self._evict()
        return b"".join(parts)


# --- which encoder: the native one when built -------------------------------------------------------------------

# The names whose policy is not (_INDEX, 0, 0x00), which every other name has: what the native encoder
# is given instead of the rules.
_NAME_POLICIES = {name: _name_policy(name) for name in chain(_STATIC_NAME, FRESH_NAMES, NOT_INDEXED, NEVER_INDEXED)}


def native_encoder() -> type:
    """The native Encoder (proxy.l7._hpack_c, built from native/hpack_encoder.c), given this module's
    tables and caps; ImportError when it was not built."""
    from . import _hpack_c

    _hpack_c.configure(_STATIC_FIXED, _FIXED, _NAME_POLICIES, (_INDEX, _PATH, _LITERAL, _FRESH), HUFFMAN_CODE,
                       _ENCODER_TABLE_CAP, _FIXED_CACHE_MAX, _FIXED_CACHE_BYTES)
    return _hpack_c.Encoder


Encoder: type
IMPLEMENTATION: str
if os.environ.get("TRIOMESH_PURE_HPACK", "") not in ("", "0"):
    Encoder, IMPLEMENTATION = PureEncoder, "pure"
else:
    try:
        Encoder, IMPLEMENTATION = native_encoder(), "native"
    except ImportError:  # extension not built (e.g. no C compiler at install time)
        Encoder, IMPLEMENTATION = PureEncoder, "pure"
