"""Build hook: compiles the native HTTP/1.1 head parser with cffi (out-of-line API mode)."""
from setuptools import setup

setup(cffi_modules=["native/build_headparser.py:ffibuilder"])
