"""cffi builder (out-of-line API mode) for the native head parser: module proxy.l7._headparser_c.

It declares the calls made through cffi only; parse_request_head and forward_response_head go through
the CPython extension proxy.l7._headparser_capi (native/headparser_capi.c, built by setup.py)."""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# The declarations Python sees; they mirror headparser.h (cffi does not run the C preprocessor).
CDEF = """
#define TM_INCOMPLETE ...
#define TM_E_BARE_CR ...
#define TM_E_BARE_LF ...
#define TM_E_NUL ...
#define TM_E_INVALID_METHOD ...
#define TM_E_INVALID_TARGET ...
#define TM_E_INVALID_VERSION ...
#define TM_E_INVALID_STATUS ...
#define TM_E_INVALID_REASON ...
#define TM_E_INVALID_TOKEN ...
#define TM_E_SPACE_BEFORE_COLON ...
#define TM_E_MISSING_COLON ...
#define TM_E_OBS_FOLD ...
#define TM_E_INVALID_HEADER_VALUE ...
#define TM_E_TOO_MANY_HEADERS ...
#define TM_E_INVALID_CHUNK_SIZE ...
#define TM_E_INVALID_CHUNK_EXT ...
#define TM_PACK_FULL ...

typedef struct {
    size_t name_start, name_end, value_start, value_end;
} tm_header;

typedef struct {
    size_t method_start, method_end;
    size_t target_start, target_end;
    size_t reason_start, reason_end;
    size_t minor_version;
    size_t status;
    size_t num_headers;
    size_t error_offset;
    size_t pack_len;
} tm_head;

long tm_parse_response(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                       size_t max_headers, char *pack, size_t pack_cap);
long tm_parse_fields(const char *buf, size_t len, size_t start, tm_head *head, tm_header *headers,
                     size_t max_headers, char *pack, size_t pack_cap);
long tm_parse_chunk_size(const char *buf, size_t len, size_t start, uint64_t *chunk_size,
                         size_t *error_offset);

"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "proxy.l7._headparser_c",
    '#include "headparser.h"',
    # Relative paths: setuptools refuses absolute source paths in an sdist/editable build.
    sources=["native/headparser.c"],
    include_dirs=["native"],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
    # Without a working C compiler the install still succeeds and proxy.l7.headparser falls back to
    # the pure-Python parser; the test suite fails loudly in that case unless TRIOMESH_PURE_PARSER=1.
    optional=True,
)

if __name__ == "__main__":  # manual build in place: python native/build_headparser.py
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
