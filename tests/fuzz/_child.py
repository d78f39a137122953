"""One fuzz target under atheris, in this process: `python -m tests.fuzz._child TARGET [libFuzzer args]`.
Started by tests/fuzz/__main__.py; the code under test is imported instrumented (coverage feedback)."""

from __future__ import annotations

import importlib
import sys

import atheris


def main() -> None:
    target = sys.argv[1]
    with atheris.instrument_imports(include=["proxy", "controlplane", f"tests.fuzz.fuzz_{target}"]):
        module = importlib.import_module(f"tests.fuzz.fuzz_{target}")
    args = [sys.argv[0], f"-max_len={module.MAX_LEN}", *sys.argv[2:]]
    atheris.Setup(args, module.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
