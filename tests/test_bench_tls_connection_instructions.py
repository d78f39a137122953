"""bench.tls_connection_instructions' split of a callgrind profile by where the instructions run, on
a profile in callgrind's own format (name compression, inclusive costs of calls)."""

from __future__ import annotations

from bench import opcode_counts
from bench.tls_connection_instructions import parts

PROFILE = """\
# callgrind format
version: 1
events: Ir
ob=(1) /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0
fl=(1) /build/Python-3.11.7/Python/ceval.c
fn=(1) _PyEval_EvalFrameDefault
16 1000
+2 500
cob=(2) /venv/site-packages/cryptography/hazmat/bindings/_rust.abi3.so
cfi=(2) ???
cfn=(2) SSL_do_handshake
calls=1 0
16 900000
fl=(3) /build/Python-3.11.7/Modules/gcmodule.c
fn=(3) gc_collect_main
5 70
ob=(2)
fl=(2)
fn=(2)
0 800000
cob=(4) /usr/lib/x86_64-linux-gnu/libc.so.6
cfn=(4) malloc
calls=3 0
0 100000
ob=(4)
fl=(4) ???
fn=(4)
0 100000
ob=(1)
fl=(1)
fn=(5) _PyObject_Malloc
fi=(5) /build/Python-3.11.7/Objects/obmalloc.c
0 30
fe=(1)
0 7
"""


def test_parts_are_self_costs_by_object_and_cpython_source_file(tmp_path):
    profile = tmp_path / "callgrind.out"
    profile.write_text(PROFILE)
    assert parts(profile) == {
        "CPython eval loop": 1500 + 7,  # a call's inclusive 900000 is not the caller's own
        "CPython garbage collector": 70,
        "OpenSSL (cryptography's _rust.abi3.so)": 800000,  # the id named once, used again bare
        "libc": 100000,
        "CPython allocator": 30,  # an inlined file (fi=) counts for its own source
    }


def test_opcodes_per_unit_subtract_the_first_run():
    first = {"a": 10, "b": 5}
    second = {"a": 110, "c": 50}
    assert opcode_counts.per_unit(first, second, 50) == {"a": 2.0, "b": -0.1, "c": 1.0}
    assert opcode_counts.table({"x.py:1:f": 2.0, "/src/y.py:3:g": 5.5}, top=1, strip="/src/") == "      5.5  y.py:3:g"
