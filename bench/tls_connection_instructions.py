"""What a server spends on a whole new mutual TLS connection (accept, handshake, one HTTP/1.1 request
through to a backend, close), as `python -m bench --only mtls`'s new-connection row makes them:

    python -m bench.tls_connection_instructions [--gateway] [--resume] [--source DIR]
                                                [--keep-output DIR] [--opcodes [--top N]]

The proxy runs the data path's own serving code in-process: a sidecar's bound inbound listener with
PeerAuthentication STRICT and its workload certificate (proxy/tls/mesh_inbound.py), or with
`--gateway` a Gateway HTTPS server in MUTUAL mode (proxy/tls/downstream.py, bench.targets'
triomesh_mtls_config: TLS 1.3), both sending OpenSSL's two session tickets and routing to one nginx endpoint
(kept alive, as the bench's). The client, this process, opens one connection after another with its
own workload certificate (the stdlib's TLS), sends `GET /small` with `Connection: close` (as nginx's
new-connection port does) and reads to the server's close. With `--resume` each connection but a
run's first resumes the session (the TLS 1.3 ticket) of the one before, as a client sidecar that keeps
sessions does (proxy/tls/sessions.py); the client checks that it did. Two runs of 10 and 60
connections; the difference divided by 50 is one connection:

- instructions (callgrind, user space), split by where they run: the TLS library (our BoringSSL
  build, or the fallback, cryptography's `_rust.abi3.so` with OpenSSL linked in), the cffi glue, CPython (its eval loop, the garbage collector,
  the rest of the interpreter), libc, our C extensions, the rest;
- syscalls per connection (`strace -c -f` on the proxy in two more runs, not under valgrind);
- the cyclic garbage a connection leaves (`gc.get_stats()`: objects the collector found unreachable,
  and its passes).

`--opcodes` runs the proxy without valgrind under bench/opcode_counts.py's tracer instead and lists the
Python functions by bytecodes per connection. `--keep-output DIR` keeps callgrind's files
(`callgrind.10`, `callgrind.60`) for `callgrind_annotate --inclusive=yes`. `--source DIR` measures
another checkout's `proxy/` (e.g. the version before a change exported with `git archive`). The
proxy runs with PYTHONHASHSEED=0 and a worker's collector thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

# the proxy process imports only bench.targets from the measured checkout (`--source` may be older)
from bench.targets import free_port, triomesh_mtls_config

FIRST, SECOND = 10, 60
HERE = Path(__file__).resolve()
SNI = "outbound_.8080_._.server"
REQUEST = b"GET /small HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"


def _mesh_config(port: int, backend_port: int) -> str:
    """A sidecar whose bound inbound listener takes STRICT mesh mTLS to one app (the backend)."""
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: server, namespace: foo}}
        spec:
          workloadSelector: {{labels: {{app: server}}}}
          ingress:
          - port: {{number: {port}, protocol: HTTP, name: http}}
            defaultEndpoint: 127.0.0.1:{backend_port}
            captureMode: NONE
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: server, namespace: foo}}
        spec:
          mtls: {{mode: STRICT}}
        """)


def _gateway_config(directory: Path, port: int, backend_port: int) -> str:
    files = SimpleNamespace(server_cert=str(directory / "server.chain"), server_key=str(directory / "server.key"),
                            ca=str(directory / "trust.pem"))
    return triomesh_mtls_config(port, backend_port, files)


async def _proxy(directory: Path, backend_port: int, gateway: bool, port_file: Path) -> None:
    """The proxy process: serve until SIGTERM, then write the collector's totals next to `port_file`."""
    import gc

    import trio

    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes
    from proxy.identity.holder import IdentityHolder
    from proxy.identity.workload import WorkloadIdentity
    from proxy.l7.dataplane import DataPlane
    from proxy.l7.server import serve_listener
    from proxy.runner.garbage_collection import pace_collector
    from proxy.runtime import SnapshotHolder
    from proxy.stats import Stats

    pace_collector()
    port = free_port()
    text = _gateway_config(directory, port, backend_port) if gateway else _mesh_config(port, backend_port)
    snapshot = compile_resources(load_bytes(text.encode(), "bench.yaml"), version="1", bind_address="127.0.0.1",
                                 proxy_labels={"app": "server"}, proxy_namespace="foo")
    listener = snapshot.listeners[0]
    stats = Stats()
    plane = DataPlane(SnapshotHolder(snapshot), stats)
    plane.workload_identity = IdentityHolder()
    plane.workload_identity.swap(WorkloadIdentity.from_pem(
        (directory / "server.chain").read_bytes(), (directory / "server.key").read_bytes(),
        (directory / "trust.pem").read_bytes()))
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", listener.port))
    sock.listen(128)
    async with trio.open_nursery() as nursery:
        plane.background = nursery
        if gateway:
            from proxy.tls.downstream import https_serve_function
            from proxy.tls.listener import TlsListeners

            await nursery.start(https_serve_function(plane, TlsListeners(stats), nursery), sock, listener.name)
        else:
            from proxy.tls.mesh_inbound import MeshInbound, inbound_listener_handler

            handler = inbound_listener_handler(MeshInbound(plane, stats), listener.name, listener.port)
            await nursery.start(lambda task_status: serve_listener(
                sock, listener.name, plane, connection_nursery=nursery, handle_connection=handler,
                task_status=task_status))
        port_file.write_text(f"{listener.port} {os.getpid()}")  # the pid: strace does not pass SIGTERM on
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()
    port_file.with_suffix(".gc").write_text(json.dumps(gc.get_stats()))


def _client(directory: Path, port: int, connections: int, gateway: bool, resume: bool) -> None:
    """`connections` new connections one after another, one request each; SystemExit if one fails
    (or, `resume`, if one but the first did not resume the session of the one before)."""
    from proxy.tls.mesh import ISTIO_HTTP1

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(str(directory / "client.chain"), str(directory / "client.key"))
    context.load_verify_locations(str(directory / "trust.pem"))
    context.check_hostname = False
    context.set_alpn_protocols(["http/1.1" if gateway else ISTIO_HTTP1])
    session = None
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with context.wrap_socket(raw, server_hostname=SNI, session=session) as tls:
                tls.sendall(REQUEST)
                response = b""
                while chunk := tls.recv(65536):
                    response += chunk
                if resume:
                    if session is not None and not tls.session_reused:
                        raise SystemExit("the server did not resume the session it issued")
                    session = tls.session  # with the tickets, read ahead of the response
        if not response.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"the request failed: {response[:200]!r}")


def _run(tool: str, source: Path, directory: Path, backend_port: int, gateway: bool, resume: bool,
         connections: int, out: Path) -> dict:
    """One proxy process under `tool` (callgrind, strace, opcodes) serving `connections`; its raw
    results: {"total": instructions} (callgrind), {"syscalls": ...}, {"opcodes": ...}, and "gc"."""
    from bench import opcode_counts

    port_file = out.with_name(f"{out.name}.port")
    port_file.unlink(missing_ok=True)
    under = {"callgrind": ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
             "strace": ["strace", "-c", "-f", "-q", "-o", str(out)], "opcodes": []}[tool]
    env = dict(os.environ, PYTHONPATH=str(source), PYTHONHASHSEED="0")
    if tool == "opcodes":
        env.update(TM_OPCODES=str(out), TM_OPCODE_COUNTS=str(opcode_counts.PATH))
    pid = 0
    proc = subprocess.Popen([*under, sys.executable, str(HERE), "--proxy", str(directory), str(backend_port),
                             str(port_file)] + (["--gateway"] if gateway else []),
                            cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # start-up under callgrind takes minutes on a loaded machine
        while not port_file.exists() or " " not in port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                raise RuntimeError(f"the proxy did not start: {proc.communicate()[1].decode()[-2000:]}")
            time.sleep(0.3)
        port, pid = map(int, port_file.read_text().split())
        _client(directory, port, connections, gateway, resume)
        time.sleep(0.5)  # the last connection's task ends after its close
    finally:
        if proc.poll() is None:
            # the proxy itself: strace does not pass a SIGTERM on
            os.kill(pid, signal.SIGTERM) if pid else proc.kill()
    err = proc.communicate(timeout=300)[1].decode()
    if proc.returncode != 0:
        raise RuntimeError(f"the proxy failed: {err[-2000:]}")
    result = {"gc": json.loads(port_file.with_suffix(".gc").read_text())}
    if tool == "callgrind":
        result["total"] = int(re.search(r"Collected : (\d+)", err).group(1))
        result["parts"] = parts(out)
    elif tool == "strace":
        from bench import syscalls

        result["syscalls"] = syscalls.parse(out.read_text())
    else:
        result["opcodes"] = json.loads(out.read_text())
    return result


def _part(obj: str, file: str) -> str:
    """Where a function's own instructions count: its ELF object, CPython's split by source file."""
    name = obj.rsplit("/", 1)[-1]
    if name.startswith("libpython") or name.startswith("python"):
        if file.endswith("ceval.c"):
            return "CPython eval loop"
        if file.endswith("gcmodule.c"):
            return "CPython garbage collector"
        if file.endswith("obmalloc.c"):
            return "CPython allocator"
        return "CPython other"
    if name.startswith("_rust"):
        return "OpenSSL (cryptography's _rust.abi3.so)"
    if name.startswith("_boringssl"):
        return "BoringSSL (proxy/tls/_boringssl, under valgrind without ADX: its generic P-256 code)"
    if name.startswith("_cffi_backend"):
        return "cffi"
    if name.startswith("libc.so"):
        return "libc"
    if "/proxy/" in obj:
        return "our C extensions"
    return "other (" + name + ")"


def parts(callgrind_file: Path) -> dict[str, int]:
    """Self instructions by part (_part) from a callgrind output file: each cost line counts for the
    object and source file of the function it is under, except the inclusive costs of calls."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fl": {}}
    totals: dict[str, int] = {}
    obj = file = ""
    after_call = False

    def named(kind: str, value: str) -> str:
        # name compression: "(id) name" the first time, "(id)" after
        match = re.match(r"\((\d+)\)(?: (.*))?", value)
        if match is None:
            return value
        table = names["ob" if kind in ("ob", "cob") else "fl"]
        if match.group(2) is not None:
            table[match.group(1)] = match.group(2)
        return table.get(match.group(1), "")

    with open(callgrind_file) as f:
        for line in f:
            head = line[:1]
            if head.isdigit() or head in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                if len(fields) >= 2:
                    key = _part(obj, file)
                    totals[key] = totals.get(key, 0) + int(fields[1])
                continue
            key, _, value = line.rstrip("\n").partition("=")
            if key == "ob":
                obj = named("ob", value)
            elif key in ("fl", "fi", "fe"):
                file = named("fl", value)
            elif key in ("cob", "cfi", "cfl"):
                named(key, value)  # only to learn the name of a compressed id
            elif key == "calls":
                after_call = True
    return totals


def measure(source: Path, directory: Path, backend_port: int, gateway: bool, resume: bool,
            keep_output: Path | None, opcodes: bool) -> dict:
    """Per connection for checkout `source`: {"instructions", "parts", "syscalls", "gc"}, or with
    `opcodes` {"opcodes", "gc"}."""
    from bench import bytecode_cache, opcode_counts

    bytecode_cache.compile_checkout(source, ("proxy", "bench"))  # the proxy process imports bench.targets too
    per = SECOND - FIRST
    tools = ("opcodes",) if opcodes else ("callgrind", "strace")
    runs = {(tool, n): _run(tool, source, directory, backend_port, gateway, resume, n,
                            (keep_output if tool == "callgrind" and keep_output else directory) / f"{tool}.{n}")
            for tool in tools for n in (FIRST, SECOND)}
    first, second = runs[(tools[0], FIRST)], runs[(tools[0], SECOND)]
    result = {"gc": {"unreachable objects": sum(g["collected"] for g in second["gc"])
                     - sum(g["collected"] for g in first["gc"]),
                     "passes": [b["collections"] - a["collections"] for a, b in zip(first["gc"], second["gc"])]}}
    result["gc"] = {k: ([x / per for x in v] if isinstance(v, list) else v / per) for k, v in result["gc"].items()}
    if opcodes:
        result["opcodes"] = opcode_counts.per_unit(first["opcodes"], second["opcodes"], per)
        return result
    result["instructions"] = (second["total"] - first["total"]) / per
    result["parts"] = {k: (second["parts"].get(k, 0) - first["parts"].get(k, 0)) / per
                       for k in {*first["parts"], *second["parts"]}}
    a, b = runs[("strace", FIRST)]["syscalls"], runs[("strace", SECOND)]["syscalls"]
    result["syscalls"] = {k: (b.get(k, 0) - a.get(k, 0)) / per for k in {*a, *b}}
    return result


def report(source: Path, kind: str, result: dict, top: int) -> str:
    from bench import opcode_counts

    lines = []
    gc_line = (f"  cyclic garbage: {result['gc']['unreachable objects']:.1f} unreachable objects per connection; "
               f"collector passes per connection by generation {', '.join(f'{p:.3f}' for p in result['gc']['passes'])}")
    if "opcodes" in result:
        counts = result["opcodes"]
        lines.append(f"{source}: {sum(counts.values()):,.0f} bytecodes per new {kind} connection")
        lines.append(opcode_counts.table(counts, top=top, strip=str(source) + "/"))
        lines.append(gc_line)
        return "\n".join(lines)
    total = result["instructions"]
    lines.append(f"{source}: {total:,.0f} instructions per new {kind} connection (server, callgrind, user space)")
    for name, n in sorted(result["parts"].items(), key=lambda item: -item[1]):
        if abs(n) >= 500:
            lines.append(f"  {n:12,.0f}  {100 * n / total:5.1f}%  {name}")
    calls = {k: v for k, v in result["syscalls"].items() if abs(v) >= 0.05}
    lines.append("  syscalls per connection: " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(calls.items(), key=lambda item: -item[1]) if not k.endswith("(failed)"))
        + f" (total {sum(v for k, v in calls.items() if not k.endswith('(failed)')):.2f}; failed: "
        + (", ".join(f"{k[:-9]} {v:.2f}" for k, v in calls.items() if k.endswith("(failed)")) or "none") + ")")
    lines.append(gc_line)
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--proxy":
        import trio

        if os.environ.get("TM_OPCODES"):  # bench/opcode_counts.py of the bench's checkout, by path
            import importlib.util

            spec = importlib.util.spec_from_file_location("opcode_counts", os.environ["TM_OPCODE_COUNTS"])
            tracer = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(tracer)
            tracer.count_opcodes(os.environ["TM_OPCODES"])
        trio.run(_proxy, Path(sys.argv[2]), int(sys.argv[3]), "--gateway" in sys.argv[5:], Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.tls_connection_instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="store_true", help="a MUTUAL Gateway server instead of a sidecar's")
    parser.add_argument("--resume", action="store_true", help="each connection resumes the session of the one before")
    parser.add_argument("--source", type=Path, action="append", default=[],
                        help="another checkout to measure as well (repeatable)")
    parser.add_argument("--keep-output", type=Path, metavar="DIR", help="keep callgrind's output files in DIR")
    parser.add_argument("--opcodes", action="store_true", help="bytecodes per connection by Python function")
    parser.add_argument("--top", type=int, default=40, help="with --opcodes: how many functions to list")
    args = parser.parse_args()
    for tool in ("nginx",) if args.opcodes else ("nginx", "valgrind", "strace"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.tls_connection_instructions needs {tool}")
    from bench.targets import start_nginx
    from bench.tls_handshake_instructions import _prepare

    sources = [HERE.parent.parent] + [s.resolve() for s in args.source]
    kind = ("MUTUAL gateway" if args.gateway else "mesh mTLS") + (", resumed," if args.resume else "")
    with tempfile.TemporaryDirectory(prefix="triomesh-tls-connection-") as tmp:
        directory = Path(tmp)
        _prepare(directory)
        backend = start_nginx(directory / "nginx", cpus=None)
        try:
            for i, source in enumerate(sources):
                keep = None
                if args.keep_output is not None:
                    keep = args.keep_output.resolve() if len(sources) == 1 else args.keep_output.resolve() / str(i)
                    keep.mkdir(parents=True, exist_ok=True)
                result = measure(source, directory, backend.port, args.gateway, args.resume, keep, args.opcodes)
                print(report(source, kind, result, args.top), flush=True)
        finally:
            backend.stop()


if __name__ == "__main__":
    main()
