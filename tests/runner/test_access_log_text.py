"""Envoy's default text access-log format (Istio's sidecar format) and TCP connection lines, from a
real proxy process: a curl request and a TCP connection through a Gateway, each line parsed with a
pattern made from the format string itself and compared field by field."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading

import pytest

from proxy.l7.access_log import ENVOY_TEXT_FORMAT
from tests.runner.harness import Backend, Proxy, free_port, mesh_config

_OPERATOR = re.compile(r"%[A-Z_]+(?:\([^)]*\))?%")


def _line_pattern(fmt: str) -> tuple[re.Pattern, list[str]]:
    """A regex with one group per command operator: a quoted operator takes anything but a quote,
    an unquoted one a run without spaces (what Envoy's fields are)."""
    names: list[str] = []
    pattern = ""
    position = 0
    for m in _OPERATOR.finditer(fmt):
        pattern += re.escape(fmt[position:m.start()])
        quoted = fmt[m.start() - 1:m.start()] == '"' and fmt[m.end():m.end() + 1] == '"'
        pattern += '([^"]*)' if quoted else r"(\S+)"
        names.append(m.group(0))
        position = m.end()
    pattern += re.escape(fmt[position:].rstrip("\n"))
    return re.compile("^" + pattern + "$"), names


def _fields(line: str) -> dict[str, str]:
    pattern, names = _line_pattern(ENVOY_TEXT_FORMAT)
    m = pattern.match(line)
    assert m, f"line does not follow Envoy's format:\n{line}"
    groups = m.groups()
    # %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% share one quoted group in the
    # format; they are separated by single spaces and none of them holds one
    fields = dict(zip(names, groups))
    return fields


def test_the_format_is_istios_default_text_format() -> None:
    # the string Istio's sidecars print with meshConfig.accessLogFile (EnvoyTextLogFormat)
    assert ENVOY_TEXT_FORMAT.startswith('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% '
                                        '%PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% ')
    assert ENVOY_TEXT_FORMAT.endswith("%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n")
    assert len(_OPERATOR.findall(ENVOY_TEXT_FORMAT)) == 24


class Echo:
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, so the port really closes
        except OSError:
            pass
        self.sock.close()


def _config(http_port: int, tcp_port: int, backend_port: int, echo_port: int) -> str:
    return mesh_config(http_port, backend_port, backend_port, weights=(100, 0)) + f"""---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tcp-gw, namespace: test}}
spec:
  servers:
  - port: {{number: {tcp_port}, name: tcp, protocol: TCP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: test}}
spec:
  hosts: [echo]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: test}}
spec:
  hosts: ["*"]
  gateways: [tcp-gw]
  tcp:
  - route: [{{destination: {{host: echo, port: {{number: 9000}}}}}}]
"""


@pytest.fixture
def setup(tmp_path):
    backend = Backend("v1")
    echo = Echo()
    ports = free_port(), free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(_config(ports[0], ports[1], backend.port, echo.port))
    proxies: list[Proxy] = []

    def start(access_log: str) -> Proxy:
        proxy = Proxy(config, tmp_path, concurrency=1, access_log=access_log).start()
        proxies.append(proxy)
        return proxy

    yield start, ports, backend, echo
    for proxy in proxies:
        proxy.stop()
    backend.close()
    echo.close()


def _tcp_exchange(port: int, payload: bytes) -> tuple[str, str]:
    """Send `payload`, read it back, close; (client address, proxy address) as Envoy prints them."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = conn.recv(65536)
            assert chunk, "the echo closed early"
            got += chunk
        assert got == payload
        client = "%s:%d" % conn.getsockname()[:2]
        proxy = "%s:%d" % conn.getpeername()[:2]
    return client, proxy


def _access_lines(proxy: Proxy, count: int) -> list[str]:
    def lines() -> list[str] | None:
        found = [line for line in proxy.log_text().splitlines() if line.startswith("[")]
        return found[:count] if len(found) >= count else None

    return proxy.wait_for(lines, f"{count} access-log lines")


def test_a_request_and_a_tcp_connection_in_envoys_text_format(setup) -> None:
    start, (http_port, tcp_port), backend, echo = setup
    proxy = start("text")
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{local_port}", "-A", "probe/1.0",
         "-H", "x-forwarded-for: 203.0.113.7", "-H", "x-request-id: rid-42",
         f"http://127.0.0.1:{http_port}/items?x=1"], capture_output=True, text=True, timeout=10, check=True)
    code, local_port = out.stdout.split()
    assert code == "200"
    client, proxy_address = _tcp_exchange(tcp_port, b"hello tcp")
    [request_line, connection_line] = _access_lines(proxy, 2)

    request = _fields(request_line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", request["%START_TIME%"])
    assert request["%REQ(:METHOD)%"] == "GET"
    assert request["%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"] == "/items?x=1"
    assert request["%PROTOCOL%"] == "HTTP/1.1"
    assert request["%RESPONSE_CODE%"] == "200"
    assert request["%RESPONSE_FLAGS%"] == "-"
    assert request["%RESPONSE_CODE_DETAILS%"] == "via_upstream"
    assert request["%CONNECTION_TERMINATION_DETAILS%"] == "-"
    assert request["%UPSTREAM_TRANSPORT_FAILURE_REASON%"] == "-"
    assert request["%BYTES_RECEIVED%"] == "0"
    assert request["%BYTES_SENT%"] == str(len(b"v1 /items?x=1"))
    assert request["%DURATION%"].isdigit()
    assert request["%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"] == "-"
    assert request["%REQ(X-FORWARDED-FOR)%"].startswith("203.0.113.7")
    assert request["%REQ(USER-AGENT)%"] == "probe/1.0"
    assert request["%REQ(X-REQUEST-ID)%"] == "rid-42"
    assert request["%REQ(:AUTHORITY)%"] == f"127.0.0.1:{http_port}"
    assert request["%UPSTREAM_HOST%"] == f"127.0.0.1:{backend.port}"
    assert request["%UPSTREAM_CLUSTER%"] == "outbound|80|v1|backend"
    assert request["%UPSTREAM_LOCAL_ADDRESS%"] == "-"
    assert request["%DOWNSTREAM_LOCAL_ADDRESS%"] == f"127.0.0.1:{http_port}"
    assert request["%DOWNSTREAM_REMOTE_ADDRESS%"] == f"127.0.0.1:{local_port}"
    assert request["%REQUESTED_SERVER_NAME%"] == "-"

    connection = _fields(connection_line)
    assert (connection["%REQ(:METHOD)%"], connection["%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"],
            connection["%PROTOCOL%"]) == ("-", "-", "-")
    assert connection["%RESPONSE_CODE%"] == "0"
    assert connection["%RESPONSE_FLAGS%"] == "-"
    assert connection["%BYTES_RECEIVED%"] == connection["%BYTES_SENT%"] == str(len(b"hello tcp"))
    assert connection["%UPSTREAM_HOST%"] == f"127.0.0.1:{echo.port}"
    assert connection["%UPSTREAM_CLUSTER%"] == "outbound|9000||echo"
    assert connection["%DOWNSTREAM_LOCAL_ADDRESS%"] == proxy_address
    assert connection["%DOWNSTREAM_REMOTE_ADDRESS%"] == client
    for operator in ("%REQ(USER-AGENT)%", "%REQ(X-REQUEST-ID)%", "%REQ(:AUTHORITY)%", "%ROUTE_NAME%"):
        assert connection[operator] == "-"


def test_tcp_connections_in_json_with_their_flags(setup) -> None:
    start, (http_port, tcp_port), backend, echo = setup
    proxy = start("json")
    client, proxy_address = _tcp_exchange(tcp_port, b"x" * 1000)
    echo.close()  # the next connection finds no upstream: connect failure, UF
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=5) as conn:
        try:
            assert conn.recv(1) == b""
        except ConnectionResetError:
            pass  # the proxy resets a connection it cannot forward
    def tcp_records() -> list[dict] | None:
        found = [r for r in proxy.log_records() if r.get("protocol") == "tcp"]
        return found if len(found) >= 2 else None

    records = proxy.wait_for(tcp_records, "two TCP access-log lines")
    # the first connection's line is written when the echo side has closed too: either may come first
    [ok] = [r for r in records if r["response_flags"] == "-"]
    [failed] = [r for r in records if r["response_flags"] != "-"]
    assert ok["event"] == "access" and ok["response_flags"] == "-"
    assert (ok["bytes_received"], ok["bytes_sent"]) == (1000, 1000)
    assert ok["upstream_host"] == f"127.0.0.1:{echo.port}" and ok["cluster"] == "outbound|9000||echo"
    assert ok["downstream_remote_address"] == client and ok["downstream_local_address"] == proxy_address
    assert ok["duration_ms"] >= 0 and "downstream_peer_principal" not in ok
    assert failed["response_flags"] == "UF" and (failed["bytes_received"], failed["bytes_sent"]) == (0, 0)
    json.dumps(failed)


def _get(port: int, path: str) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_telemetry_access_logging_filters_and_picks_the_envoy_provider(tmp_path) -> None:
    backend = Backend("v1")
    echo = Echo()
    http_port, tcp_port = free_port(), free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(_config(http_port, tcp_port, backend.port, echo.port) + """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "request.url_path.startsWith('/keep') || response.code >= 400"}
""")
    proxy = Proxy(config, tmp_path, concurrency=1, access_log="json").start()
    try:
        assert _get(http_port, "/drop/1") == 200
        assert _get(http_port, "/keep/1") == 200
        assert _get(http_port, "/drop/2") == 200
        _tcp_exchange(tcp_port, b"tcp")
        lines = _access_lines(proxy, 2)
        assert [_fields(line)["%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"] for line in lines] == ["/keep/1", "-"]
        assert proxy.config_dump()["config"]["access_logging"]["client"] == {
            "enabled": True, "filter": "request.url_path.startsWith('/keep') || response.code >= 400",
            "provider": "envoy"}
        proxy.stop()
        # nothing of the filtered requests was written, in any format
        assert "/drop/" not in proxy.log_text()
        assert not [r for r in proxy.log_records() if r.get("event") == "access"]
    finally:
        proxy.stop()
        backend.close()
        echo.close()
