"""Build hook: compiles native/: the HTTP/1.1 head parser with cffi (out-of-line API mode) and the
Istio request metrics table as a CPython extension. Both are optional: without a working C compiler
the install still succeeds and the pure-Python twins are used (proxy.l7.headparser and
proxy.telemetry.request_table report which; the test suite fails loudly in that case unless
TRIOMESH_PURE_PARSER=1 and TRIOMESH_PURE_METRICS=1)."""
from setuptools import Extension, setup

setup(
    cffi_modules=["native/build_headparser.py:ffibuilder"],
    ext_modules=[Extension("proxy.telemetry._request_metrics_c", sources=["native/request_metrics.c"],
                           extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"], optional=True)],
)
