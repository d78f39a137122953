"""AuthorizationPolicy in the real `triomesh proxy` process (an edge gateway, so the root namespace's
policies apply): denials answer 403 `RBAC: access denied` over HTTP/1.1 and h2c (curl), with the
matched policy in the access log and the triomesh_rbac_* counters; a Gateway TCP server closes a
denied connection before any upstream connection; a namespace's policy stays out of an edge proxy; a
misspelled policy field is refused on reload and the last good policies keep serving."""

from __future__ import annotations

import json

import trio

from tests.integration.l7_harness import curl
from tests.integration.test_gateway_tcp import EchoBackend
from tests.runner.harness import Backend, Proxy, free_port

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: test}
spec:
  servers:
  - port: {number: HTTP_PORT, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: TCP_ALLOWED_PORT, name: tcp-a, protocol: TCP}
    hosts: ["*"]
  - port: {number: TCP_DENIED_PORT, name: tcp-d, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend, namespace: test}
spec:
  hosts: [backend]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: BACKEND_PORT}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: test}
spec:
  hosts: [echo]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {tcp: ECHO_PORT}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routes, namespace: test}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{destination: {host: backend}}]
  tcp:
  - route: [{destination: {host: echo, port: {number: 9000}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: istio-system}
spec:
  action: DENY
  rules:
  # the port keeps it off the TCP servers: on TCP a DENY rule ignores its HTTP-only fields (paths)
  - to: [{operation: {paths: ["/admin*"], ports: ["HTTP_PORT"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-reads, namespace: istio-system}
spec:
  rules:
  - from: [{source: {ipBlocks: [127.0.0.0/8]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
  - to: [{operation: {ports: ["TCP_ALLOWED_PORT"]}}]
  - to: [{operation: {methods: [POST]}}]
    when: [{key: "request.headers[x-token]", values: [let-me-in]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: istio-system}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/audit*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-everything, namespace: test}
spec:
  action: DENY
  rules: [{}]
"""

DENY_ADMIN = "rbac_access_denied_matched_policy[ns[istio-system]-policy[deny-admin]-rule[0]]"


async def _closed_without_data(port: int) -> bool:
    """Whether the proxy ends the connection (FIN or RST) without sending a byte."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    async with stream:
        try:
            await stream.send_all(b"hello\n")
            return await stream.receive_some(4096) == b""
        except trio.BrokenResourceError:
            return True


async def _echo(port: int, text: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(text + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        return data


async def test_policies_at_an_edge_gateway(nursery, tmp_path):
    backend = Backend("backend")
    echo = await EchoBackend("echo").start(nursery)
    ports = {name: free_port() for name in ("HTTP_PORT", "TCP_ALLOWED_PORT", "TCP_DENIED_PORT")}
    text = CONFIG.replace("BACKEND_PORT", str(backend.port)).replace("ECHO_PORT", str(echo.port))
    for name, port in ports.items():
        text = text.replace(name, str(port))
    config = tmp_path / "authz.yaml"
    config.write_text(text)
    proxy = Proxy(config=config, workdir=tmp_path, concurrency=1)
    await trio.to_thread.run_sync(proxy.start)
    base = f"http://127.0.0.1:{ports['HTTP_PORT']}"
    try:
        # allowed: a GET from 127.0.0.1 (the namespace `test`'s deny-everything is not this proxy's)
        code, out, err = await curl("-sS", "-i", f"{base}/ok")
        assert code == 0 and out.startswith("HTTP/1.1 200") and out.endswith("backend /ok"), (out, err)
        for flags in ((), ("--http2-prior-knowledge",)):
            # DENY first: a GET the ALLOW policy would take, on /admin
            code, out, err = await curl("-sS", "-i", *flags, f"{base}/admin/users")
            assert code == 0, err
            status_line, _, body = out.partition("\r\n\r\n")
            assert status_line.split()[1] == "403" and body == "RBAC: access denied", out
            assert "content-type: text/plain" in status_line.lower()
            # normalized before matching: /public/../admin is /admin
            code, out, err = await curl("-sS", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", *flags,
                                        f"{base}/public/../%61dmin")
            assert out == "403", (out, err)
            # an ALLOW policy applies and none of its rules matches a DELETE
            code, out, err = await curl("-sS", "-X", "DELETE", "-w", " %{http_code}", *flags, f"{base}/thing")
            assert out == "RBAC: access denied 403", (out, err)
            # a POST with the header the `when` condition asks for is allowed (to the backend, which
            # answers anything but GET with 501)
            code, out, err = await curl("-sS", "-X", "POST", "-H", "x-token: let-me-in", "-o", "/dev/null",
                                        "-w", "%{http_code}", *flags, f"{base}/thing")
            assert out == "501", (out, err)
        code, out, err = await curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/audit/1")
        assert out == "200", (out, err)

        # TCP: the ALLOW policy's port rule admits one server; on the other, its HTTP-only rules
        # never match a connection, so it is closed before any byte reaches the echo backend
        with trio.fail_after(10):
            assert await _echo(ports["TCP_ALLOWED_PORT"], b"ping") == b"echo ping\n"
            before = echo.connections
            assert await _closed_without_data(ports["TCP_DENIED_PORT"])
            assert echo.connections == before

        denied = await trio.to_thread.run_sync(proxy.stats, "triomesh_rbac_denied_total")
        allowed = await trio.to_thread.run_sync(proxy.stats, "triomesh_rbac_allowed_total")
        logged = await trio.to_thread.run_sync(proxy.stats, "triomesh_rbac_logged_total")
        http_listener = (("listener", f"127.0.0.1_{ports['HTTP_PORT']}"),)
        assert denied[http_listener] == 6 and allowed[http_listener] == 4 and logged[http_listener] == 1
        assert denied[(("listener", f"127.0.0.1_{ports['TCP_DENIED_PORT']}"),)] == 1
        assert allowed[(("listener", f"127.0.0.1_{ports['TCP_ALLOWED_PORT']}"),)] == 1
        actions = await trio.to_thread.run_sync(proxy.stats, "triomesh_gateway_tcp_cx_total")
        assert actions[(("action", "denied"), ("listener", f"127.0.0.1_{ports['TCP_DENIED_PORT']}"))] == 1

        dump = await trio.to_thread.run_sync(proxy.config_dump)
        authorization = dump["config"]["authorization"]
        assert (authorization["deny"], authorization["allow"], authorization["audit"]) == (
            ["istio-system/deny-admin"], ["istio-system/allow-reads"], ["istio-system/audit"])
        assert dump["config"]["peer_authentication"]["mode"] == "PERMISSIVE"

        def access_lines():
            lines = [r for r in proxy.log_records() if r.get("event") == "access" and r.get("status") == 403]
            return lines if len(lines) >= 6 else None

        lines = await trio.to_thread.run_sync(proxy.wait_for, access_lines, "six 403 access-log lines")
        details = sorted((r["method"], r["protocol"], r["response_code_details"]) for r in lines)
        assert details == sorted([
            ("GET", "HTTP/1.1", DENY_ADMIN), ("GET", "HTTP/2", DENY_ADMIN),
            ("GET", "HTTP/1.1", DENY_ADMIN), ("GET", "HTTP/2", DENY_ADMIN),
            ("DELETE", "HTTP/1.1", "rbac_access_denied_matched_policy[none]"),
            ("DELETE", "HTTP/2", "rbac_access_denied_matched_policy[none]"),
        ]), details
        assert all(r["response_flags"] == "-" and r["upstream_host"] == "-" for r in lines)

        def hinted():  # the AUDIT policy's match marks its request's line
            return [r["path"] for r in proxy.log_records() if r.get("event") == "access" and r.get("access_log_hint")]

        assert await trio.to_thread.run_sync(proxy.wait_for, hinted, "the audited request's line") == ["/audit/1"]
        tcp_denials = [r for r in proxy.log_records() if r.get("event") == "connection denied by authorization policy"]
        assert [r["policy"] for r in tcp_denials] == ["none"]

        # a misspelled field in a policy: the update is refused with its place, the old policies serve
        staged = tmp_path / "staged.yaml"
        staged.write_text(text.replace("methods: [GET, HEAD]", "method: [GET, HEAD]"))
        staged.rename(config)

        def rejected():
            status = json.loads(proxy.admin("/config_status")[1])
            return status["last_rejected"]

        refusal = await trio.to_thread.run_sync(proxy.wait_for, rejected, "the misspelled policy refused")
        assert refusal["file"] == str(config), refusal
        assert "AuthorizationPolicy istio-system/allow-reads" in refusal["error"], refusal
        assert "$.spec.rules[0].to[0].operation.method: unknown field `method`" in refusal["error"], refusal
        code, out, err = await curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/admin")
        assert out == "403", (out, err)
        code, out, err = await curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/ok")
        assert out == "200", (out, err)
    finally:
        await trio.to_thread.run_sync(proxy.stop)
        backend.close()
