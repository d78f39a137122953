"""Fault injection, timeouts and retries through the real data plane against real backends."""

from __future__ import annotations

import socket

import trio

from tests.integration.traffic_harness import Client, TrafficBackend, service_entry, start, virtual_service

HOST = "svc.example.com"
DEST = {"destination": {"host": HOST}}


async def _backends(nursery, *statuses: int, delay_s: float = 0.0):
    return [await TrafficBackend(f"b{i}", status, delay_s).start(nursery) for i, status in enumerate(statuses)]


async def _proxy(nursery, backends, route: dict, **kw):
    se = service_entry(HOST, [(b, {}) for b in backends])
    vs = virtual_service("svc", HOST, [{"route": [DEST], **route}])
    return await start(nursery, se, vs, **kw)


def _cluster() -> str:
    return f"outbound|80||{HOST}"


# --- fault injection --------------------------------------------------------------------------------


async def test_fault_abort_every_request_never_reaches_upstream(nursery):
    (be,) = await _backends(nursery, 200)
    proxy = await _proxy(nursery, [be], {"fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}})
    c = Client(proxy.port)
    for _ in range(5):
        r = await c.request("/")
        assert (r.status, r.body) == (418, b"fault filter abort")
    assert be.requests == []
    assert proxy.counter("triomesh_fault_aborts_total", cluster=_cluster()) == 5
    assert proxy.counter("triomesh_response_flags_total", flag="FI") == 5


async def test_fault_abort_with_grpc_status(nursery):
    (be,) = await _backends(nursery, 200)
    proxy = await _proxy(nursery, [be], {"fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}}})
    r = await Client(proxy.port).request("/pkg.Service/Method", method="POST", body=b"\0\0\0\0\0")
    assert (r.status, r.header("grpc-status"), r.header("content-type")) == (200, "14", "application/grpc")
    assert be.requests == []
    assert proxy.counter("triomesh_response_flags_total", flag="FI") == 1


async def test_fault_abort_percentage_within_5_sigma(nursery):
    (be,) = await _backends(nursery, 200)
    proxy = await _proxy(nursery, [be], {"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 25}}}})
    c = Client(proxy.port)
    n = 2000
    aborted = sum([(await c.request("/")).status == 503 for _ in range(n)])
    # binomial(2000, 0.25): mean 500, sigma 19.4; 5 sigma = 97
    assert abs(aborted - 500) < 97
    assert len(be.requests) == n - aborted
    assert proxy.counter("triomesh_fault_aborts_total", cluster=_cluster()) == aborted


async def test_fault_without_percentage_injects_nothing(nursery):
    (be,) = await _backends(nursery, 200)
    proxy = await _proxy(nursery, [be], {"fault": {"abort": {"httpStatus": 500}, "delay": {"fixedDelay": "5s"}}})
    c = Client(proxy.port)
    with trio.fail_after(2):
        assert {(await c.request("/")).status for _ in range(20)} == {200}


async def test_fault_delay_then_abort(nursery):
    (be,) = await _backends(nursery, 200)
    proxy = await _proxy(nursery, [be], {"fault": {"delay": {"fixedDelay": "200ms", "percentage": {"value": 100}}}})
    c = Client(proxy.port)
    t0 = trio.current_time()
    r = await c.request("/")
    assert r.status == 200 and trio.current_time() - t0 >= 0.2
    assert proxy.counter("triomesh_fault_delays_total", cluster=_cluster()) == 1
    assert proxy.counter("triomesh_response_flags_total", flag="DI") == 1
    proxy.apply(service_entry(HOST, [(be, {})]), virtual_service("svc", HOST, [{"route": [DEST], "fault": {
        "delay": {"fixedDelay": "100ms", "percent": 100}, "abort": {"httpStatus": 500, "percentage": {"value": 100}}}}]))
    t0 = trio.current_time()
    r = await c.request("/")
    assert r.status == 500 and trio.current_time() - t0 >= 0.1
    assert len(be.requests) == 1


# --- timeouts ------------------------------------------------------------------------------------------


async def test_route_timeout_is_504_upstream_request_timeout(nursery):
    (be,) = await _backends(nursery, 200, delay_s=2.0)
    proxy = await _proxy(nursery, [be], {"timeout": "200ms", "retries": {"attempts": 0}})
    t0 = trio.current_time()
    r = await Client(proxy.port).request("/")
    assert (r.status, r.body) == (504, b"upstream request timeout")
    assert 0.2 <= trio.current_time() - t0 < 1.5  # the backend answers only after 2 s
    assert proxy.counter("triomesh_upstream_rq_timeout_total", cluster=_cluster()) == 1
    assert proxy.counter("triomesh_response_flags_total", flag="UT") == 1


# --- retries -------------------------------------------------------------------------------------------


async def test_retry_goes_to_another_host(nursery):
    bad, good = await _backends(nursery, 503, 200)
    proxy = await _proxy(nursery, [bad, good], {"retries": {"attempts": 1, "retryOn": "5xx"}})
    c = Client(proxy.port)
    replies = [await c.request("/") for _ in range(40)]
    assert {r.status for r in replies} == {200}
    # every request that met the bad host was retried once, on the other host (never the same one)
    retried = len(bad.requests)
    assert retried >= 19 and len(good.requests) == 40
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster=_cluster()) == retried
    assert proxy.counter("triomesh_upstream_rq_retry_success_total", cluster=_cluster()) == retried


async def test_istio_default_retry_policy_retries_503_but_attempts_0_disables_it(nursery):
    bad, good = await _backends(nursery, 503, 200)
    proxy = await _proxy(nursery, [bad, good], {})
    c = Client(proxy.port)
    assert {(await c.request("/")).status for _ in range(20)} == {200}
    se = service_entry(HOST, [(bad, {}), (good, {})])
    proxy.apply(se, virtual_service("svc", HOST, [{"route": [DEST], "retries": {"attempts": 0}}]))
    statuses = [(await c.request("/")).status for _ in range(20)]
    assert statuses.count(503) == 10


async def test_retry_conditions(nursery):
    (be,) = await _backends(nursery, 500)
    se = service_entry(HOST, [(be, {})])
    proxy = await start(nursery, se, virtual_service("svc", HOST, [{"route": [DEST], "retries": {
        "attempts": 2, "retryOn": "gateway-error"}}]))
    c = Client(proxy.port)
    assert (await c.request("/")).status == 500
    assert len(be.requests) == 1, "gateway-error does not retry a 500"
    for status, retry_on in ((502, "gateway-error"), (409, "retriable-4xx"), (418, "connect-failure,418"),
                             (500, "5xx")):
        be.status = status
        be.requests.clear()
        proxy.apply(se, virtual_service("svc", HOST, [{"route": [DEST], "retries": {"attempts": 2, "retryOn": retry_on}}]))
        assert (await c.request("/")).status == status
        assert len(be.requests) == 3, (status, retry_on)
    be.status, be.extra_headers = 200, [(b"grpc-status", b"14")]
    be.requests.clear()
    proxy.apply(se, virtual_service("svc", HOST, [{"route": [DEST], "retries": {"attempts": 1, "retryOn": "unavailable"}}]))
    await c.request("/")
    assert len(be.requests) == 2, "grpc-status 14 is retried under `unavailable`"


async def test_connect_failure_is_retried_on_a_live_endpoint(nursery):
    (good,) = await _backends(nursery, 200)
    dead = TrafficBackend("dead")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead.port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    proxy = await _proxy(nursery, [dead, good], {"retries": {"attempts": 1, "retryOn": "connect-failure"}})
    c = Client(proxy.port)
    assert {(await c.request("/")).status for _ in range(10)} == {200}
    # round robin moves on with each try, so (after a random start) every request meets the dead host first
    failed = proxy.counter("triomesh_upstream_cx_connect_fail_total", cluster=_cluster())
    assert failed >= 9
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster=_cluster()) == failed


async def test_per_try_timeout_retries_and_overall_timeout_bounds_all_tries(nursery):
    slow, fast = await _backends(nursery, 200, 200)
    slow.delay_s = 2.0
    proxy = await _proxy(nursery, [slow, fast], {"timeout": "5s", "retries": {"attempts": 2, "perTryTimeout": "100ms",
                                                                             "retryOn": "5xx"}})
    c = Client(proxy.port)
    t0 = trio.current_time()
    replies = [await c.request("/") for _ in range(4)]
    assert [r.body for r in replies] == [b"b1"] * 4
    assert trio.current_time() - t0 < 1.5
    # round robin moves on with each try, so (after a random start) every request meets the slow host first
    timeouts = proxy.counter("triomesh_upstream_rq_per_try_timeout_total", cluster=_cluster())
    assert timeouts == len(slow.requests) >= 3
    fast.delay_s = 2.0
    se = service_entry(HOST, [(slow, {}), (fast, {})])
    proxy.apply(se, virtual_service("svc", HOST, [{"route": [DEST], "timeout": "500ms",
                                                    "retries": {"attempts": 10, "perTryTimeout": "200ms", "retryOn": "5xx"}}]))
    t0 = trio.current_time()
    r = await c.request("/")
    elapsed = trio.current_time() - t0
    assert r.status == 504 and 0.45 <= elapsed < 1.5, elapsed  # the slow hosts answer only after 2 s


async def test_request_body_replayed_up_to_the_limit_and_not_beyond(nursery):
    bad, good = await _backends(nursery, 503, 200)
    proxy = await _proxy(nursery, [bad, good], {"retries": {"attempts": 1, "retryOn": "5xx"}})
    c = Client(proxy.port)
    small = bytes(range(256)) * 40  # 10 KiB
    r = await c.request("/echo", method="POST", body=small)
    r2 = await c.request("/echo", method="POST", body=small)
    assert {r.status, r2.status} == {200}
    assert all(rec["body"].encode("latin-1") == small for rec in bad.requests + good.requests)
    retries = proxy.counter("triomesh_upstream_rq_retry_total", cluster=_cluster())
    assert retries == len(bad.requests) >= 1
    big = b"x" * (100 * 1024)
    statuses = sorted([(await c.request("/echo", method="POST", body=big)).status for _ in range(2)])
    assert statuses == [200, 503], "a body over 64 KiB is streamed to one try, never retried"
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster=_cluster()) == retries
    assert len(good.requests[-1]["body"]) == len(big)


async def test_max_retries_budget_overflow_is_counted(nursery):
    bad, good = await _backends(nursery, 503, 200)
    se = service_entry(HOST, [(bad, {}), (good, {})])
    from tests.integration.traffic_harness import destination_rule
    dr = destination_rule("svc", HOST, trafficPolicy={"connectionPool": {"http": {"maxRetries": 0}}})
    proxy = await start(nursery, se, dr, virtual_service("svc", HOST, [{"route": [DEST], "retries": {"attempts": 2, "retryOn": "5xx"}}]))
    c = Client(proxy.port)
    statuses = [(await c.request("/")).status for _ in range(10)]
    assert statuses.count(503) == 5
    assert proxy.counter("triomesh_upstream_rq_retry_overflow_total", cluster=_cluster()) == 5
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster=_cluster()) == 0


async def test_injected_delay_is_not_part_of_the_route_timeout(nursery):
    (be,) = await _backends(nursery, 200)
    proxy = await _proxy(nursery, [be], {"timeout": "200ms",
                                         "fault": {"delay": {"fixedDelay": "300ms", "percentage": {"value": 100}}}})
    r = await Client(proxy.port).request("/")
    assert r.status == 200, "Envoy's route timeout starts at the router, after the fault filter"


async def test_streaming_chunked_body_is_not_held_back_for_replay(nursery):
    """A client streaming a chunked body while waiting for the response must not be deadlocked by
    the retry buffer: the part that arrived goes upstream at once, the rest streams."""
    from tests.integration.backend import Backend

    be = await Backend("early").start(nursery)
    proxy = await _proxy(nursery, [be], {"retries": {"attempts": 2, "retryOn": "5xx"}})
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"POST /early-413 HTTP/1.1\r\nhost: svc.example.com\r\ntransfer-encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n")
    got = b""
    with trio.fail_after(3):
        while b"\r\n\r\nbig" not in got:
            got += await stream.receive_some(4096)
    assert got.startswith(b"HTTP/1.1 413")
    await stream.aclose()


async def test_expect_100_continue_with_a_replayable_body(nursery):
    bad, good = await _backends(nursery, 503, 200)
    proxy = await _proxy(nursery, [bad, good], {"retries": {"attempts": 1, "retryOn": "5xx"}})
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"POST /echo HTTP/1.1\r\nhost: svc.example.com\r\ncontent-length: 5\r\n"
                          b"expect: 100-continue\r\n\r\n")
    got = b""
    with trio.fail_after(3):
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(4096)
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await stream.send_all(b"hello")
        while b'"backend": "b1"' not in got:
            got += await stream.receive_some(4096)
    assert b"HTTP/1.1 200" in got
    assert [r["body"] for r in bad.requests + good.requests] == ["hello"] * len(bad.requests + good.requests)
    assert "expect" not in good.requests[-1]["headers"]
    await stream.aclose()
