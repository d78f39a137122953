"""TLS to upstreams (DestinationRule tls) end to end: curl -> proxy -> a real TLS backend from a
trustme CA on 127.0.0.1, which records the SNI and client certificate each connection brought."""

from __future__ import annotations

import dataclasses
import json

import grpc
import trio
import trustme

from proxy.config.snapshot import UpstreamTls
from proxy.l7.access_log import record
from proxy.l7.upstream_conn import UpstreamConn, UpstreamTlsConn
from tests import grpc_apps
from tests.integration.l7_harness import curl, make_snapshot, prefix_route, start_proxy
from tests.integration.test_l7_edges import RecordingLog
from tests.integration.tls_backend import TlsBackend, server_context


def _ca_file(ca: trustme.CA, tmp_path, name: str = "ca.pem") -> str:
    path = tmp_path / name
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def _proxy(nursery, clusters: dict[str, tuple[int, UpstreamTls | None]], access_log=None):
    """A proxy routing `?c=<cluster>` to each cluster (one endpoint each, with its TLS)."""
    routes = []
    for name in clusters:
        route = prefix_route(b"/", {name: 100})
        routes.append(dataclasses.replace(route, matches=lambda head, c=b"c=" + name.encode(): head.query == c))
    snap = make_snapshot({name: [port] for name, (port, _) in clusters.items()}, routes)
    built = {name: dataclasses.replace(snap.clusters[name], tls=tls) for name, (_, tls) in clusters.items()}
    return await start_proxy(nursery, dataclasses.replace(snap, clusters=built), access_log=access_log)


async def test_simple_verifies_the_server_and_sends_sni(nursery, tmp_path):
    ca = trustme.CA()
    backend = await TlsBackend(server_context(ca, "backend.test")).start(nursery)
    tls = UpstreamTls("SIMPLE", "backend.test", ca_file=_ca_file(ca, tmp_path))
    proxy = await _proxy(nursery, {"svc": (backend.port, tls)})
    url = f"http://127.0.0.1:{proxy.port}/echo?c=svc"
    code, out, err = await curl("-i", url, url)
    assert code == 0, err
    assert out.count("HTTP/1.1 200") == 2, out
    assert out.count('"backend": "tls-backend"') == 2
    assert backend.server_names == ["backend.test"]  # one connection, pooled, with the SNI
    assert backend.alpn == ["http/1.1"]
    # the timeout sweeper watches that one connection object, not also a plain one made for its socket
    upstream = [conn for conn in proxy.plane.sweeper.watched if isinstance(conn, (UpstreamConn, UpstreamTlsConn))]
    assert [type(conn) for conn in upstream] == [UpstreamTlsConn]


async def test_wrong_ca_and_san_mismatch_answer_503_uf_with_the_reason(nursery, tmp_path):
    ca, other_ca = trustme.CA(), trustme.CA()
    backend = await TlsBackend(server_context(ca, "backend.test")).start(nursery)
    log = RecordingLog()
    proxy = await _proxy(nursery, {
        "wrongca": (backend.port, UpstreamTls("SIMPLE", "backend.test", ca_file=_ca_file(other_ca, tmp_path))),
        "wronghost": (backend.port, UpstreamTls("SIMPLE", "other.test", ca_file=_ca_file(ca, tmp_path, "ca2.pem"))),
        "sanok": (backend.port, UpstreamTls("SIMPLE", "other.test", ("backend.test",),
                                            ca_file=_ca_file(ca, tmp_path, "ca3.pem"))),
        # DNS names compare without case, as Envoy's
        "sancase": (backend.port, UpstreamTls("SIMPLE", "other.test", ("Backend.TEST",),
                                              ca_file=_ca_file(ca, tmp_path, "ca5.pem"))),
        "sanbad": (backend.port, UpstreamTls("SIMPLE", "backend.test", ("spiffe://x/ns/a/sa/b",),
                                             ca_file=_ca_file(ca, tmp_path, "ca4.pem"))),
        "skip": (backend.port, UpstreamTls("SIMPLE", "backend.test", insecure_skip_verify=True)),
    }, access_log=log)
    base = f"http://127.0.0.1:{proxy.port}"
    for name, want in (("wrongca", "503"), ("wronghost", "503"), ("sanok", "200"), ("sancase", "200"),
                       ("sanbad", "503"), ("skip", "200")):
        code, out, err = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/small?c={name}")
        assert (code, out) == (0, want), (name, out, err)
    assert proxy.counter("triomesh_upstream_tls_handshake_fail_total", reason="fail_verify_error") == 2
    assert proxy.counter("triomesh_upstream_tls_handshake_fail_total", reason="fail_verify_san") == 1
    failed = {ctx.cluster.name: ctx for ctx in log.contexts if ctx.status == 503}
    assert set(failed) == {"wrongca", "wronghost", "sanbad"}
    line = record(failed["sanbad"], 0.0, "t")
    assert line.response_flags == "UF"
    assert "match none of subjectAltNames" in line.upstream_transport_failure_reason
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in record(
        failed["wrongca"], 0.0, "t").upstream_transport_failure_reason
    assert "hostname mismatch" in record(failed["wronghost"], 0.0, "t").upstream_transport_failure_reason.lower()
    assert proxy.counter("triomesh_upstream_cx_connect_fail_total", cluster="wrongca") == 1


async def test_mutual_sends_the_client_certificate_and_fails_without(nursery, tmp_path):
    ca = trustme.CA()
    backend = await TlsBackend(server_context(ca, "backend.test", require_client_certificate=True)).start(nursery)
    client = ca.issue_cert("client.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    ca_file = _ca_file(ca, tmp_path)
    proxy = await _proxy(nursery, {
        "mutual": (backend.port, UpstreamTls("MUTUAL", "backend.test", ca_file=ca_file, cert_file=str(cert),
                                             key_file=str(key))),
        "simple": (backend.port, UpstreamTls("SIMPLE", "backend.test", ca_file=ca_file)),
    })
    code, out, err = await curl(f"http://127.0.0.1:{proxy.port}/echo?c=mutual")
    assert code == 0 and json.loads(out)["backend"] == "tls-backend", (out, err)
    assert backend.client_names == [("client.test",)]
    code, out, err = await curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{proxy.port}/small?c=simple")
    assert out == "503", (out, err)


async def test_connections_are_not_shared_between_different_sni(nursery, tmp_path):
    ca = trustme.CA()
    context = server_context(ca, "backend.test")
    ca.issue_cert("a.test", "b.test").configure_cert(context)
    backend = await TlsBackend(context).start(nursery)
    ca_file = _ca_file(ca, tmp_path)
    proxy = await _proxy(nursery, {
        "a": (backend.port, UpstreamTls("SIMPLE", "a.test", ca_file=ca_file)),
        "b": (backend.port, UpstreamTls("SIMPLE", "b.test", ca_file=ca_file)),
    })
    base = f"http://127.0.0.1:{proxy.port}"
    code, _, err = await curl(f"{base}/small?c=a", f"{base}/small?c=b", f"{base}/small?c=a", f"{base}/small?c=b")
    assert code == 0, err
    assert sorted(backend.server_names) == ["a.test", "b.test"]  # one pooled connection per SNI
    assert backend.connections == 2


def _grpc_tls_server(ca: trustme.CA, name: str, *hosts: str):
    """A gRPC Echo server over TLS with a certificate of `ca` for `hosts`: (server, port)."""
    leaf = ca.issue_cert(*hosts)
    return grpc_apps.start_grpc_server(
        name=name, tls=(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems)))


def _h2_tls_snapshot(port: int, tls: UpstreamTls):
    """One HTTP/2 cluster `grpc` (endpoint `port`) with `tls`, every path routed to it."""
    snap = make_snapshot({"grpc": [port]}, [prefix_route(b"/", {"grpc": 100})])
    return dataclasses.replace(snap, clusters={"grpc": dataclasses.replace(snap.clusters["grpc"], http2=True, tls=tls)})


async def test_http2_over_tls_to_a_grpc_server_by_alpn(nursery, tmp_path):
    ca = trustme.CA()
    server, port = _grpc_tls_server(ca, "grpc-tls", "grpc.test")
    try:
        snap_tls = UpstreamTls("SIMPLE", "grpc.test", ca_file=_ca_file(ca, tmp_path), alpn=("h2",))
        snap = _h2_tls_snapshot(port, snap_tls)
        proxy = await start_proxy(nursery, snap)
        target = f"127.0.0.1:{proxy.port}"
        for payload in (b"one", b"two"):
            result = await trio.to_thread.run_sync(lambda p=payload: grpc_apps.unary(target, p, timeout=10))
            assert result.code == grpc.StatusCode.OK, result
            assert result.response.endswith(b":" + payload)
        assert proxy.counter("triomesh_upstream_cx_total", cluster="grpc") == 1  # one TLS connection, two streams

        # an HTTP/2 cluster that does not trust the server: UNAVAILABLE, and the reason in the access log
        log = RecordingLog()
        untrusted = dataclasses.replace(snap_tls, ca_file=_ca_file(trustme.CA(), tmp_path, "other.pem"))
        bad = dataclasses.replace(snap, clusters={"grpc": dataclasses.replace(snap.clusters["grpc"], tls=untrusted)})
        proxy = await start_proxy(nursery, bad, access_log=log)
        target = f"127.0.0.1:{proxy.port}"
        result = await trio.to_thread.run_sync(lambda: grpc_apps.unary(target, b"x", timeout=10))
        assert result.code == grpc.StatusCode.UNAVAILABLE, result
        line = record(log.contexts[-1], 0.0, "t")
        assert "UF" in line.response_flags and "CERTIFICATE_VERIFY_FAILED" in line.upstream_transport_failure_reason
    finally:
        server.close()


async def test_a_new_snapshot_with_other_tls_settings_does_not_reuse_old_connections(nursery, tmp_path):
    ca = trustme.CA()
    context = server_context(ca, "backend.test")
    ca.issue_cert("a.test", "b.test").configure_cert(context)
    backend = await TlsBackend(context).start(nursery)
    ca_file = _ca_file(ca, tmp_path)
    proxy = await _proxy(nursery, {"svc": (backend.port, UpstreamTls("SIMPLE", "a.test", ca_file=ca_file))})
    url = f"http://127.0.0.1:{proxy.port}/small?c=svc"
    assert (await curl(url))[0] == 0
    snap = proxy.plane.holder.current
    proxy.plane.holder.swap(dataclasses.replace(snap, version="2", clusters={"svc": dataclasses.replace(
        snap.clusters["svc"], tls=UpstreamTls("SIMPLE", "b.test", ca_file=ca_file))}))
    assert (await curl(url, url))[0] == 0
    assert backend.server_names == ["a.test", "b.test"]
    assert proxy.plane.stats.gauge("triomesh_upstream_cx_active", cluster="svc").value == 1


async def test_an_upstream_that_never_answers_the_handshake_times_out_within_the_connect_timeout(nursery, tmp_path):
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts the TCP connection; nobody ever speaks TLS on it
    log = RecordingLog()
    tls = UpstreamTls("SIMPLE", "backend.test", ca_file=_ca_file(trustme.CA(), tmp_path))
    proxy = await _proxy(nursery, {"svc": (silent.getsockname()[1], tls)}, access_log=log)  # connect timeout 1 s
    start = trio.current_time()
    code, out, err = await curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{proxy.port}/small?c=svc")
    assert (code, out) == (0, "503"), err
    assert 0.9 < trio.current_time() - start < 5
    assert proxy.counter("triomesh_upstream_tls_handshake_fail_total", reason="handshake_timeout") >= 1
    line = record(log.contexts[-1], 0.0, "t")
    assert line.response_flags == "UF" and "no TLS handshake within" in line.upstream_transport_failure_reason
    silent.close()


async def test_http2_connections_are_not_reused_after_the_tls_settings_change(nursery, tmp_path):
    """HTTP/2 pools as HTTP/1.1's: after a snapshot changes the cluster's TLS settings (the SNI here),
    the next stream goes over a new connection made with the new settings and the old one closes."""
    ca = trustme.CA()
    server, port = _grpc_tls_server(ca, "grpc-tls-change", "grpc.test", "other.test")
    try:
        first = UpstreamTls("SIMPLE", "grpc.test", ca_file=_ca_file(ca, tmp_path), alpn=("h2",))
        snap = _h2_tls_snapshot(port, first)
        proxy = await start_proxy(nursery, snap)
        target = f"127.0.0.1:{proxy.port}"

        async def call(payload: bytes) -> None:
            result = await trio.to_thread.run_sync(lambda: grpc_apps.unary(target, payload, timeout=10))
            assert result.code == grpc.StatusCode.OK, result

        await call(b"one")
        assert proxy.counter("triomesh_upstream_cx_total", cluster="grpc") == 1
        proxy.plane.holder.swap(dataclasses.replace(snap, version="2", clusters={"grpc": dataclasses.replace(
            snap.clusters["grpc"], tls=dataclasses.replace(first, sni="other.test"))}))
        await call(b"two")
        await call(b"three")
        assert proxy.counter("triomesh_upstream_cx_total", cluster="grpc") == 2  # one new connection, two streams
        active = proxy.plane.stats.gauge("triomesh_upstream_cx_active", cluster="grpc").value
        assert active == 1 and [len(pool) for pool in proxy.plane.h2_pools.values()] == [1]
    finally:
        server.close()
