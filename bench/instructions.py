"""User-space instructions per proxied request, counted by valgrind (callgrind): a figure that does not
move with the machine's load, for comparing two versions of the data path on a shared machine.

    python -m bench.instructions [--source DIR] [--requests N] [--baseline] [--h2 [--h2-upstream]]
                                 [--no-telemetry] [--keep-output DIR] [--trace-sampling PERCENT]
                                 [--connections N] [--streams M]

The proxy (DataPlane + serve_listener on the Istio resources `make bench` gives it: one route to one
nginx endpoint, with Istio's default retry policy) runs in-process under callgrind; h2load sends N1 and then N2 small HTTP/1.1 keep-alive requests on 8
connections in two separate runs, and the difference of the two totals divided by N2 - N1 is the
cost of one request with start-up and shutdown cancelled out. `--source DIR` measures another
checkout (e.g. `git worktree add /tmp/base HEAD~1`); `--baseline` measures a bare Trio forwarder
with the same two waits per request (no HTTP at all), the floor any Trio design pays; `--h2` sends the
requests as h2c (8 connections, 4 streams in flight each) to the same HTTP/1.1 upstream, and with
`--h2-upstream` to nginx's h2c server instead (a ServiceEntry port `protocol: HTTP2`); `--connections`
and `--streams` change that load (`--connections 64 --streams 10` is make bench's, where many requests
are in flight at once: the garbage collector's share shows there).
`--no-telemetry` turns Istio's standard metrics off (`DataPlane(telemetry=False)`), to see what they
cost; `--mesh-external` makes the backend's ServiceEntry MESH_EXTERNAL, so no peer metadata header
goes to it (with and without `--no-telemetry`: what the counters and histograms alone cost); `--keep-output DIR` keeps callgrind's two output files there, for `callgrind_annotate
--inclusive=yes DIR/callgrind.N` (the difference between the two runs' functions is where a
request's instructions go).
`--trace-sampling PERCENT` turns tracing on at that sampling (spans are queued, not exported: the
cost measured is the data path's).
`--opcodes` runs the proxy without valgrind under a tracer that counts the bytecodes each Python
function executes, and prints the functions by bytecodes per request (the same two runs, subtracted):
callgrind shows most of a request inside CPython's eval loop, this shows whose code it is running.
A bytecode costs ~10-30 instructions (more when it calls into C); only counts are comparable, since
tracing slows the proxy ~50x.
The proxy runs with a worker's garbage-collector thresholds (proxy/runner/garbage_collection.py).
Kernel time is not counted: use `make bench` for CPU seconds, and this for the Python path.
The proxy runs with PYTHONHASHSEED=0: with random string hashing two runs of the same code differed by
up to ~3,000 instructions per request, with a fixed seed by tens to ~900 (what remains comes from how
h2load's requests batch into reads); compare versions over two runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bytecode_cache, opcode_counts
from bench.targets import free_port, start_nginx, triomesh_config

_PROXY = r'''
import os, signal, socket, sys
sys.path.insert(0, os.environ["TM_SOURCE"])
import trio

backend_port, port_file, baseline = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
telemetry = os.environ.get("TM_TELEMETRY", "1") == "1"


async def bare_forwarder(nursery):
    """recv downstream, send upstream, recv upstream, send downstream: two Trio waits a request."""
    from trio.lowlevel import wait_readable
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    lsock.setblocking(False)

    async def connection(c):
        u = socket.create_connection(("127.0.0.1", backend_port))
        u.setblocking(False)
        c.setblocking(False)
        while True:
            await wait_readable(c)
            data = c.recv(65536)
            if not data:
                return
            u.send(data)
            await wait_readable(u)
            c.send(u.recv(65536))

    async def accept_loop():
        while True:
            await wait_readable(lsock)
            c, _ = lsock.accept()
            nursery.start_soon(connection, c)

    nursery.start_soon(accept_loop)
    return lsock.getsockname()[1]


async def triomesh(nursery):
    """The benchmark's own Istio resources (bench/targets.py), compiled as `triomesh proxy` would."""
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes
    from proxy.l7.dataplane import DataPlane
    from proxy.l7.server import serve_listener
    from proxy.runtime import SnapshotHolder
    from proxy.stats import Stats
    with open(os.environ["TM_CONFIG"], "rb") as f:
        snapshot = compile_resources(load_bytes(f.read(), "bench.yaml"), version="1", bind_address="127.0.0.1")
    listener = snapshot.listeners[0]
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", listener.port))
    sock.listen(128)
    stats = Stats()
    try:  # the worker's collector thresholds (a checkout older than them runs with CPython's)
        from proxy.runner.garbage_collection import pace_collector
    except ImportError:
        pass
    else:
        pace_collector()
    options = {}  # only what was asked for: --source may be a checkout older than the option
    if not telemetry:  # a checkout from before the metrics has no such argument
        options["telemetry"] = False
    if os.environ.get("TM_TRACE_SAMPLING"):
        from proxy.l7.stages.tracing import Tracing
        from proxy.tracing.spans import TracingSettings
        options["tracing"] = Tracing(TracingSettings(collector=("127.0.0.1", 9),
                                                     sampling_percent=float(os.environ["TM_TRACE_SAMPLING"])), stats)
    await nursery.start(serve_listener, sock, listener.name, DataPlane(SnapshotHolder(snapshot), stats, **options))
    return listener.port


async def main():
    async with trio.open_nursery() as nursery:
        port = await (bare_forwarder(nursery) if baseline else triomesh(nursery))
        with open(port_file, "w") as f:
            f.write(str(port))
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()

if os.environ.get("TM_OPCODES"):
    # bench/opcode_counts.py of the bench's own checkout, by path (TM_SOURCE may be another checkout)
    import importlib.util
    spec = importlib.util.spec_from_file_location("opcode_counts", os.environ["TM_OPCODE_COUNTS"])
    opcode_counts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(opcode_counts)
    opcode_counts.count_opcodes(os.environ["TM_OPCODES"])
trio.run(main)
'''


def _run_once(requests: int, backend_port: int, source: Path, baseline: bool, workdir: Path,
              h2: bool = False, upstream_protocol: str = "HTTP", telemetry: bool = True,
              keep_output: Path | None = None, trace_sampling: float | None = None,
              connections: int = 8, streams: int = 4, opcodes: bool = False, location: str = "MESH_INTERNAL") -> tuple[int | dict[str, int], int]:
    """(total instructions, requests that succeeded) for one proxy process under callgrind; with
    `opcodes`, (bytecodes per function, requests that succeeded) for one traced process instead."""
    script = workdir / "proxy_under_callgrind.py"
    script.write_text(_PROXY)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    out = (keep_output or workdir) / f"callgrind.{requests}"
    config = workdir / "bench.yaml"
    config.write_text(triomesh_config(free_port(), backend_port, upstream_protocol=upstream_protocol, location=location))
    opcode_file = workdir / f"opcodes.{requests}.json"
    under = [] if opcodes else ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    proc = subprocess.Popen([*under, sys.executable,
                             str(script), str(backend_port), str(port_file), "1" if baseline else "0"],
                            env=dict(os.environ, TM_SOURCE=str(source), TM_CONFIG=str(config), PYTHONHASHSEED="0",
                                     TM_OPCODES=str(opcode_file) if opcodes else "",
                                     TM_OPCODE_COUNTS=str(opcode_counts.PATH),
                                     TM_TELEMETRY="1" if telemetry else "0",
                                     TM_TRACE_SAMPLING="" if trace_sampling is None else repr(trace_sampling)),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        # start-up under callgrind takes minutes on a loaded machine
        deadline = time.monotonic() + 600
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()  # its stderr ends only when it does
                raise RuntimeError(f"the proxy under callgrind did not start: {proc.communicate()[1].decode()[-2000:]}")
            time.sleep(0.3)
        time.sleep(1.0)
        # h2c: the same 8 clients, each with up to 4 streams in flight on its one connection
        client = ["-m", str(streams)] if h2 else ["--h1"]
        load = subprocess.run(["h2load", *client, "-n", str(requests), "-c", str(connections),
                               f"http://127.0.0.1:{port_file.read_text()}/small"],
                              capture_output=True, text=True, timeout=900)
        succeeded = int(re.search(r"(\d+) succeeded", load.stdout).group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1].decode()
    if opcodes:
        if proc.returncode != 0 or not opcode_file.exists():
            raise RuntimeError(f"the traced proxy failed: {err[-2000:]}")
        return json.loads(opcode_file.read_text()), succeeded
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"callgrind reported no total: {err[-2000:]}")
    return int(found.group(1)), succeeded


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="checkout whose proxy/ is measured (default: this one)")
    ap.add_argument("--requests", type=int, default=2000, help="requests of the second run, beyond the first")
    ap.add_argument("--baseline", action="store_true", help="measure a bare Trio forwarder instead")
    ap.add_argument("--h2", action="store_true", help="h2c downstream (prior knowledge) instead of HTTP/1.1")
    ap.add_argument("--h2-upstream", action="store_true", help="with --h2: to an h2c upstream instead of HTTP/1.1")
    ap.add_argument("--no-telemetry", action="store_true", help="Istio's standard metrics off (DataPlane(telemetry=False))")
    ap.add_argument("--keep-output", type=Path, metavar="DIR", help="keep callgrind's output files in DIR")
    ap.add_argument("--trace-sampling", type=float, default=None, metavar="PERCENT",
                    help="with tracing on, sampling this percentage of requests (spans queued, not exported)")
    ap.add_argument("--connections", type=int, default=8, help="client connections (default 8)")
    ap.add_argument("--streams", type=int, default=4, help="with --h2: streams in flight per connection (default 4)")
    ap.add_argument("--mesh-external", action="store_true",
                    help="the backend MESH_EXTERNAL: no peer metadata exchange with it")
    ap.add_argument("--opcodes", action="store_true", help="bytecodes per request by Python function (no valgrind)")
    ap.add_argument("--top", type=int, default=40, help="with --opcodes: how many functions to list (default 40)")
    args = ap.parse_args()
    if args.h2_upstream and not args.h2:
        sys.exit("--h2-upstream goes with --h2")
    if args.h2 and args.baseline:
        sys.exit("--h2 measures the proxy: the bare forwarder speaks no HTTP")
    for tool in ("h2load", "nginx") if args.opcodes else ("valgrind", "h2load", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.instructions needs {tool} (make bench installs h2load and nginx; valgrind: apt-get install valgrind)")
    bytecode_cache.compile_checkout(args.source)
    with tempfile.TemporaryDirectory(prefix="triomesh-instructions-") as tmp:
        workdir = Path(tmp)
        backend = start_nginx(workdir / "nginx", cpus=None)
        try:
            port = backend.h2c_port if args.h2_upstream else backend.port
            upstream = "HTTP2" if args.h2_upstream else "HTTP"
            telemetry = not args.no_telemetry
            location = "MESH_EXTERNAL" if args.mesh_external else "MESH_INTERNAL"
            if args.keep_output is not None:
                args.keep_output.mkdir(parents=True, exist_ok=True)
            first, ok1 = _run_once(500, port, args.source, args.baseline, workdir, args.h2, upstream, telemetry,
                                   args.keep_output, args.trace_sampling, args.connections, args.streams, args.opcodes,
                                   location)
            second, ok2 = _run_once(500 + args.requests, port, args.source, args.baseline, workdir, args.h2, upstream,
                                    telemetry, args.keep_output, args.trace_sampling, args.connections, args.streams,
                                    args.opcodes, location)
        finally:
            backend.stop()
    what = "bare Trio forwarder" if args.baseline else f"triomesh data path ({args.source}{', h2c' if args.h2 else ''}{' to h2c' if args.h2_upstream else ''}{', telemetry off' if args.no_telemetry else ''}{', backend MESH_EXTERNAL' if args.mesh_external else ''}{f', tracing at {args.trace_sampling}%' if args.trace_sampling is not None else ''}{f', {args.connections} connections' if args.connections != 8 else ''}{f' x {args.streams} streams' if args.h2 and args.streams != 4 else ''})"
    if args.opcodes:
        per_request = opcode_counts.per_unit(first, second, ok2 - ok1)
        print(f"{what}: {sum(per_request.values()):,.0f} bytecodes per request ({ok1} and {ok2} requests)")
        print(opcode_counts.table(per_request, top=args.top, strip=str(args.source) + "/"))
        return
    print(f"{what}: {(second - first) / (ok2 - ok1):,.0f} instructions per request "
          f"(callgrind, user space; {ok1} and {ok2} requests)")


if __name__ == "__main__":
    main()
