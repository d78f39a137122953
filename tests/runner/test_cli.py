"""The `triomesh` command line: flags and defaults of `proxy`, delegation of `validate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import build_parser, default_concurrency, parse_args
from proxy.xds.failover import ControlPlaneAddress
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
    ["proxy"],  # neither --config nor --controlplane
    ["proxy", "--controlplane", "15010"],
    ["proxy", "--controlplane", "127.0.0.1:15010"],  # TLS: the control plane's root is needed
    ["proxy", "--controlplane", "127.0.0.1:15010", "--controlplane-plaintext", "--controlplane-ca", "root.pem"],
    ["proxy", "--controlplane", "127.0.0.1:15010", "--label", "novalue"],
    ["proxy", "--controlplane", "127.0.0.1:15010", "--label", "=v"],
    ["proxy", "--config", "c", "--drain-duration", "-1s"],
    ["proxy", "--config", "c", "--drain-duration", "5m"],
    ["proxy", "--config", "c", "--drain-duration", "inf"],
    [],
])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_proxy_controlplane_flags() -> None:
    args = parse_args(["proxy", "--controlplane", "127.0.0.1:15010", "--controlplane-ca", "root.pem",
                       "--controlplane-token-file", "t", "--service-account", "reviews"])
    assert (args.controlplane_ca, args.controlplane_token_file, args.service_account) == (Path("root.pem"), Path("t"),
                                                                                          "reviews")
    args = parse_args(["proxy", "--controlplane", "127.0.0.1:15010", "--controlplane-plaintext"])
    assert args.config is None and args.controlplane == (ControlPlaneAddress("127.0.0.1", 15010),)
    assert (args.node_id, args.namespace, args.labels, args.register) == (None, "default", [], None)
    args = parse_args(["proxy", "--config", "boot.yaml", "--controlplane", "[::1]:15010", "--controlplane-plaintext",
                       "--node-id", "gw-1",
                       "--namespace", "tutorial", "--label", "app=edge", "--label", "version=v1=x",
                       "--label", "empty=", "--register", "127.0.0.5"])
    assert args.config == Path("boot.yaml") and args.controlplane == (ControlPlaneAddress("::1", 15010),)
    assert (args.node_id, args.namespace, args.register) == ("gw-1", "tutorial", "127.0.0.5")
    assert dict(args.labels) == {"app": "edge", "version": "v1=x", "empty": ""}
    args = parse_args(["proxy", "--controlplane", "cp-0:15010, cp-1:15010,cp-0:15010", "--controlplane-plaintext"])
    assert args.controlplane == (ControlPlaneAddress("cp-0", 15010), ControlPlaneAddress("cp-1", 15010))
    with pytest.raises(SystemExit) as e:
        parse_args(["proxy", "--controlplane", "cp-0:15010,cp-1", "--controlplane-plaintext"])
    assert e.value.code == 2


@pytest.mark.parametrize(("text", "seconds"), [("5s", 5.0), ("500ms", 0.5), ("2.5", 2.5), ("0s", 0.0)])
def test_drain_duration_as_istio_writes_durations(text: str, seconds: float) -> None:
    assert parse_args(["proxy", "--config", "c", "--drain-duration", text]).drain_duration == seconds


def test_drain_duration_defaults_to_istios_5s() -> None:
    assert parse_args(["proxy", "--config", "c"]).drain_duration == 5.0


@pytest.mark.parametrize(("text", "size"), [("512Mi", 512 << 20), ("1Gi", 1 << 30), ("500M", 500_000_000),
                                          ("64Ki", 65536), ("123456", 123456)])
def test_max_worker_rss_as_kubernetes_writes_quantities(text: str, size: int) -> None:
    assert parse_args(["proxy", "--config", "c", "--max-worker-rss", text]).max_worker_rss == size


@pytest.mark.parametrize("text", ["0", "1.5Gi", "-1Mi", "512MB", "Mi", ""])
def test_max_worker_rss_refuses_what_is_not_a_size(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["proxy", "--config", "c", f"--max-worker-rss={text}"])
    assert exit_info.value.code == 2
    assert "expected a size" in capsys.readouterr().err


def test_overload_limits_default_to_none_and_take_a_positive_connection_count(capsys) -> None:
    args = parse_args(["proxy", "--config", "c"])
    assert (args.max_downstream_connections, args.max_worker_rss) == (None, None)
    assert parse_args(["proxy", "--config", "c", "--max-downstream-connections", "100"]).max_downstream_connections == 100
    with pytest.raises(SystemExit):
        parse_args(["proxy", "--config", "c", "--max-downstream-connections", "0"])


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
    assert f"(VirtualService test/backend {bad}:" in r.stdout and "weight" in r.stdout, r.stdout


def test_help_lists_the_subcommands() -> None:
    r = _triomesh("--help")
    assert r.returncode == 0
    for name in ("proxy", "validate", "capture", "controlplane", "apply", "delete", "proxy-status", "proxy-config"):
        assert name in r.stdout
    r = _triomesh("validate", "--help")
    assert r.returncode == 0 and "FILE|DIR" in r.stdout
    for name, usage in (("controlplane", "usage: triomesh controlplane"), ("apply", "usage: triomesh apply"),
                        ("proxy-status", "usage: triomesh proxy-status"), ("proxy-config", "usage: triomesh proxy-config")):
        r = _triomesh(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(usage), (name, r.stdout)
    r = _triomesh("proxy")
    assert r.returncode == 2 and "--config or --controlplane is required" in r.stderr
