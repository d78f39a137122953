"""The `triomesh` command line: flags and defaults of `proxy`, delegation of `validate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import build_parser, default_concurrency
from tests.runner.harness import REPO_ROOT, mesh_config


def test_proxy_defaults() -> None:
    args = build_parser().parse_args(["proxy", "--config", "/etc/triomesh"])
    assert args.config == Path("/etc/triomesh")
    assert args.concurrency is None  # resolved at start to default_concurrency()
    assert args.bind_address == "0.0.0.0"
    assert args.admin_address == ("127.0.0.1", 15000)
    assert (args.access_log, args.log_level, args.log_format) == ("json", "info", "json")


def test_proxy_flags_as_the_bench_passes_them() -> None:
    args = build_parser().parse_args(["proxy", "--config", "c", "--concurrency", "1", "--access-log", "off",
                                      "--bind-address", "127.0.0.1", "--admin-address", "127.0.0.1:9901",
                                      "--log-level", "error"])
    assert (args.concurrency, args.access_log, args.bind_address, args.admin_address, args.log_level) == (
        1, "off", "127.0.0.1", ("127.0.0.1", 9901), "error")
    assert build_parser().parse_args(["proxy", "--config", "c", "--admin-address", "[::1]:15000"]).admin_address == (
        "::1", 15000)


@pytest.mark.parametrize("argv", [
    ["proxy", "--config", "c", "--concurrency", "0"],
    ["proxy", "--config", "c", "--admin-address", "15000"],
    ["proxy", "--config", "c", "--admin-address", "host:99999"],
    ["proxy", "--config", "c", "--access-log", "xml"],
    ["proxy", "--config", "c", "--log-level", "trace"],
    ["proxy"],
    [],
])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_default_concurrency_is_the_usable_cores() -> None:
    assert default_concurrency() == len(os.sched_getaffinity(0))


def _triomesh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


def test_validate_ok_and_error(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(mesh_config(8080, 9001, 9002))
    r = _triomesh("validate", str(good))
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(mesh_config(8080, 9001, 9002, weights=(80, -5)))
    r = _triomesh("validate", str(bad))
    assert r.returncode == 1
    assert str(bad) in r.stderr and "document 3 (VirtualService test/backend)" in r.stderr and "weight" in r.stderr


def test_help_lists_the_subcommands() -> None:
    r = _triomesh("--help")
    assert r.returncode == 0
    for name in ("proxy", "validate", "capture"):
        assert name in r.stdout
    r = _triomesh("validate", "--help")
    assert r.returncode == 0 and "FILE|DIR" in r.stdout
