"""`triomesh validate`: every finding code, exit statuses, several paths, -f, stdin, JSON and YAML output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import findings
from proxy.config.validate import main
from tests.config.helpers import doc, dump, service, workload

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, *docs: dict) -> Path:
    path.write_text(dump(*docs))
    return path


def _vs(name: str, spec: dict, namespace: str | None = None) -> dict:
    return doc("VirtualService", name, spec, namespace)


def _route(*destinations: dict) -> dict:
    return {"http": [{"route": [{"destination": d} for d in destinations]}]}


def _gateway(name: str, *hosts: str, port: int = 8080, selector: dict | None = None) -> dict:
    spec: dict = {"servers": [{"port": {"number": port, "protocol": "HTTP", "name": "http"}, "hosts": list(hosts)}]}
    if selector is not None:
        spec["selector"] = selector
    return doc("Gateway", name, spec)


def _base() -> list[dict]:
    """A valid mesh: service a (one port, subset v1) with a workload."""
    return [
        service("a"),
        workload("w", "a", 9000),
        doc("DestinationRule", "a", {"host": "a", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
    ]


def _line(text: str, content: str) -> int:
    """1-based number of the only line of `text` that holds `content` (indentation aside)."""
    numbers = [i for i, line in enumerate(text.splitlines(), 1) if line.strip() == content]
    assert len(numbers) == 1, (content, numbers)
    return numbers[0]


def _json(capsys, *argv: str) -> tuple[int, list[dict]]:
    status = main(["-o", "json", *argv])
    return status, json.loads(capsys.readouterr().out)


def _codes(found: list[dict]) -> list[str]:
    return [f["code"] for f in found]


def _triomesh(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "validate", *argv], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


# --------------------------------------------------------------------------------------------------
# every code


def test_referenced_resources_not_found_all_reported(tmp_path, capsys):
    two_ports = service("b", ports=[{"number": 80, "name": "http", "protocol": "HTTP"},
                                    {"number": 81, "name": "http2", "protocol": "HTTP"}])
    f = _write(tmp_path / "refs.yaml", *_base(), two_ports, _vs("r", {
        "hosts": ["a"],
        "gateways": ["nogw", "mesh"],
        "http": [
            {"route": [{"destination": {"host": "ratings"}}]},
            {"route": [{"destination": {"host": "a", "subset": "v9"}}]},
            {"route": [{"destination": {"host": "a", "port": {"number": 9999}}}]},
            {"route": [{"destination": {"host": "b"}}]},
            {"match": [{"gateways": ["other/gw"]}], "route": [{"destination": {"host": "a"}}]},
        ],
    }), doc("DestinationRule", "ghost", {"host": "ghost"}))
    status, found = _json(capsys, str(f))
    assert status == 1
    assert [(x["code"], x["message"], x["origin"]["path"]) for x in found] == [
        ("IST0101", 'Referenced gateway not found: "default/nogw"', "$.spec.gateways[0]"),
        ("IST0101", 'Referenced gateway not found: "other/gw"', "$.spec.http[4].match[0].gateways[0]"),
        ("IST0101", 'Referenced host not found: "ratings"', "$.spec.http[0].route[0].destination.host"),
        ("IST0101", 'Referenced host+subset in destinationrule not found: "a+v9"',
         "$.spec.http[1].route[0].destination.subset"),
        ("IST0101", 'Referenced host:port not found: "a:9999"', "$.spec.http[2].route[0].destination.port.number"),
        ("IST0112", 'This VirtualService routes to a service "b" that exposes multiple ports [80, 81]. '
                    "Specifying a port in the destination is required to disambiguate.",
         "$.spec.http[3].route[0].destination.port"),
        ("IST0101", 'Referenced host not found: "ghost"', "$.spec.host"),
    ]
    assert all(x["level"] == "Error" for x in found)
    vs = found[0]["origin"]
    assert (vs["kind"], vs["namespace"], vs["name"], vs["file"], vs["document"]) == ("VirtualService", "default", "r", str(f), 4)
    # the line is that of the field in the file
    lines = f.read_text().splitlines()
    assert lines[found[2]["origin"]["line"] - 1].strip() == "host: ratings"
    assert lines[found[6]["origin"]["line"] - 1].strip() == "host: ghost"


def test_mirror_and_tcp_destinations_are_checked(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(), _vs("r", {
        "hosts": ["a"],
        "http": [{"route": [{"destination": {"host": "a"}}], "mirror": {"host": "shadow"}}],
        "tcp": [{"route": [{"destination": {"host": "db"}}]}],
    }))
    status, found = _json(capsys, str(f))
    assert status == 1
    assert [(x["message"], x["origin"]["path"]) for x in found] == [
        ('Referenced host not found: "shadow"', "$.spec.http[0].mirror.host"),
        ('Referenced host not found: "db"', "$.spec.tcp[0].route[0].destination.host"),
    ]


def test_schema_errors_in_every_document_and_file(tmp_path, capsys):
    one = _write(tmp_path / "one.yaml",
                 _gateway("gw", "*") | {"spec": {"servers": [{"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"], "bogus": 1}]}},
                 *_base(),
                 {"apiVersion": "networking.istio.io/v1", "kind": "RouteRule", "metadata": {"name": "old"}})
    two = _write(tmp_path / "two.yaml", _vs("bad", {"hosts": ["a"], "http": [{"timeout": "soon", "route": [{"destination": {"host": "a"}}]}]}))
    status, found = _json(capsys, str(one), str(two))
    assert status == 1
    assert [(x["code"], x["origin"]["file"], x["origin"]["document"], x["origin"]["path"]) for x in found] == [
        ("IST0106", str(one), 0, "$.spec.servers[0].bogus"),
        ("IST0106", str(one), 4, "$.kind"),
        ("IST0106", str(two), 0, "$.spec.http[0].timeout"),
    ]
    assert found[0]["message"] == "Schema validation error: $.spec.servers[0].bogus: unknown field `bogus`"
    assert one.read_text().splitlines()[found[0]["origin"]["line"] - 1].strip() == "bogus: 1"


def test_invalid_yaml_ends_the_file_but_not_the_others(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text(dump(service("a")) + "---\nkey: 1\nkey: 2\n---\nx: [\n---\n" + dump(service("never")))
    other = _write(tmp_path / "other.yaml", _vs("r", {"hosts": ["a"], **_route({"host": "nope"})}))
    status, found = _json(capsys, str(broken), str(other))
    assert status == 1
    lines = broken.read_text().splitlines()
    assert [(x["code"], x["origin"]["file"], x["origin"]["document"], x["origin"]["line"]) for x in found] == [
        ("TM0001", str(broken), 1, lines.index("key: 2") + 1),  # duplicate key: only that document
        ("TM0001", str(broken), 2, lines.index("x: [") + 2),  # syntax error (seen at the next line): the rest of the file is lost
        ("IST0101", str(other), 0, _line(other.read_text(), "host: nope")),
    ]
    assert "found duplicate key 'key'" in found[0]["message"]


def test_duplicate_resource(tmp_path, capsys):
    a = _write(tmp_path / "a.yaml", *_base())
    b = _write(tmp_path / "b.yaml", service("a"))
    status, found = _json(capsys, str(a), str(b))
    assert status == 1
    assert _codes(found) == ["TM0002"]
    assert found[0]["origin"]["file"] == str(b)
    assert found[0]["message"] == f"duplicate ServiceEntry default/a: already defined in {a} document 0"


def test_a_file_named_twice_is_loaded_once(tmp_path, capsys):
    f = _write(tmp_path / "a.yaml", *_base())
    assert main([str(tmp_path), str(f), "-f", str(f)]) == 0
    assert capsys.readouterr().out.startswith("ok: 3 resources")


def test_conflicting_mesh_virtual_service_hosts(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(),
               _vs("one", {"hosts": ["a"], **_route({"host": "a"})}),
               _vs("two", {"hosts": ["a.default.svc.cluster.local"], **_route({"host": "a"})}))
    status, found = _json(capsys, str(f))
    assert status == 1
    assert _codes(found) == ["IST0109", "IST0109"]
    assert [x["origin"]["name"] for x in found[:2]] == ["one", "two"]
    assert found[0]["message"].startswith("The VirtualServices default/one,default/two associated with mesh gateway "
                                          "define the same host a.default.svc.cluster.local")


def test_multiple_sidecars_without_workload_selectors(tmp_path, capsys):
    sidecar = {"egress": [{"hosts": ["./*"]}]}
    f = _write(tmp_path / "x.yaml", *_base(), doc("Sidecar", "s1", sidecar), doc("Sidecar", "s2", sidecar))
    status, found = _json(capsys, str(f))
    assert status == 1
    assert _codes(found) == ["IST0111", "IST0111"]
    assert found[0]["message"] == ('The Sidecars [s1 s2] in namespace "default" have no workload selector, '
                                   "which can lead to undefined behavior.")


def test_conflicting_gateways(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(),
               _gateway("gw1", "a.example.com", selector={"istio": "ingress"}),
               _gateway("gw2", "*.example.com", selector={"istio": "ingress"}),
               _gateway("gw3", "a.example.com", selector={"istio": "other"}),  # another workload: no conflict
               _gateway("gw4", "a.example.com", port=9090, selector={"istio": "ingress"}))  # another port
    status, found = _json(capsys, str(f))
    assert status == 1
    assert [(x["code"], x["origin"]["name"], x["message"]) for x in found] == [
        ("IST0145", "gw2", "Conflict with gateways default/gw1 (workload selector istio=ingress, port 8080, hosts ['*.example.com'])."),
    ]


def test_host_not_in_gateway_is_a_warning_and_exits_0(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(), _gateway("gw", "a.example.com"),
               _vs("edge", {"hosts": ["b.example.com"], "gateways": ["gw"], **_route({"host": "a"})}))
    assert main([str(f)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"Warning [IST0132] (VirtualService default/edge {f}:{_line(f.read_text(), '- gw')}) one or more host ['b.example.com'] defined in "
        "VirtualService default/edge not found in Gateway default/gw.",
        "ok: 5 resources (1 ServiceEntry, 1 WorkloadEntry, 1 DestinationRule, 1 Gateway, 1 VirtualService); "
        "1 listeners, 2 clusters",
    ]
    assert err == ""
    # --failure-threshold (alias --fail-on) makes warnings fail, as istioctl's
    assert main([str(f), "--fail-on", "warning"]) == 1
    assert main([str(f), "--failure-threshold", "Warning"]) == 1
    assert main([str(f), "--failure-threshold", "Error"]) == 0


def test_not_accepted_by_compiler(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(), service("b", port=8081),
               _vs("split", {"hosts": ["a"], "http": [{"route": [
                   {"destination": {"host": "a"}, "weight": 60}, {"destination": {"host": "b"}, "weight": 60}]}]}))
    status, found = _json(capsys, str(f))
    assert status == 1
    assert [(x["code"], x["message"], x["origin"]["path"]) for x in found] == [
        ("TM0003", "Not accepted by triomesh: $.spec.http[0].route: total destination weight 120 != 100", "$.spec.http[0].route"),
    ]


def test_compiler_error_at_a_reported_field_is_not_repeated(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(), _vs("r", {"hosts": ["a"], **_route({"host": "a", "subset": "v2"})}))
    status, found = _json(capsys, str(f))
    assert status == 1
    assert _codes(found) == ["IST0101"]


def test_duplicate_subset_across_destination_rules(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base(),
               doc("DestinationRule", "a-more", {"host": "a.default.svc.cluster.local",
                                                 "subsets": [{"name": "v1", "labels": {"version": "v2"}}]}))
    main(["-o", "json", str(f)])  # exit status depends on whether the compiler merges the rules
    found = json.loads(capsys.readouterr().out)
    dup = [x for x in found if x["code"] == "TM0004"]
    assert [(x["level"], x["origin"]["name"], x["origin"]["path"]) for x in dup] == [
        ("Warning", "a-more", "$.spec.subsets[0].name")]


def test_every_code_is_documented_and_exercised():
    doc_text = (ROOT / "docs" / "validate.md").read_text()
    tests_text = Path(__file__).read_text()
    for code in findings.CODES:
        assert f"| {code.code} | {code.name} | {code.level.label} |" in doc_text, code
        assert f'"{code.code}"' in tests_text or f"[{code.code}]" in tests_text, code


# --------------------------------------------------------------------------------------------------
# paths, output and exit statuses


def test_ok_summary_unchanged(tmp_path, capsys):
    _write(tmp_path / "10-services.yaml", *_base())
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("ok: 3 resources (1 ServiceEntry, 1 WorkloadEntry, 1 DestinationRule); 0 listeners, 2 clusters\n", "")


def test_several_paths_and_repeated_f(tmp_path, capsys):
    d = tmp_path / "dir"
    d.mkdir()
    _write(d / "services.yml", *_base())
    gw = _write(tmp_path / "gw.yaml", _gateway("gw", "a.example.com"))
    vs = _write(tmp_path / "vs.yaml", _vs("edge", {"hosts": ["a.example.com"], "gateways": ["gw"], **_route({"host": "a"})}))
    assert main([str(d), "-f", str(gw), "-f", str(vs)]) == 0
    assert capsys.readouterr().out.startswith("ok: 5 resources")
    # without the Gateway the VirtualService's reference is missing: all of them were read
    assert main(["-f", str(d), "-f", str(vs)]) == 1
    assert capsys.readouterr().out.startswith(f'Error [IST0101] (VirtualService default/edge {vs}:')


def test_yaml_output(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", _vs("r", {"hosts": ["a"], **_route({"host": "a"})}))
    assert main(["-o", "yaml", str(f)]) == 1
    found = yaml.safe_load(capsys.readouterr().out)
    assert [(x["code"], x["level"], x["origin"]["kind"]) for x in found] == [("IST0101", "Error", "VirtualService")]


def test_json_output_when_clean_is_an_empty_list(tmp_path, capsys):
    f = _write(tmp_path / "x.yaml", *_base())
    assert _json(capsys, str(f)) == (0, [])


@pytest.mark.parametrize("argv, message", [
    ([], "no config to check"),
    (["/nonexistent/x.yaml"], "/nonexistent/x.yaml: no such file or directory"),
    (["-o", "xml", "x.yaml"], "invalid choice: 'xml'"),
    (["--fail-on", "fatal", "x.yaml"], "expected one of Error, Warning, Info"),
])
def test_usage_errors_exit_2(argv, message):
    run = _triomesh(*argv)
    assert run.returncode == 2, run
    assert message in run.stderr
    assert run.stdout == ""


def test_empty_directory_exits_2(tmp_path):
    run = _triomesh(str(tmp_path))
    assert (run.returncode, run.stderr.strip()) == (2, f"error: {tmp_path}: directory holds no *.yaml or *.yml files")


def test_stdin_and_exit_statuses_of_the_real_command(tmp_path):
    good = dump(*_base())
    run = _triomesh("-", stdin=good)
    assert (run.returncode, run.stdout, run.stderr) == (
        0, "ok: 3 resources (1 ServiceEntry, 1 WorkloadEntry, 1 DestinationRule); 0 listeners, 2 clusters\n", "")
    bad = dump(_vs("r", {"hosts": ["a"], **_route({"host": "ratings"})}))
    run = _triomesh("-f", "-", "-o", "json", stdin=bad)
    assert run.returncode == 1
    found = json.loads(run.stdout)
    assert [(x["code"], x["origin"]["file"], x["origin"]["line"]) for x in found] == [("IST0101", "<stdin>", _line(bad, "host: ratings"))]
    # stdin together with files: references across them resolve
    services = _write(tmp_path / "services.yaml", *_base(), service("ratings", port=8082))
    run = _triomesh(str(services), "-", stdin=bad)
    assert run.returncode == 0 and run.stdout.startswith("ok: 5 resources"), run
    run = _triomesh("-", stdin=bad)
    assert run.returncode == 1
    assert run.stdout == f'Error [IST0101] (VirtualService default/r <stdin>:{_line(bad, "host: ratings")}) Referenced host not found: "ratings"\n'
    assert run.stderr == "error: 1 error(s), 0 warning(s) and info(s) in 1 file(s)\n"


def test_references_to_a_kind_that_failed_to_decode_are_not_reported(tmp_path, capsys):
    rule = doc("DestinationRule", "a", {"host": "a", "trafficPolicy": {"tls": {"mode": "SIMPLE", "caCrl": "/crl.pem"}},
                                        "subsets": [{"name": "v1", "labels": {"version": "v1"}}]})
    f = _write(tmp_path / "x.yaml", service("a"), workload("w", "a", 9000), rule,
               _vs("r", {"hosts": ["a"], "gateways": ["nogw"], **_route({"host": "a", "subset": "v1"})}))
    status, found = _json(capsys, str(f))
    assert status == 1
    # the subset is not "not found" (its rule failed), the gateway still is
    assert [(x["code"], x["origin"]["path"]) for x in found] == [
        ("IST0106", "$.spec.trafficPolicy.tls.caCrl"), ("IST0101", "$.spec.gateways[0]")]


def test_a_kubectl_list_is_checked_item_by_item(tmp_path, capsys):
    """`kubectl get -o yaml` of several objects prints a v1 List: its items load like documents, and a
    bad item is reported at its own path and line without hiding the next one."""
    good = _gateway("g", "*")
    bad_spec = _gateway("h", "*")
    bad_spec["spec"]["bogus"] = 1
    bad_port = _gateway("i", "*")
    bad_port["spec"]["servers"][0]["bogus2"] = 2
    f = _write(tmp_path / "list.yaml", {"apiVersion": "v1", "kind": "List", "items": [good, bad_spec, bad_port]})
    status, found = _json(capsys, str(f))
    assert status == 1
    assert [(x["code"], x["origin"]["name"], x["origin"]["path"]) for x in found] == [
        ("IST0106", "h", "$.items[1].spec.bogus"),
        ("IST0106", "i", "$.items[2].spec.servers[0].bogus2"),
    ]
    lines = f.read_text().splitlines()
    assert lines[found[0]["origin"]["line"] - 1].strip() == "bogus: 1"
    assert lines[found[1]["origin"]["line"] - 1].strip() == "bogus2: 2"
    assert main([str(tmp_path / "list.yaml"), "--failure-threshold", "Error"]) == 1
    f.write_text(dump({"apiVersion": "v1", "kind": "List", "items": [good]}))
    assert main([str(f)]) == 0
