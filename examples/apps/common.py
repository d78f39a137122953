"""What the sample apps share: command-line/env settings, a threaded HTTP server, one downstream call."""

from __future__ import annotations

import argparse
import os
import socket
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

# GET path and request headers -> (status, text body); the body is sent as text/plain
Handler = Callable[[str, Mapping[str, str]], tuple[int, str]]

DOWNSTREAM_TIMEOUT_S = 10.0

# What a mesh app copies from its request to the requests it makes, as Istio asks of applications:
# the request id and trace context (so a trace spans the chain), and the headers that header-based
# routing further down may match on (`end-user`, the tutorial's `baggage-*`).
PROPAGATED = ("x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid",
              "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3", "end-user")
PROPAGATED_PREFIX = "baggage-"


def propagated_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in incoming.items()
            if name.lower() in PROPAGATED or name.lower().startswith(PROPAGATED_PREFIX)}


def base_arguments(description: str) -> argparse.ArgumentParser:
    """Flags every app takes; each defaults to an environment variable so containers/namespaces can set them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")),
                        help="port to listen on (env PORT, default 8080)")
    parser.add_argument("--bind", default=os.environ.get("BIND_ADDRESS", "127.0.0.1"),
                        help="address to listen on (env BIND_ADDRESS, default 127.0.0.1)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


def call_downstream(caller: str, url: str, headers: Mapping[str, str] | None = None) -> tuple[int, str]:
    """GET `url` and wrap its answer the way the tutorial's apps do: `<caller> => <downstream body>`.

    urllib honours `http_proxy`, which is how the loopback demo routes this call through the mesh.
    Any failure of the downstream becomes a 503 whose text says what happened, so the error surfaces
    at the edge with the whole chain in it.
    """
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=DOWNSTREAM_TIMEOUT_S) as resp:
            body = resp.read().decode("utf-8", "replace").strip()
            return HTTPStatus.OK, f"{caller} => {body}\n"
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace").strip()
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{caller} => Error: {e.code} - {body}\n"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return HTTPStatus.SERVICE_UNAVAILABLE, f'{caller} => I/O error on GET request for "{url}": {reason}\n'


def serve(handler: Handler, *, bind: str, port: int, verbose: bool = False) -> None:
    """Serve `handler` for GET on every path with HTTP/1.1 keep-alive until interrupted."""

    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
        # head and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm holds the
        # body until the peer's delayed ACK (~40 ms per request on a keep-alive connection)
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            status, text = handler(self.path, {name.lower(): value for name, value in self.headers.items()})
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's naming
            if verbose:
                super().log_message(format, *args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

    with Server((bind, port), RequestHandler) as server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
