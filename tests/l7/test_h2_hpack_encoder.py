"""The native HPACK encoder (native/hpack_encoder.c) against its pure twin (h2_hpack.PureEncoder): the same
random sequences of blocks, table size changes and sensitive sets make the same bytes, tables, literal
caches and generations, and every block decodes to its fields with our Decoder and with the `hpack`
package. Also: which encoder is in use, the field types accepted, and no memory kept per call."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import tracemalloc

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.l7 import h2_hpack
from proxy.l7.h2_hpack import STATIC_TABLE, Decoder, PureEncoder

try:
    NativeEncoder = h2_hpack.native_encoder()
except ImportError:  # not built: a failure, unless the pure twin was asked for (a machine without a compiler)
    if os.environ.get("TRIOMESH_PURE_HPACK", "") in ("", "0"):
        raise
    pytest.skip("native/hpack_encoder.c was not built and TRIOMESH_PURE_HPACK=1", allow_module_level=True)

BIG = 1 << 30

# Names of every policy (static, fresh, not indexed, never indexed, :path, unknown) and a long one.
NAMES = [b":authority", b":path", b":method", b":status", b"accept", b"user-agent", b"content-type",
         b"content-length", b"date", b"x-request-id", b"traceparent", b"authorization", b"cookie", b"set-cookie",
         b"x-custom", b"grpc-timeout", b"x-" + b"n" * 70]
# Values around the 7-bit length prefix, the half-table rule and the literal cache's byte budget,
# with a query (for :path), with bytes of long Huffman codes, and malformed ones (sent as they are).
VALUES = [b"", b"v", b"/", b"/a?b=1", b"gzip", b"0", b"x" * 126, b"y" * 127, b"z" * 300, b"w" * 2100,
          b"c" * 20000, b"d" * 70000, bytes(range(0x80, 0x100)), b"nul\0x", b" lead"]


def _values() -> st.SearchStrategy[bytes]:
    return st.sampled_from(VALUES) | st.binary(max_size=40)


def _fields() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    field = st.tuples(st.sampled_from(NAMES) | st.binary(min_size=1, max_size=12), _values())
    return st.lists(st.sampled_from(STATIC_TABLE) | field, max_size=12)


# an operation: ("encode", fields, which of them are sensitive) or ("size", a new SETTINGS_HEADER_TABLE_SIZE)
OPERATIONS = st.lists(
    st.tuples(st.just("encode"), _fields(), st.lists(st.integers(0, 11), max_size=3))
    | st.tuples(st.just("size"), st.sampled_from([0, 1, 31, 64, 100, 256, 4096, 8192, 65536, 1 << 20]), st.none()),
    min_size=1, max_size=25)


class Twins:
    """A native and a pure encoder driven alike, and two decoders of what they send."""

    def __init__(self, huffman: bool) -> None:
        self.native, self.pure = NativeEncoder(huffman=huffman), PureEncoder(huffman=huffman)
        self.decoder = Decoder(max_table_size=4096, max_header_list_size=BIG)
        self.decoder.set_max_table_size(1 << 20)  # as if acknowledged: any size update is allowed
        self.oracle = hpack.Decoder(max_header_list_size=BIG)
        self.oracle.max_allowed_table_size = 1 << 20

    def set_max_table_size(self, n: int) -> None:
        self.native.set_max_table_size(n)
        self.pure.set_max_table_size(n)
        self.check_same()

    def encode(self, fields, sensitive) -> bytes:
        block = self.native.encode(fields, sensitive)
        assert block == self.pure.encode(fields, sensitive)
        self.check_same()
        got, _ = self.decoder.decode(block)
        assert got == [tuple(f) for f in fields]
        assert [tuple(f) for f in self.oracle.decode(block, raw=True)] == got
        assert self.decoder.dynamic_table == self.native.dynamic_table
        hidden = {f for f in fields if sensitive and f in sensitive and f not in STATIC_TABLE}
        assert hidden <= (self.decoder.never_indexed or set())
        return block

    def check_same(self) -> None:
        native, pure = self.native, self.pure
        assert native.dynamic_table == pure.dynamic_table
        assert (native.table_size, native.table_limit, native.generation) == \
            (pure.table_size, pure.table_limit, pure.generation)
        assert native._index == pure._index  # dynamic entries, static matches and cached literals alike
        assert native._fixed == pure._fixed and native._fixed_bytes == pure._fixed_bytes


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(huffman=st.booleans(), operations=OPERATIONS)
def test_native_and_pure_write_the_same_bytes(huffman, operations):
    twins = Twins(huffman)
    for op, arg, picks in operations:
        if op == "size":
            twins.set_max_table_size(arg)
            continue
        sensitive = frozenset(arg[i] for i in picks if i < len(arg)) if picks else None
        twins.encode(arg, sensitive)


@pytest.mark.parametrize("huffman", [False, True])
def test_long_connection_against_the_twin(huffman):
    """Thousands of blocks on one connection, as a proxy sends them: a few recurring requests with a
    fresh id each, churning caches and table (eviction, the literal cache forgotten and refilled)."""
    rng = random.Random(11 + huffman)
    twins = Twins(huffman)
    paths = [b"/api/v%d/items?page=%d" % (i % 3, i) for i in range(40)] + [b"/", b"/health", b"/a/b/c"]
    for n in range(3000):
        if rng.random() < 0.01:
            twins.set_max_table_size(rng.choice([0, 256, 1024, 4096, 8192]))
        fields = [(b":method", rng.choice([b"GET", b"POST"])), (b":scheme", b"http"),
                  (b":authority", b"svc-%d.default.svc.cluster.local" % rng.randrange(5)),
                  (b":path", rng.choice(paths)), (b"x-request-id", b"%032x" % rng.getrandbits(128)),
                  (b"content-length", b"%d" % rng.randrange(300)),
                  (b"x-custom-%d" % rng.randrange(200), b"value-%d" % rng.randrange(50))]
        if rng.random() < 0.3:
            fields.append((b"cookie", b"session=%d" % rng.randrange(400)))
        if rng.random() < 0.5:  # a static name, often in the dynamic table too
            fields.append((b"user-agent", b"client/%d" % rng.randrange(4)))
        # sometimes a field the peer sent never indexed: the name by index, from either table
        sensitive = frozenset({rng.choice(fields)}) if rng.random() < 0.1 else None
        twins.encode(fields, sensitive)
    assert twins.native.table_size > 0


@pytest.mark.parametrize("huffman", [False, True])
def test_the_same_objects_again_while_the_index_changes(huffman):
    """A proxy sends the same bytes objects again and again, each time in a new tuple; the native encoder
    remembers its index's answer for them by identity (the seen cache) for as long as the index is
    unchanged. Blocks of recurring objects while entries are inserted and evicted, literals cached and
    forgotten and the table resized, write what the twin writes."""
    rng = random.Random(5 + huffman)
    twins = Twins(huffman)
    names = [b"x-a", b"x-b", b"user-agent", b":path", b":method", b"accept", b"authorization", b"date",
             b"grpc-timeout"]
    values = [b"v%d" % i for i in range(30)] + [b"z" * 900, b"/p?q=1", b"GET", b""]
    pool = [(name, value) for name in names for value in values]
    for _ in range(3000):
        if rng.random() < 0.02:
            twins.set_max_table_size(rng.choice([0, 64, 256, 1024, 4096]))
        twins.encode([(name, value) for name, value in rng.sample(pool, 8)], None)  # new tuples, same objects
    assert twins.native.generation > 100


def test_field_types():
    """Tuples of bytes, subclasses of either (hpack's HeaderTuple) too, any sequence of them; anything else
    is a TypeError, as the pure encoder's dict lookup makes it."""

    class Name(bytes):
        pass

    native, pure = NativeEncoder(), PureEncoder()
    for make in (lambda: [hpack.HeaderTuple(b"x-a", b"1")], lambda: ((Name(b"x-b"), Name(b"2")),),
                 lambda: iter([(b"x-a", b"1"), (b"x-c", b"3")])):
        assert native.encode(make()) == pure.encode(make())
    assert native.dynamic_table == pure.dynamic_table == [(b"x-c", b"3"), (b"x-b", b"2"), (b"x-a", b"1")]
    for bad in ([[b"x-a", b"1"]], [(b"x-a", bytearray(b"1"))], [(b"x-a",)], [(b"x-a", "1")], [b"x-a"]):
        with pytest.raises(TypeError):
            NativeEncoder().encode(bad)
        with pytest.raises((TypeError, ValueError)):
            PureEncoder().encode(bad)
    with pytest.raises(TypeError):
        native.encode([], frozenset(), 3)
    with pytest.raises(TypeError):
        native.encode([], sensitiv=None)
    assert native.encode([(b"x-a", b"1")], sensitive=frozenset({(b"x-a", b"1")})) == \
        pure.encode([(b"x-a", b"1")], sensitive=frozenset({(b"x-a", b"1")}))
    with pytest.raises(ValueError):
        native.set_max_table_size(-(1 << 70))
    native.set_max_table_size(1 << 70)  # capped like any size above 64 KiB
    assert native.table_limit == 65536
    with pytest.raises(AttributeError):
        native.generation = 0  # read-only: only the encoder moves it


def test_no_memory_kept_per_call():
    """Encoding, evicting, caching and forgetting literals keep no memory beyond the encoder's bounded
    state: after a warm-up, ten thousand more blocks leave the traced memory where it was."""
    rng = random.Random(5)

    def blocks(encoder, n):
        for i in range(n):
            fields = [(b":path", b"/p?%d" % rng.randrange(1000)), (b"x-request-id", b"%d" % i),
                      (b"x-a-%d" % rng.randrange(300), b"v" * rng.randrange(200)), (b"cookie", b"c=%d" % i)]
            encoder.encode(fields, frozenset({fields[3]}) if i % 7 == 0 else None)
            if i % 500 == 0:
                encoder.set_max_table_size(rng.choice([0, 4096, 65536]))
        NativeEncoder(huffman=True).encode(fields)  # and encoders made and dropped

    encoder = NativeEncoder(huffman=True)
    blocks(encoder, 5000)
    gc.collect()
    tracemalloc.start()
    try:
        blocks(encoder, 2000)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        blocks(encoder, 10000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown  # a leak of one object per block would be ~300 KB


# --- which encoder is in use --------------------------------------------------------------------------------------


def test_default_is_native_unless_forced():
    if os.environ.get("TRIOMESH_PURE_HPACK", "") not in ("", "0"):
        assert h2_hpack.IMPLEMENTATION == "pure" and h2_hpack.Encoder is PureEncoder
    else:
        assert h2_hpack.IMPLEMENTATION == "native"
        assert h2_hpack.Encoder is NativeEncoder


def test_environment_variable_forces_pure():
    code = "from proxy.l7 import h2_hpack as h; print(h.IMPLEMENTATION, h.Encoder.__module__, h.Encoder.__name__)"
    env = dict(os.environ, TRIOMESH_PURE_HPACK="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pure", "proxy.l7.h2_hpack", "PureEncoder"]
