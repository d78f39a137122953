"""The upstream connection's HPACK decoder (h2_upstream.RepeatedBlockDecoder): a dynamic table of size 0
whose repeated blocks are looked up instead of decoded, checked against the `hpack` package as the
oracle, as tests/l7/test_h2_hpack.py does for the decoder itself."""

from __future__ import annotations

import hpack
import pytest

from proxy.l7 import h2_frames as frames
from proxy.l7.h2_hpack import HpackError
from proxy.l7.h2_upstream import MAX_REPEATED_BLOCKS, RepeatedBlockDecoder, upstream_connection_state

# what nginx answers a small GET with: literal fields with incremental indexing, every time
NGINX_HEAD = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Fri, 04 Dec 2026 17:37:36 GMT"),
              (b"content-type", b"text/plain"), (b"content-length", b"100")]


def _server_encoder() -> hpack.Encoder:
    """A server's encoder after our SETTINGS_HEADER_TABLE_SIZE of 0 (its next block starts with the
    size update, RFC 7541 §4.2)."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 0
    return encoder


def test_the_upstream_advertises_a_table_of_size_0():
    h2conn = upstream_connection_state()
    assert h2conn.local_settings[frames.HEADER_TABLE_SIZE] == 0
    assert isinstance(h2conn.decoder, RepeatedBlockDecoder)
    assert h2conn.decoder.max_table_size == 0


def test_repeated_blocks_decode_as_the_oracle_does_and_keep_the_table_empty():
    encoder, oracle, decoder = _server_encoder(), hpack.Decoder(), RepeatedBlockDecoder(1 << 20)
    blocks = [encoder.encode(NGINX_HEAD) for _ in range(3)]
    assert blocks[0][0] == 0x20 and blocks[1] == blocks[2]  # the size update, then the same bytes
    for block in blocks + blocks:
        fields, problem = decoder.decode(block)
        assert problem is None
        assert fields == [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
                          for n, v in oracle.decode(block, raw=True)]
        assert decoder.table_size == 0 and decoder.dynamic_table == []
    assert decoder.decode(blocks[1])[0] is decoder.decode(blocks[2])[0]  # looked up, not decoded again


def test_a_hit_restores_the_never_indexed_fields_of_its_block():
    encoder, decoder = _server_encoder(), RepeatedBlockDecoder(1 << 20)
    secret = encoder.encode([(b":status", b"200"), hpack.NeverIndexedHeaderTuple(b"set-cookie", b"a=1")])
    plain = encoder.encode(NGINX_HEAD)
    for _ in range(2):
        decoder.decode(secret)
        assert decoder.never_indexed == frozenset({(b"set-cookie", b"a=1")})
        decoder.decode(plain)
        assert decoder.never_indexed is None


def test_a_reference_to_a_dynamic_entry_fails_every_time():
    """A server that ignores the size 0 and refers to an entry it inserted: a COMPRESSION_ERROR for
    the connection layer, never a wrong field from a remembered block."""
    decoder = RepeatedBlockDecoder(1 << 20)
    inserting = hpack.Encoder().encode([(b":status", b"200"), (b"x-a", b"1")])
    decoder.decode(inserting)
    assert decoder.dynamic_table == []
    for _ in range(2):
        with pytest.raises(HpackError):
            decoder.decode(bytes([0x80 | 62]))


def test_the_memo_is_bounded():
    encoder, decoder = _server_encoder(), RepeatedBlockDecoder(1 << 20)
    for i in range(3 * MAX_REPEATED_BLOCKS):
        fields, _ = decoder.decode(encoder.encode([(b":status", b"200"), (b"x-n", b"%d" % i)]))
        assert fields[1] == (b"x-n", b"%d" % i)
        assert len(decoder._decoded) <= MAX_REPEATED_BLOCKS
