"""The fuzz targets: their seed corpus replayed as plain tests, then each target under atheris for a
bounded time (TRIOMESH_FUZZ_SECONDS per target, default 15; 0 skips the atheris runs)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from tests.fuzz import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"
FUZZ_SECONDS = int(os.environ.get("TRIOMESH_FUZZ_SECONDS", "15"))


def _corpus() -> list:
    return [pytest.param(t, p, id=f"{t}/{p.name}") for t in TARGETS for p in sorted((CORPUS / t).iterdir())]


@pytest.mark.parametrize("target,path", _corpus())
def test_seed_input_holds_the_property(target: str, path: Path) -> None:
    importlib.import_module(f"tests.fuzz.fuzz_{target}").check(path.read_bytes())


def test_every_target_has_a_seed_corpus() -> None:
    assert all(any((CORPUS / t).iterdir()) for t in TARGETS)


@pytest.mark.skipif(FUZZ_SECONDS <= 0, reason="TRIOMESH_FUZZ_SECONDS=0 turns the atheris runs off")
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_bounded(target: str) -> None:
    pytest.importorskip("atheris", reason="atheris is in the test extra: pip install -e '.[test]'")
    from tests.fuzz.__main__ import run_target

    result = run_target(target, FUZZ_SECONDS)
    print(result.summary())
    assert result.runs > 0, result.output[-3000:]
    assert result.returncode == 0, f"{result.summary()}\n{result.output[-6000:]}"
