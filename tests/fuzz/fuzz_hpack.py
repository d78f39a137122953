"""Fuzz target: the HPACK decoder (proxy/l7/h2_hpack.py Decoder.decode), over several blocks in turn.

The input is a sequence of header blocks, each prefixed by one length byte, decoded by one Decoder
(so the dynamic table carries over). Properties: decode returns fields or raises HpackError or
HeaderListTooLarge, nothing else; the dynamic table never exceeds its limit; where decode succeeds
with no RFC 9113 §8.2.1 complaint, the reference `hpack` package decodes the same fields."""

from __future__ import annotations

import hpack

from proxy.l7.h2_hpack import Decoder, HeaderListTooLarge, HpackError

MAX_LEN = 4096
MAX_HEADER_LIST_BYTES = 8192


def check(data: bytes) -> None:
    ours = Decoder(max_table_size=4096, max_header_list_size=MAX_HEADER_LIST_BYTES)
    reference = hpack.Decoder()
    reference.max_header_list_size = 1 << 30  # the list limit is ours to enforce; compare decoding only
    reference_ok = True
    pos = 0
    while pos < len(data):
        n = data[pos]
        block = data[pos + 1:pos + 1 + n]
        pos += 1 + n
        try:
            fields, malformed = ours.decode(block)
        except (HpackError, HeaderListTooLarge):
            return  # a connection error: the table is gone, nothing more is decoded
        assert ours.table_size <= ours.table_limit <= ours.max_table_size, (ours.table_size, ours.table_limit)
        if reference_ok:
            try:
                expected = reference.decode(block, raw=True)
            except hpack.HPACKError:
                reference_ok = False  # stricter than us somewhere; tables diverge from here on
                continue
            if malformed is None:
                assert [tuple(x) for x in fields] == [tuple(x) for x in expected], (block, fields, expected)
