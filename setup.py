"""Build hook: compiles native/: the HTTP/1.1 head parser with cffi (out-of-line API mode), the head
parser's two per-request calls (parse_request_head, forward_response_head), the upstream request
head's writer (serialize_request_head), the Istio request metrics table and the HPACK encoder as
CPython extensions. All are optional: without a working C compiler the install still succeeds and
the pure-Python twins are used (proxy.l7.headparser, proxy.l7.h1, proxy.telemetry.request_table and
proxy.l7.h2_hpack report which; the test suite fails loudly in that case unless
TRIOMESH_PURE_PARSER=1, TRIOMESH_PURE_METRICS=1 and TRIOMESH_PURE_HPACK=1)."""
from setuptools import Extension, setup

setup(
    cffi_modules=["native/build_headparser.py:ffibuilder"],
    ext_modules=[Extension("proxy.l7._headparser_capi",
                           sources=["native/headparser_capi.c", "native/headparser.c", "native/forward.c"],
                           include_dirs=["native"],
                           extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"], optional=True),
                 Extension("proxy.l7._h1_write", sources=["native/h1_write.c"],
                           extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"], optional=True),
                 Extension("proxy.telemetry._request_metrics_c", sources=["native/request_metrics.c"],
                           extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"], optional=True),
                 Extension("proxy.l7._hpack_c", sources=["native/hpack_encoder.c"],
                           extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"], optional=True)],
)
