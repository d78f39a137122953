"""A real gRPC server and blocking client helpers (grpcio, h2c on 127.0.0.1) for the proxy's tests.

No protoc: every method is registered with a generic handler and no (de)serializers, so messages
on both sides are raw bytes. Service `triomesh.test.Echo`:

  Unary         response = b"<server name>:" + request
  ClientStream  response = b"<message count>:<total bytes>"
  ServerStream  request b"<count>:<size>" -> `count` messages of `size` bytes, message i being
                stream_message(i, size)
  Bidi          echoes each message as soon as it arrives (send one, read one works)

Request metadata steers every method (applied in this order, before any response message):
  x-delay-ms: N        sleep N ms first (ends early if the call is cancelled / its deadline passes);
                       no response headers are sent before the delay is over
  x-fail-status: C     abort with grpc status number C (1..16) and details "failed on purpose"
  x-fail-times: N      with x-fail-key: K (default ""): the first N calls for K on this server
                       abort with UNAVAILABLE, "failed on purpose"; later calls succeed
  x-request-id: V      echoed as initial metadata x-request-id: V (calls that do not fail) and
                       in the trailing metadata (every call)
Failed calls are answered trailers-only. Every call, failed or not, gets trailing metadata
x-served-by: <server name>, and is counted and recorded by the server (EchoServer.calls(),
EchoServer.records) as soon as its handler starts.

The server runs on grpc's own thread pool, the client helpers block: from Trio tests call them
through trio.to_thread.run_sync. Each helper opens its own channel (retries and HTTP proxies off,
message size limits off) and closes it, so they are safe to use from many threads at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import threading
import time
from typing import Any, Self

import grpc

SERVICE = "triomesh.test.Echo"
UNARY = f"/{SERVICE}/Unary"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
BIDI = f"/{SERVICE}/Bidi"
FAIL_DETAILS = "failed on purpose"

Metadata = Sequence[tuple[str, str | bytes]]

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_NO_LIMITS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a status number (e.g. 14 -> UNAVAILABLE)."""
    return _STATUS_BY_NUMBER[number]


def stream_message(index: int, size: int) -> bytes:
    """Message `index` of a ServerStream reply: b"<index>." repeated, cut to `size` bytes."""
    unit = b"%d." % index
    return (unit * (size // len(unit) + 1))[:size]


# ---------------------------------------------------------------------------------------------
# Server


@dataclass(frozen=True)
class CallRecord:
    """One call as the server saw it: the method path, its request metadata and the peer."""

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    peer: str

    def get(self, key: str) -> str | bytes | None:
        for k, v in self.metadata:
            if k == key:
                return v
        return None


class _EchoServicer:
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._fail_counts: dict[str, int] = {}
        self.records: list[CallRecord] = []

    # -- steering, shared by every method ----------------------------------------------------

    def _begin(self, method: str, context: grpc.ServicerContext) -> None:
        md = tuple((m.key, m.value) for m in context.invocation_metadata())
        with self._lock:
            self.records.append(CallRecord(method, md, context.peer()))
        values: dict[str, Any] = {}
        for k, v in md:
            values.setdefault(k, v)

        request_id = values.get("x-request-id")
        trailing = [("x-served-by", self.name)]
        if request_id is not None:
            trailing.append(("x-request-id", request_id))
        context.set_trailing_metadata(tuple(trailing))

        delay = values.get("x-delay-ms")
        if delay is not None:
            ms = self._int(context, "x-delay-ms", delay)
            ended = threading.Event()
            if context.add_callback(ended.set):
                ended.wait(ms / 1000)

        fail = values.get("x-fail-status")
        if fail is not None:
            number = self._int(context, "x-fail-status", fail)
            if number != 0:
                code = _STATUS_BY_NUMBER.get(number)
                if code is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad x-fail-status {fail!r}")
                context.abort(code, FAIL_DETAILS)

        times = values.get("x-fail-times")
        if times is not None:
            n = self._int(context, "x-fail-times", times)
            key = str(values.get("x-fail-key", ""))
            with self._lock:
                seen = self._fail_counts.get(key, 0)
                fail_now = seen < n
                if fail_now:
                    self._fail_counts[key] = seen + 1
            if fail_now:
                context.abort(grpc.StatusCode.UNAVAILABLE, FAIL_DETAILS)

        # Only now: a delayed call sends no response headers before its delay is over, and a
        # failed one is answered trailers-only (a single HEADERS frame, as real servers do).
        if request_id is not None:
            context.send_initial_metadata((("x-request-id", request_id),))

    @staticmethod
    def _int(context: grpc.ServicerContext, key: str, value: Any) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad {key} {value!r}")
            raise  # not reached: abort raises

    # -- the four methods ----------------------------------------------------------------------

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(UNARY, context)
        return self.name.encode() + b":" + request

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._begin(CLIENT_STREAM, context)
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return b"%d:%d" % (count, total)

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin(SERVER_STREAM, context)
        try:
            count_s, size_s = request.split(b":")
            count, size = int(count_s), int(size_s)
            if count < 0 or size < 0:
                raise ValueError
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request {request[:40]!r}")
        for i in range(count):
            yield stream_message(i, size)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin(BIDI, context)
        yield from requests

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


class EchoServer:
    """A running Echo server. Wraps the grpc.Server (other attributes are delegated to it) and adds
    call counting; use as a context manager or call close()."""

    def __init__(self, server: grpc.Server, executor: ThreadPoolExecutor,
                 servicer: _EchoServicer, port: int) -> None:
        self.grpc_server = server
        self._executor = executor
        self._servicer = servicer
        self.name = servicer.name
        self.port = port
        self.address = f"127.0.0.1:{port}"

    @property
    def records(self) -> list[CallRecord]:
        """Every call received so far, in arrival order (a copy)."""
        with self._servicer._lock:
            return list(self._servicer.records)

    def calls(self, method: str | None = None) -> int:
        """How many calls reached this server (all methods, or one: UNARY, "Unary", ...)."""
        if method is not None and not method.startswith("/"):
            method = f"/{SERVICE}/{method}"
        return sum(1 for r in self.records if method is None or r.method == method)

    def reset(self) -> None:
        """Forget recorded calls and x-fail-times counters."""
        with self._servicer._lock:
            self._servicer.records.clear()
            self._servicer._fail_counts.clear()

    def stop(self, grace: float | None = None) -> threading.Event:
        return self.grpc_server.stop(grace)

    def close(self) -> None:
        """Stop at once (in-flight calls are cancelled) and wait for it, then free the threads."""
        self.grpc_server.stop(0).wait(5)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.grpc_server, attr)


def start_grpc_server(port: int = 0, *, name: str = "grpc-a", max_workers: int = 32,
                      tls: tuple[bytes, bytes] | None = None) -> tuple[EchoServer, int]:
    """Start an Echo server on 127.0.0.1:`port` (0 = any free port), plaintext HTTP/2, or HTTP/2 over
    TLS with `tls` = (private key PEM, certificate chain PEM).
    Returns (server, bound port). Stop it with server.close() (or server.stop(grace))."""
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"grpc-{name}")
    server = grpc.server(executor, options=[*_NO_LIMITS, ("grpc.so_reuseport", 0)])
    servicer = _EchoServicer(name)
    server.add_generic_rpc_handlers((servicer.handler(),))
    if tls is None:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        bound = server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([tls]))
    if bound == 0:
        executor.shutdown(wait=False)
        raise OSError(f"could not bind gRPC server {name!r} to 127.0.0.1:{port}")
    server.start()
    return EchoServer(server, executor, servicer, bound), bound


# ---------------------------------------------------------------------------------------------
# Client


@dataclass
class GrpcResult:
    """The outcome of one call. `response` is bytes for Unary/ClientStream (None on error) and a
    list of the messages received for ServerStream/Bidi (those received before an error too)."""

    code: grpc.StatusCode
    details: str | None
    response: Any
    initial_metadata: tuple[tuple[str, str | bytes], ...] = ()
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    def initial(self, key: str) -> str | bytes | None:
        return _first(self.initial_metadata, key)

    def trailing(self, key: str) -> str | bytes | None:
        return _first(self.trailing_metadata, key)


def _first(md: Iterable[tuple[str, Any]], key: str) -> Any:
    for k, v in md:
        if k == key:
            return v
    return None


def _md(md: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((m[0], m[1]) for m in (md or ()))


def _result(call: Any, response: Any) -> GrpcResult:
    return GrpcResult(
        code=call.code(),
        details=call.details(),
        response=response,
        initial_metadata=_md(call.initial_metadata()),
        trailing_metadata=_md(call.trailing_metadata()),
    )


def open_channel(target: str, *, authority: str | None = None) -> grpc.Channel:
    """A plaintext channel to "host:port" with retries and HTTP proxies off and no message size
    limits; `authority` sets :authority (what the proxy routes on). Close it (or use `with`)."""
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 0),
        ("grpc.enable_http_proxy", 0),
        *_NO_LIMITS,
    ]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(target, options=options)


def unary(target: str, payload: bytes, *, metadata: Metadata = (), timeout: float | None = None,
          authority: str | None = None) -> GrpcResult:
    """One Unary call. response: the reply bytes, or None on error."""
    with open_channel(target, authority=authority) as channel:
        method = channel.unary_unary(UNARY)
        try:
            response, call = method.with_call(payload, metadata=tuple(metadata), timeout=timeout)
        except grpc.RpcError as err:
            return _result(err, None)
        return _result(call, response)


def client_stream(target: str, messages: Iterable[bytes], *, metadata: Metadata = (),
                  timeout: float | None = None, authority: str | None = None) -> GrpcResult:
    """One ClientStream call sending `messages`. response: b"<count>:<total>", or None on error."""
    with open_channel(target, authority=authority) as channel:
        method = channel.stream_unary(CLIENT_STREAM)
        try:
            response, call = method.with_call(iter(list(messages)), metadata=tuple(metadata),
                                              timeout=timeout)
        except grpc.RpcError as err:
            return _result(err, None)
        return _result(call, response)


def server_stream(target: str, count: int, size: int, *, metadata: Metadata = (),
                  timeout: float | None = None, authority: str | None = None) -> GrpcResult:
    """One ServerStream call asking for `count` messages of `size` bytes.
    response: the list of messages received (each should equal stream_message(i, size))."""
    return server_stream_raw(target, b"%d:%d" % (count, size), metadata=metadata,
                             timeout=timeout, authority=authority)


def server_stream_raw(target: str, request: bytes, *, metadata: Metadata = (),
                      timeout: float | None = None, authority: str | None = None) -> GrpcResult:
    """ServerStream with an arbitrary request body (e.g. to provoke INVALID_ARGUMENT)."""
    with open_channel(target, authority=authority) as channel:
        call = channel.unary_stream(SERVER_STREAM)(request, metadata=tuple(metadata),
                                                   timeout=timeout)
        received: list[bytes] = []
        try:
            for message in call:  # keeps what arrived before an error
                received.append(message)  # noqa: PERF402
        except grpc.RpcError:
            pass
        return _result(call, received)


def bidi(target: str, messages: Iterable[bytes], *, lockstep: bool = True,
         metadata: Metadata = (), timeout: float | None = None,
         authority: str | None = None) -> GrpcResult:
    """One Bidi call. With lockstep (the default) message k+1 is sent only after the echo of
    message k has been read, so it succeeds only if the path between streams both ways at once
    (a proxy that buffers the request stream makes it hang until `timeout`; give one).
    response: the list of echoes received."""
    return _bidi(target, messages, lockstep, metadata, timeout, authority)[0]


def bidi_interleaved(target: str, messages: Iterable[bytes], *, metadata: Metadata = (),
                     timeout: float | None = None,
                     authority: str | None = None) -> tuple[GrpcResult, list[str]]:
    """bidi(lockstep=True), also returning the order of events as the client saw them:
    ["send 0", "recv 0", "send 1", "recv 1", ...]."""
    return _bidi(target, messages, True, metadata, timeout, authority)


def _bidi(target: str, messages: Iterable[bytes], lockstep: bool, metadata: Metadata,
          timeout: float | None, authority: str | None) -> tuple[GrpcResult, list[str]]:
    to_send = list(messages)
    events: list[str] = []
    lock = threading.Lock()
    may_send = threading.Semaphore(1)
    finished = threading.Event()

    def requests() -> Iterator[bytes]:
        # Runs on a grpc thread; `finished` lets it end once the call is over.
        for i, message in enumerate(to_send):
            if lockstep:
                while not may_send.acquire(timeout=0.05):
                    if finished.is_set():
                        return
            if finished.is_set():
                return
            with lock:
                events.append(f"send {i}")
            yield message

    with open_channel(target, authority=authority) as channel:
        call = channel.stream_stream(BIDI)(requests(), metadata=tuple(metadata), timeout=timeout)
        received: list[bytes] = []
        try:
            for message in call:
                with lock:
                    events.append(f"recv {len(received)}")
                received.append(message)
                may_send.release()
        except grpc.RpcError:
            pass
        finally:
            finished.set()
        with lock:
            order = list(events)
        return _result(call, received), order


def wait_until_serving(target: str, *, timeout: float = 5.0, authority: str | None = None) -> None:
    """Block until a Unary call to `target` succeeds (e.g. once a proxy in front is listening)."""
    deadline = time.monotonic() + timeout
    last: GrpcResult | None = None
    while time.monotonic() < deadline:
        last = unary(target, b"ping", timeout=1.0, authority=authority)
        if last.ok:
            return
        time.sleep(0.05)
    raise TimeoutError(f"gRPC at {target} not serving after {timeout}s: {last}")


# ---------------------------------------------------------------------------------------------
# Command line, for processes in other network namespaces (tests/mesh/test_grpc_mesh.py)
#
#   python -m tests.grpc_apps serve --port P [--name N]
#       an Echo server on 127.0.0.1:P; prints "serving P" once it accepts calls, serves until
#       SIGTERM or SIGINT, then prints one line "call {json}" per call received (method, peer,
#       metadata) and exits 0
#   python -m tests.grpc_apps call TARGET KIND [KIND ...] [--authority A] [--metadata k=v ...]
#                                 [--timeout S] [--payload P] [--count N] [--size B]
#                                 [--messages N] [--message-size B]
#       one call of each KIND (unary, client_stream, server_stream, bidi) in that order, each on
#       its own channel; prints one JSON line per call (see _result_json) and exits 0 whatever the
#       calls' status (the caller asserts on the JSON)

KINDS = ("unary", "client_stream", "server_stream", "bidi")


def _md_json(md: Iterable[tuple[str, str | bytes]]) -> list[list[str]]:
    """Metadata as [key, value] pairs; binary (-bin) values as base64."""
    import base64

    return [[k, base64.b64encode(v).decode() if isinstance(v, bytes) else v] for k, v in md]


def _result_json(kind: str, result: GrpcResult, elapsed_s: float, intact: bool | None) -> dict[str, Any]:
    """The JSON line of one call: kind, code (a grpc.StatusCode name), details, response (the reply
    as text, cut to 200 characters, for unary/client_stream; null for streams and on error),
    response_len (bytes of that reply), count and sizes (messages of a stream), intact (whether
    what came back is exactly what the call should get: the stream messages, the echoes, the
    count), initial_metadata and trailing_metadata ([key, value] pairs), elapsed_s."""
    out: dict[str, Any] = {"kind": kind, "code": result.code.name, "details": result.details,
                           "response": None, "response_len": None, "count": None, "sizes": None}
    if isinstance(result.response, bytes):
        out["response"] = result.response[:200].decode("utf-8", "replace")
        out["response_len"] = len(result.response)
    elif isinstance(result.response, list):
        out["count"] = len(result.response)
        out["sizes"] = [len(m) for m in result.response]
    out["intact"] = intact
    out["initial_metadata"] = _md_json(result.initial_metadata)
    out["trailing_metadata"] = _md_json(result.trailing_metadata)
    out["elapsed_s"] = round(elapsed_s, 3)
    return out


def _cli_call(args: Any) -> int:
    import json

    metadata: list[tuple[str, str]] = []
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--metadata wants key=value, got {item!r}")
        metadata.append((key.lower(), value))
    common: dict[str, Any] = {"metadata": metadata, "timeout": args.timeout, "authority": args.authority}
    messages = [b"%d:" % i + b"m" * max(0, args.message_size - len(b"%d:" % i)) for i in range(args.messages)]
    for kind in args.kinds:
        started = time.monotonic()
        intact: bool | None
        if kind == "unary":
            result = unary(args.target, args.payload.encode(), **common)
            intact = result.response is not None and result.response.endswith(b":" + args.payload.encode())
        elif kind == "client_stream":
            result = client_stream(args.target, messages, **common)
            intact = result.response == b"%d:%d" % (len(messages), sum(map(len, messages)))
        elif kind == "server_stream":
            result = server_stream(args.target, args.count, args.size, **common)
            intact = result.response == [stream_message(i, args.size) for i in range(args.count)]
        else:
            result = bidi(args.target, messages, **common)
            intact = result.response == messages
        line = _result_json(kind, result, time.monotonic() - started, intact)
        print(json.dumps(line, separators=(",", ":")), flush=True)
    return 0


def _cli_serve(args: Any) -> int:
    import json
    import signal

    stop = threading.Event()

    def stopping(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    server, port = start_grpc_server(args.port, name=args.name)
    try:
        print(f"serving {port}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
    for r in server.records:
        record = {"method": r.method, "peer": r.peer, "metadata": _md_json(r.metadata)}
        print("call " + json.dumps(record, separators=(",", ":")), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.grpc_apps",
                                     description="The Echo gRPC test server and client, from a shell.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help='serve on 127.0.0.1:PORT until SIGTERM (prints "serving PORT")')
    serve.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any free one)")
    serve.add_argument("--name", default="grpc-a", help="server name (reply prefix, x-served-by)")
    call = sub.add_parser("call", help="one call of each KIND, one JSON line each")
    call.add_argument("target", help="host:port")
    call.add_argument("kinds", nargs="+", choices=KINDS, metavar="KIND", help=" | ".join(KINDS))
    call.add_argument("--authority", default=None, help=":authority to send (default: the target)")
    call.add_argument("--metadata", action="append", default=[], metavar="K=V",
                      help="request metadata, repeatable (x-fail-status=5, x-delay-ms=3000, ...)")
    call.add_argument("--timeout", type=float, default=10.0, help="deadline of each call in seconds (default 10)")
    call.add_argument("--payload", default="hello", help="unary request (default hello)")
    call.add_argument("--count", type=int, default=3, help="server_stream: messages asked for (default 3)")
    call.add_argument("--size", type=int, default=1024, help="server_stream: bytes per message (default 1024)")
    call.add_argument("--messages", type=int, default=3, help="client_stream/bidi: messages sent (default 3)")
    call.add_argument("--message-size", type=int, default=16, help="client_stream/bidi: bytes per message (default 16)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _cli_serve(args)
    return _cli_call(args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
