"""`triomesh validate FILE|DIR`: exit status and output (more in test_validate_cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from proxy.config.validate import main
from tests.config.helpers import doc, dump, service, workload

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, name: str, *docs: dict) -> Path:
    p = tmp_path / name
    p.write_text(dump(*docs))
    return p


def test_ok_directory(tmp_path, capsys):
    _write(tmp_path, "10-services.yaml", service("a"), workload("w", "a", 9000))
    _write(tmp_path, "20-routes.yml", doc("VirtualService", "a", {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}]}]}))
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "ok: 3 resources (1 ServiceEntry, 1 WorkloadEntry, 1 VirtualService); 0 listeners, 1 clusters\n"
    assert err == ""


def test_error_names_file_document_kind_and_path(tmp_path, capsys):
    bad = doc("VirtualService", "a", {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a", "subset": "v9"}}]}]}, "prod")
    f = _write(tmp_path, "routes.yaml", service("a", namespace="prod"), bad)
    assert main([str(f)]) == 1
    out, err = capsys.readouterr()
    line = f.read_text().splitlines().index("        subset: v9") + 1
    assert out == (
        f"Error [IST0101] (VirtualService prod/a {f}:{line}) "
        'Referenced host+subset in destinationrule not found: "a+v9"\n'
    )
    assert err == "error: 1 error(s), 0 warning(s) and info(s) in 1 file(s)\n"


def test_runs_as_a_program(tmp_path):
    f = _write(tmp_path, "x.yaml", doc("Gateway", "gw", {"servers": [{"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"], "bogus": 1}]}))
    run = subprocess.run([sys.executable, "-m", "proxy.config.validate", str(f)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 1
    line = f.read_text().splitlines().index("    bogus: 1") + 1
    assert run.stdout == (f"Error [IST0106] (Gateway default/gw {f}:{line}) "
                          "Schema validation error: $.spec.servers[0].bogus: unknown field `bogus`\n")
