"""The loopback demo end to end: sample apps behind the real `triomesh proxy`, the 80/20 split observed.

The config is the demo's own (examples/demo/), copied with every port moved to a free one, so the
test runs beside anything (a running `make demo` included). The apps reach each other only through
the proxy's Sidecar egress listener (http_proxy), so every answer crossed the mesh three times.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from examples.demo import (CHAIN, DEMO_CONFIG, REPO_ROOT, Answer, Mesh, http_get, relocate_config, send_requests,
                           shift_report, unique_free_ports, version_counts)

REQUESTS = 800
V2_WEIGHT = 0.20
# Binomial: the v2 share of 800 picks has sd sqrt(0.2*0.8/800) = 1.41 points; 6 points is 4.2 sd,
# so a correct 80/20 split fails this about once in 40,000 runs, while 70/30 or 90/10 fail it always.
TOLERANCE = 0.06
SAMPLE_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@pytest.fixture
def mesh(tmp_path: Path):
    config_dir = tmp_path / "config"
    plan = relocate_config(DEMO_CONFIG, config_dir, unique_free_ports())
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with Mesh(plan, config_dir, log_dir) as running:
        yield running


def prometheus_samples(admin_port: int, name: str) -> list[tuple[dict[str, str], float]]:
    status, text = http_get(admin_port, "/stats/prometheus")
    assert status == 200, text
    samples = []
    for line in text.splitlines():
        m = SAMPLE_LINE.match(line)
        if m and m["name"] == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            samples.append((labels, float(m["value"])))
    return samples


def wait_for_stat(admin_port: int, name: str, expected: float, *, timeout_s: float = 10.0) -> float:
    """Workers report their counters to the admin process now and then; wait for them to catch up."""
    deadline = time.monotonic() + timeout_s
    while True:
        total = sum(v for _, v in prometheus_samples(admin_port, name))
        if total >= expected or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


def test_split_80_20_through_the_whole_chain(mesh: Mesh) -> None:
    results = send_requests(mesh.plan.gateway_port, REQUESTS, concurrency=8)

    broken = [(status, body) for status, body in results if status != 200 or not CHAIN.match(body)]
    assert not broken, f"{len(broken)} answers without the full chain, e.g. {broken[:3]}"
    for _, body in results:
        version, instance = CHAIN.match(body).groups()
        assert instance == f"recommendation-{version}", body  # the subset's endpoint answered, not another

    counts = version_counts(body for _, body in results)
    assert set(counts) == {"v1", "v2"}
    v2_share = counts["v2"] / REQUESTS
    sd = math.sqrt(V2_WEIGHT * (1 - V2_WEIGHT) / REQUESTS)
    assert abs(v2_share - V2_WEIGHT) <= TOLERANCE, f"v2 got {v2_share:.1%} ({(v2_share - V2_WEIGHT) / sd:+.1f} sd)"


def test_every_hop_went_through_the_proxy(mesh: Mesh) -> None:
    n = 50
    results = send_requests(mesh.plan.gateway_port, n)
    assert all(status == 200 for status, _ in results), results
    # gateway -> customer, customer -> preference, preference -> recommendation: three proxied requests each
    total = wait_for_stat(mesh.plan.admin_port, "triomesh_downstream_rq_total", 3 * n)
    assert total == 3 * n


def test_a_dead_recommendation_surfaces_as_503_through_the_chain(mesh: Mesh) -> None:
    # Both versions stopped: whatever the mesh's retry policy, no attempt can succeed, so each hop
    # must pass the failure on: the proxy answers preference 503 (connect failure), preference
    # answers 503 with its error text, and so does customer at the edge.
    mesh.stop_one("recommendation-v1")
    mesh.stop_one("recommendation-v2")
    results = send_requests(mesh.plan.gateway_port, 10)

    for status, body in results:
        assert status == 503, (status, body)
        assert body.startswith("customer => Error: 503 - preference => Error: 503 - "), body
    flags = prometheus_samples(mesh.plan.admin_port, "triomesh_response_flags_total")
    assert any(labels.get("flag") == "UF" and value > 0 for labels, value in flags), flags


SAFARI_TO_V2 = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: recommendation
  namespace: tutorial
spec:
  hosts:
  - recommendation
  http:
  - match:
    - headers:
        baggage-user-agent:
          regex: ".*Safari.*"
    route:
    - destination:
        host: recommendation
        subset: v2
  - route:
    - destination:
        host: recommendation
        subset: v1
"""


def test_header_routing_and_request_id_across_the_chain(tmp_path: Path) -> None:
    """customer turns User-Agent into baggage-user-agent and the apps pass it (and x-request-id)
    on, so a match two hops behind the gateway sees it: Safari users get v2, others v1."""
    config_dir = tmp_path / "config"
    plan = relocate_config(DEMO_CONFIG, config_dir, unique_free_ports())
    recommendation = config_dir / "recommendation.yaml"
    docs = [d for d in yaml.safe_load_all(recommendation.read_text()) if d["kind"] != "VirtualService"]
    recommendation.write_text(yaml.safe_dump_all([*docs, yaml.safe_load(SAFARI_TO_V2)], sort_keys=False))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    safari = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15"

    with Mesh(plan, config_dir, log_dir, access_log="json") as mesh:
        as_safari = [http_get(plan.gateway_port, "/", headers={"User-Agent": safari}) for _ in range(10)]
        as_curl = [http_get(plan.gateway_port, "/", headers={"User-Agent": "curl/8.5.0"}) for _ in range(10)]
        traced = http_get(plan.gateway_port, "/", headers={"x-request-id": "demo-trace-1"})

    assert all(s == 200 and "recommendation v2 from" in b for s, b in as_safari), as_safari
    assert all(s == 200 and "recommendation v1 from" in b for s, b in as_curl), as_curl
    assert traced[0] == 200, traced
    hops = [json.loads(line) for line in (log_dir / "proxy.log").read_text().splitlines()
            if '"demo-trace-1"' in line]
    # one access line per hop: gateway -> customer, customer -> preference, preference -> recommendation
    assert sorted(h["authority"].split(":")[0] for h in hops if h.get("event") == "access") == \
        ["127.0.0.1", "preference", "recommendation"], hops


def run_demo_script(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "examples.demo", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def test_the_demo_script_runs_and_reports_the_split(tmp_path: Path) -> None:
    """What `make demo` runs, on free ports: exit 0, every answer printed, the split, the stats."""
    new_port = unique_free_ports()
    plan = relocate_config(DEMO_CONFIG, tmp_path, new_port)
    done = run_demo_script("--config", str(tmp_path), "--admin-port", str(plan.admin_port), "--requests", "40")

    assert done.returncode == 0, done.stdout + done.stderr
    answers = [line for line in done.stdout.splitlines() if re.match(r"^\s+\d+  customer => ", line)]
    assert len(answers) == 40
    assert re.search(r"^observed split: v1 \d+/40 = \d+%  v2 \d+/40 = \d+%", done.stdout, re.M), done.stdout
    assert 'triomesh_downstream_rq_total{response_code="200"} 120' in done.stdout
    assert re.search(r"^stopped 5 processes", done.stdout, re.M)


def test_the_demo_script_names_a_taken_port(tmp_path: Path) -> None:
    plan = relocate_config(DEMO_CONFIG, tmp_path, unique_free_ports())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", plan.gateway_port))
        taken.listen()
        done = run_demo_script("--config", str(tmp_path), "--admin-port", str(plan.admin_port))

    assert done.returncode == 2
    assert f"{plan.gateway_port}  (gateway listener)" in done.stderr
    assert "started" not in done.stdout  # nothing was started


def test_the_controlplane_demo_shifts_live_traffic_within_a_second(tmp_path: Path) -> None:
    """`python -m examples.demo --controlplane` on free ports: the proxy gets the whole demo config from
    `triomesh controlplane`, then `triomesh apply` of examples/demo/changes/recommendation-v2.yaml (v1 0%,
    v2 100%) under steady traffic on 8 keep-alive connections.

    The shift is measured by the script as: receive time of the last answer from v1 minus the moment
    `triomesh apply` returned (the control plane had accepted the change), on one monotonic clock; every
    answer after it came from v2. The test asserts it is under 1 s, that every request sent 1 s or more
    after apply returned got v2 (at least 20 of them), that no request of the whole run failed, that
    proxy-status shows the proxy SYNCED on the new version, and that every process it started is gone."""
    new_port = unique_free_ports()
    config_dir = tmp_path / "config"
    plan = relocate_config(DEMO_CONFIG, config_dir, new_port)
    started = time.monotonic()
    done = run_demo_script("--controlplane", "--config", str(config_dir), "--admin-port", str(plan.admin_port),
                           "--controlplane-port", str(new_port()), timeout_s=60)
    elapsed = time.monotonic() - started
    out = done.stdout

    assert done.returncode == 0, out + done.stderr
    assert re.search(r"^result: ok$", out, re.M), out
    # the proxy was started with --controlplane and no --config, and the 80/20 config reached it
    before = re.search(r"^split before the change \(2\.0 s\): v1 (\d+)/(\d+) = \d+%  v2 (\d+)/\2 = \d+%", out, re.M)
    assert before, out
    v1, total, v2 = int(before[1]), int(before[2]), int(before[3])
    assert v1 > v2 > 0 and v1 + v2 == total, out
    # apply accepted
    assert "\n  VirtualService tutorial/recommendation configured\n  config version 2\n" in out, out
    shifted = re.search(r"^traffic shifted (-?\d+\.\d+) s after `triomesh apply` returned: the last answer from v1 "
                        r"was received then", out, re.M)
    assert shifted, out
    assert float(shifted[1]) < 1.0, out
    settled = re.search(r"^split from 1 s after the change \((\d+) requests\): v2 (\d+)/(\d+) = 100%   "
                        r"\(configured: v1 0%, v2 100%\)$", out, re.M)
    assert settled and int(settled[1]) == int(settled[2]) >= 20, out
    assert re.search(r"^requests: \d+ sent, 0 failed ", out, re.M), out
    # proxy-status: our proxy ACKed what it was sent
    # over TLS with an admin token; the proxy proved its namespace with a bootstrap token and holds its certificate
    assert re.search(r"^  demo-proxy\s+tutorial\s+127\.0\.0\.1\s+SYNCED\s+(\w+)\s+\1\s+"
                     r"spiffe://cluster\.local/ns/tutorial/sa/default\s+\d{4}-\d\d-\d\dT\S+Z\s+-$", out, re.M), out
    assert "  control plane config version 2, 1 proxies\n" in out, out
    # everything it started is stopped
    assert re.search(r"^stopped 6 processes \(controlplane, customer-v1, preference-v1, recommendation-v1, "
                     r"recommendation-v2, proxy\)", out, re.M), out
    for pid in (int(p) for p in re.findall(r"^  started \S+\s+pid (\d+)$", out, re.M)):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"


def _answer(version: str, sent: float, received: float) -> Answer:
    body = f"customer => preference => recommendation {version} from 'recommendation-{version}': 1"
    return Answer(sent, received, 200, body)


def test_shift_report_times_the_last_answer_from_a_retired_version() -> None:
    launched, returned = 10.0, 10.3
    answers = [_answer("v1", 9.9, 10.0), _answer("v2", 10.1, 10.2), _answer("v1", 10.4, 10.5),  # old weights
               _answer("v2", 10.5, 10.6), _answer("v2", 11.3, 11.4), _answer("v2", 11.5, 11.6)]
    report = shift_report(answers, launched, returned, frozenset({"v1"}))
    assert report.last_retired_s == pytest.approx(0.2)
    assert [a.sent for a in report.settled] == [11.3, 11.5] and report.failed == []
    assert report.shifted_within_1s

    late = shift_report(answers + [_answer("v1", 11.25, 11.35)], launched, returned, frozenset({"v1"}))
    assert late.last_retired_s == pytest.approx(1.05) and not late.shifted_within_1s
    failed = shift_report(answers + [Answer(11.0, 11.1, 503, "customer => Error: 503")], launched, returned,
                          frozenset({"v1"}))
    assert [a.status for a in failed.failed] == [503]
    # nothing sent 1 s or more after apply returned: nothing shows the new weights held
    assert not shift_report(answers[:4], launched, returned, frozenset({"v1"})).shifted_within_1s
