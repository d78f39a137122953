"""gRPC through two transparent sidecars in real namespaces: an unchanged grpcio client in "app" calls
a ServiceEntry's virtual IP (port protocol GRPC); app's capture rules hand the connection to its
sidecar (:15001), which sniffs the HTTP/2 preface, routes it at L7 on `outbound|7070|echo.shop.internal`
and speaks h2c to the endpoint, the "server" node; there the capture rules hand it to the server's
sidecar (:15006), whose Sidecar ingress port 7070 (GRPC) forwards it at L7 over h2c to the app on
127.0.0.1:7070 (its defaultEndpoint). The gRPC server listens on 127.0.0.1 only, so a call can only
succeed through the inbound sidecar.

Covers unary (trailing metadata, x-request-id kept), a server stream of 3 x 1 MiB (then four more),
a client stream, lockstep bidi (needs both directions streaming at once), an error status with its
details, a deadline exceeded, and both sidecars' L7 stats. The client runs with grpc-core's HTTP/2
frame trace, so a failed call's assertion message shows the frames the client could not parse."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from examples.mesh_demo import stat_value
from proxy.l4.capture import iptables
from proxy.l4.capture.lab import Lab, open_lab
from proxy.l4.capture.rules import CaptureOptions

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "iptables-restore", "setpriv")) and not os.environ.get("CI"),
        reason="needs ip (iproute2), iptables-restore (iptables) and setpriv (util-linux)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
PROXY_GID = 1337
ADMIN_PORT = 15000
HOST = "echo.shop.internal"
VIP = "198.18.0.203"
PORT = 7070
SERVER_NAME = "echo-server"
OUTBOUND_CLUSTER = f"outbound|{PORT}||{HOST}"
INBOUND_CLUSTER = f"inbound|{PORT}||"
MIB = 1024 * 1024
READY_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 20.0
STREAM_REPEATS = 4  # server streams after the first

# one config for both sidecars, as a mesh gives every workload the same resources: app's sidecar uses
# the ServiceEntry (egress), server's the ingress port (in app nothing is sent to 7070, so unused)
CONFIG = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: SERVER_IP}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: shop}}
spec:
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
  ingress:
  - port: {{number: {PORT}, name: grpc, protocol: GRPC}}
    captureMode: IPTABLES
    defaultEndpoint: 127.0.0.1:{PORT}
  egress:
  - captureMode: IPTABLES
    hosts: ["*/*"]
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # no http_proxy: capture does it
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["GRPC_DNS_RESOLVER"] = "native"  # getaddrinfo: the node's hosts file names the VIP
    env["GRPC_VERBOSITY"] = "ERROR"
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of our own child (a proxy's workers included), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: no log)"
    return f"--- {path} ---\n" + "\n".join(text.splitlines()[-lines:])


@contextmanager
def spawned(lab: Lab, node: str, argv: list[str], log_path: Path, gid: int | None = None) -> Iterator[subprocess.Popen]:
    """A process in a node's namespace, in its own session (so its group is ours to signal), output
    to `log_path`; stopped on exit."""
    if gid is not None:
        argv = ["setpriv", f"--regid={gid}", "--clear-groups", *argv]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(lab.argv(node, argv), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
                                start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)


def admin_get(lab: Lab, node: str, path: str) -> tuple[int, str]:
    """GET on a sidecar's admin listener (127.0.0.1:15000 inside the node): (status, body); (0, "")
    when it does not answer."""
    sock = lab.socket(node)
    sock.settimeout(2)
    try:
        sock.connect(("127.0.0.1", ADMIN_PORT))
    except OSError:
        sock.close()
        return 0, ""
    conn = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=2)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return 0, ""
    finally:
        conn.close()


def stats(lab: Lab, node: str) -> str:
    status, body = admin_get(lab, node, "/stats/prometheus")
    assert status == 200, f"{node}'s admin /stats/prometheus answered {status}"
    return body


def wait_ready(lab: Lab, sidecars: dict[str, tuple[subprocess.Popen, Path]], server: tuple[subprocess.Popen, Path]) -> None:
    """Both sidecars answer /ready 200 and the gRPC server printed "serving", within READY_TIMEOUT_S."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = set(sidecars) | {"server-app"}
    while pending:
        for label in sorted(pending):
            proc, log = sidecars.get(label, server)
            assert proc.poll() is None, f"{label} exited with {proc.returncode}\n{_tail(log)}"
            if label == "server-app":
                ready = f"serving {PORT}" in log.read_text(errors="replace")
            else:
                ready = admin_get(lab, label, "/ready")[0] == 200
            if ready:
                pending.discard(label)
        if pending:
            assert time.monotonic() < deadline, (
                f"not ready within {READY_TIMEOUT_S}s: {sorted(pending)}\n"
                + "\n".join(_tail(log) for label, (_, log) in {**sidecars, "server-app": server}.items() if label in pending))
            time.sleep(0.1)


def grpc_call(lab: Lab, logs: list[Path], *args: str) -> list[dict[str, Any]]:
    """`python -m tests.grpc_apps call <args>` in the app node, as root (so captured): its JSON
    lines, one per call. The client runs with grpc-core's HTTP/2 frame trace on; the frames it
    found wrong (and the last ones it parsed) go into each result as "_frames", for describe().
    `logs` are shown if the client fails."""
    argv = [sys.executable, "-m", "tests.grpc_apps", "call", f"{HOST}:{PORT}", *args]
    env = {**_env(), "GRPC_TRACE": "http", "GRPC_VERBOSITY": "DEBUG"}
    try:
        done = subprocess.run(lab.argv("app", argv), check=False, capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=CALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # run() has killed the client already
        raise AssertionError(f"client hung for {CALL_TIMEOUT_S}s: {args}\n{exc.stdout}\n"
                             + "\n".join(_tail(p) for p in logs)) from None
    assert done.returncode == 0, f"client failed ({done.returncode}): {args}\n{done.stdout}\n{done.stderr[-3000:]}"
    frames = [line for line in done.stderr.splitlines() if "INCOMING" in line or "Unknown frame" in line]
    odd = [line for line in frames if "UNKNOWN" in line or "Unknown frame" in line]
    results = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            result["_frames"] = odd[:5] + [line for line in frames[-8:] if line not in odd[:5]]
            results.append(result)
    return results


def by_kind(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["kind"]: r for r in results}


def md(pairs: list[list[str]], key: str) -> str | None:
    return next((v for k, v in pairs if k == key), None)


def describe(result: dict[str, Any], logs: list[Path]) -> str:
    """An assertion message: what the client got, the HTTP/2 frames its parser saw last (an
    UNKNOWN_FRAME_TYPE made of payload bytes means the byte stream it read was out of order),
    and the tails of both sidecars' and the server's logs."""
    shown = {k: v for k, v in result.items() if k != "_frames"}
    frames = "\n".join(result.get("_frames", ()))
    return (f"client saw {json.dumps(shown)}\nclient's last HTTP/2 frames (grpc-core trace):\n{frames}\n"
            + "\n".join(_tail(p) for p in logs))


def test_grpc_through_client_and_server_sidecars(tmp_path: Path) -> None:
    with open_lab(["app", "server"], extra_hosts={HOST: VIP}) as lab, ExitStack() as procs:
        app, server = lab.node("app"), lab.node("server")
        options = CaptureOptions(proxy_uid=str(PROXY_GID), proxy_gid=str(PROXY_GID))
        sidecars: dict[str, tuple[subprocess.Popen, Path]] = {}
        for node in (app, server):
            config_dir = tmp_path / node.name
            config_dir.mkdir()
            (config_dir / "config.yaml").write_text(CONFIG.replace("SERVER_IP", server.ipv4))
            iptables.install(options, netns=node.netns)
            log = config_dir / "proxy.log"
            argv = [sys.executable, "-m", "proxy.cli", "proxy", "--config", str(config_dir), "--concurrency", "1",
                    "--access-log", "json", "--admin-address", f"127.0.0.1:{ADMIN_PORT}"]
            sidecars[node.name] = (procs.enter_context(spawned(lab, node.name, argv, log, gid=PROXY_GID)), log)
        server_log = tmp_path / "grpc-server.log"
        argv = [sys.executable, "-m", "tests.grpc_apps", "serve", "--port", str(PORT), "--name", SERVER_NAME]
        server_proc = procs.enter_context(spawned(lab, "server", argv, server_log))
        wait_ready(lab, sidecars, (server_proc, server_log))
        logs = [sidecars["app"][1], sidecars["server"][1], server_log]

        # the four kinds of call, all OK; 3 x 1 MiB streamed back through both sidecars' flow control
        ok = by_kind(grpc_call(lab, logs, "unary", "server_stream", "client_stream", "bidi",
                               "--metadata", "x-request-id=grpc-mesh-1", "--count", "3", "--size", str(MIB),
                               "--messages", "5", "--message-size", "1000", "--timeout", "5"))
        assert set(ok) == {"unary", "server_stream", "client_stream", "bidi"}, ok
        unary = ok["unary"]
        assert unary["code"] == "OK", describe(unary, logs)
        assert unary["response"] == f"{SERVER_NAME}:hello"
        assert md(unary["trailing_metadata"], "x-served-by") == SERVER_NAME, describe(unary, logs)
        # the client's x-request-id crosses both sidecars unchanged (the server echoes it)
        assert md(unary["initial_metadata"], "x-request-id") == "grpc-mesh-1", describe(unary, logs)
        assert md(unary["trailing_metadata"], "x-request-id") == "grpc-mesh-1", describe(unary, logs)
        stream = ok["server_stream"]
        assert stream["code"] == "OK", "server stream of 3 x 1 MiB failed through the sidecars: " + describe(stream, logs)
        assert stream["sizes"] == [MIB] * 3 and stream["intact"], describe(stream, logs)
        assert md(stream["trailing_metadata"], "x-served-by") == SERVER_NAME
        upload = ok["client_stream"]
        assert upload["code"] == "OK", describe(upload, logs)
        assert upload["response"] == "5:5000" and upload["intact"], describe(upload, logs)
        # lockstep: message k+1 is sent only after echo k came back, so this fails (deadline) if a
        # sidecar buffered the request stream
        echo = ok["bidi"]
        assert echo["code"] == "OK", describe(echo, logs)
        assert echo["count"] == 5 and echo["intact"], describe(echo, logs)

        # the same server stream a few more times: a sidecar that writes a large response while
        # the client's socket is full must keep the HTTP/2 frames in order every time
        again = grpc_call(lab, logs, *["server_stream"] * STREAM_REPEATS, "--count", "3", "--size", str(MIB),
                          "--timeout", "3")
        assert len(again) == STREAM_REPEATS, again
        for i, stream in enumerate(again):
            assert stream["code"] == "OK" and stream["intact"], \
                f"server stream {i + 2} of 3 x 1 MiB failed through the sidecars: " + describe(stream, logs)

        # an error status crosses both sidecars as the server sent it, trailers-only with details
        failed = grpc_call(lab, logs, "unary", "--metadata", "x-fail-status=5", "--timeout", "10")[0]
        assert failed["code"] == "NOT_FOUND", describe(failed, logs)
        assert failed["details"] == "failed on purpose", describe(failed, logs)
        assert md(failed["trailing_metadata"], "x-served-by") == SERVER_NAME, describe(failed, logs)

        # a deadline the server cannot meet: the call ends near its 0.5 s, not after the server's 3 s
        # delay. Two timers race there: the client's own deadline and the sidecars', which take the
        # client's grpc-timeout as the route timeout and answer DEADLINE_EXCEEDED "upstream request
        # timeout" (as Envoy does since its runtime guard grpc_timeout_returns_deadline_exceeded;
        # before, a 504 mapped to UNAVAILABLE, which clients retry). Either way: DEADLINE_EXCEEDED.
        late = grpc_call(lab, logs, "unary", "--metadata", "x-delay-ms=3000", "--timeout", "0.5")[0]
        assert (late["code"], late["details"]) in {
            ("DEADLINE_EXCEEDED", "Deadline Exceeded"),
            ("DEADLINE_EXCEEDED", "Stream removed (Deadline Exceeded)"),
            ("DEADLINE_EXCEEDED", "upstream request timeout"),
        }, describe(late, logs)
        assert late["elapsed_s"] < 2.5, describe(late, logs)

        # the client sidecar served all of it at L7 over HTTP/2: at least one captured connection per
        # client process, at most one per call (grpc-core may reuse a subchannel across the channels
        # of one process), upstream requests counted on the gRPC cluster
        client = stats(lab, "app")
        calls = 6 + STREAM_REPEATS  # in 4 client processes
        captured_http = stat_value(client, "triomesh_sidecar_cx_total", listener="virtualOutbound", action="http")
        assert 4 <= captured_http <= calls, "\n".join(l for l in client.splitlines() if "sidecar_cx" in l)
        assert stat_value(client, "triomesh_sidecar_cx_total", action="tcp") == 0
        assert "triomesh_downstream_cx_http2_active" in client
        upstream = stat_value(client, "triomesh_upstream_rq_total", cluster=OUTBOUND_CLUSTER)
        # the deadline-exceeded call may be counted when the proxy resets it, or not at all
        assert calls - 1 <= upstream <= calls, "\n".join(l for l in client.splitlines() if "upstream_rq" in l)
        # gRPC errors travel in trailers: the HTTP status of those responses is 200 too
        assert stat_value(client, "triomesh_upstream_rq_total", cluster=OUTBOUND_CLUSTER, response_code="200") >= calls - 1
        assert stat_value(client, "triomesh_upstream_cx_total", cluster=OUTBOUND_CLUSTER) >= 1
        # the gRPC status of each call as the sidecar saw it in the trailers (the deadline-exceeded
        # call ends however the race between the client's reset and the sidecar's own grpc-timeout ends)
        assert stat_value(client, "triomesh_downstream_grpc_rq_total", grpc_status="0") == 4 + STREAM_REPEATS, \
            "\n".join(l for l in client.splitlines() if "grpc_rq" in l)
        assert stat_value(client, "triomesh_downstream_grpc_rq_total", grpc_status="5") == 1

        # the server's sidecar took them on its captured ingress port and sent them to the app
        inbound = stats(lab, "server")
        assert stat_value(inbound, "triomesh_sidecar_cx_total", listener="virtualInbound", action="http") >= 1, \
            "\n".join(l for l in inbound.splitlines() if "sidecar_cx" in l)
        served = stat_value(inbound, "triomesh_upstream_rq_total", cluster=INBOUND_CLUSTER)
        assert calls - 1 <= served <= calls, "\n".join(l for l in inbound.splitlines() if "upstream_rq" in l)
        assert "triomesh_downstream_cx_http2_active" in inbound
        assert stat_value(inbound, "triomesh_downstream_grpc_rq_total", grpc_status="0") == 4 + STREAM_REPEATS
        assert stat_value(inbound, "triomesh_downstream_grpc_rq_total", grpc_status="5") == 1

        # the gRPC server saw every call from its sidecar on 127.0.0.1 (stopping it prints them)
        _stop(server_proc)
        records = [json.loads(line[5:]) for line in server_log.read_text().splitlines() if line.startswith("call ")]
        assert len(records) == calls, _tail(server_log)
        assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in records), records
        assert [r["method"].rsplit("/", 1)[1] for r in records] == [
            "Unary", "ServerStream", "ClientStream", "Bidi", *["ServerStream"] * STREAM_REPEATS, "Unary", "Unary"]
