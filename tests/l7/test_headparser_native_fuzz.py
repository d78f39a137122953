"""The C head parser (and the response forwarding on top of it) under AddressSanitizer/UBSan: random
mutations in exact-size buffers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.l7._headparser_common import CODES

NATIVE = Path(__file__).resolve().parents[2] / "native"
COMPILER = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@pytest.mark.skipif(COMPILER is None, reason="no C compiler to build the sanitizer harness with")
def test_c_parser_is_memory_safe_under_random_mutations(tmp_path):
    exe = tmp_path / "fuzz_headparser"
    subprocess.run(
        [COMPILER, "-O1", "-g", "-std=c11", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-I", str(NATIVE), str(NATIVE / "fuzz_headparser.c"), str(NATIVE / "headparser.c"),
         str(NATIVE / "forward.c"), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    seen: set[int] = set()
    for seed in (1, 2):
        run = subprocess.run([str(exe), "150000", str(seed)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "ERROR" not in run.stderr and "runtime error" not in run.stderr, run.stderr
        for line in run.stdout.splitlines():
            seen.update(int(item.split(":")[0]) for item in line.split()[1:])
    # the mutations reached every error code (so every rejection path ran under the sanitizers)
    assert {number for number, _ in CODES.values()} <= seen
