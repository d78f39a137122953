"""DestinationRule policies through the real data plane: load balancers (incl. consistent hash with
generated cookies), per-subset policies, connection-pool circuit breaking, outlier ejection."""

from __future__ import annotations

import socket
from functools import partial
from collections import Counter

import trio

from tests.integration.traffic_harness import (
    Client,
    TrafficBackend,
    destination_rule,
    service_entry,
    start,
    virtual_service,
)

HOST = "svc.example.com"
CLUSTER = f"outbound|80||{HOST}"


async def _setup(nursery, n: int, traffic_policy: dict, *, route: dict | None = None, subsets=None, **kw):
    backends = [await TrafficBackend(f"b{i}").start(nursery) for i in range(n)]
    se = service_entry(HOST, [(b, {"version": "v1" if i < n - 1 else "v2"}) for i, b in enumerate(backends)])
    spec = {"trafficPolicy": traffic_policy}
    if subsets:
        spec["subsets"] = subsets
    dr = destination_rule("svc", HOST, **spec)
    vs = virtual_service("svc", HOST, [route or {"route": [{"destination": {"host": HOST}}]}])
    proxy = await start(nursery, se, dr, vs, **kw)
    return proxy, backends


async def test_random_spreads_within_5_sigma(nursery):
    proxy, _ = await _setup(nursery, 3, {"loadBalancer": {"simple": "RANDOM"}})
    c = Client(proxy.port)
    seen = Counter([(await c.request("/")).body for _ in range(3000)])
    # binomial(3000, 1/3): mean 1000, sigma 25.8; 5 sigma = 129
    assert all(abs(v - 1000) < 129 for v in seen.values()) and len(seen) == 3, seen


async def test_least_request_avoids_the_slow_host(nursery):
    proxy, (slow, fast) = await _setup(nursery, 2, {"loadBalancer": {"simple": "LEAST_REQUEST"}})
    slow.delay_s = 0.05

    async def worker():
        c = Client(proxy.port)
        for _ in range(40):
            await c.request("/")

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(worker)
    # two draws with replacement from two hosts: 1/4 of the picks are slow-slow, 1/4 fast-fast, and the
    # mixed half goes to the host with fewer requests in flight (the fast one, as the slow one holds
    # them longer): measured ~0.72 fast, where round robin gives 0.5. 400 picks: sigma ~2.3 %, so
    # 0.6 is over 5 sigma below the expected share and over 4 sigma above round robin's.
    share = len(fast.requests) / (len(fast.requests) + len(slow.requests))
    assert share > 0.6, (len(fast.requests), len(slow.requests))


async def test_consistent_hash_on_header_is_sticky_and_spreads_users(nursery):
    proxy, backends = await _setup(nursery, 3, {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}})
    c = Client(proxy.port)
    first = {}
    for round_ in range(3):
        for u in range(100):
            body = (await c.request("/", headers=[("x-user", f"user-{u}")])).body
            assert first.setdefault(u, body) == body, "a user always lands on the same host"
    # (a host owning even a fifth of the ring misses all 100 users with probability 0.8^100 ~ 2e-10)
    assert len(set(first.values())) == 3, "100 users spread over all 3 hosts"


async def test_consistent_hash_cookie_generated_when_absent_then_sticky(nursery):
    proxy, _ = await _setup(nursery, 3, {"loadBalancer": {"consistentHash": {
        "httpCookie": {"name": "session", "path": "/", "ttl": "3600s"}}}})
    c = Client(proxy.port)
    r = await c.request("/")
    cookie = r.header("set-cookie")
    assert cookie is not None and cookie.startswith("session=") and "Max-Age=3600" in cookie and "Path=/" in cookie
    value = cookie.split(";")[0]
    bodies = {(await c.request("/", headers=[("cookie", f"a=1; {value}")])).body for _ in range(20)}
    assert bodies == {r.body}
    r2 = await c.request("/", headers=[("cookie", value)])
    assert r2.header("set-cookie") is None, "no new cookie when the client has one"


async def test_consistent_hash_source_ip(nursery):
    proxy, _ = await _setup(nursery, 3, {"loadBalancer": {"consistentHash": {"useSourceIp": True}}})
    bodies = set()
    for _ in range(10):
        c = Client(proxy.port)  # new connections, new source ports, same IP
        bodies.add((await c.request("/")).body)
        await c.close()
    assert len(bodies) == 1


async def test_subset_policy_overrides_the_host_policy(nursery):
    subsets = [{"name": "v1", "labels": {"version": "v1"}},
               {"name": "sticky", "labels": {"version": "v1"},
                "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}}]
    route = {"match": [{"headers": {"x-sticky": {"exact": "1"}}}], "route": [{"destination": {"host": HOST, "subset": "sticky"}}]}
    backends = [await TrafficBackend(f"b{i}").start(nursery) for i in range(3)]
    se = service_entry(HOST, [(b, {"version": "v1"}) for b in backends])
    dr = destination_rule("svc", HOST, trafficPolicy={"loadBalancer": {"simple": "ROUND_ROBIN"}}, subsets=subsets)
    vs = virtual_service("svc", HOST, [route, {"route": [{"destination": {"host": HOST, "subset": "v1"}}]}])
    proxy = await start(nursery, se, dr, vs)
    clusters = proxy.plane.holder.current.clusters
    assert clusters[f"outbound|80|v1|{HOST}"].lb_policy == "ROUND_ROBIN"
    assert clusters[f"outbound|80|sticky|{HOST}"].consistent_hash.source == "header"
    c = Client(proxy.port)
    assert len({(await c.request("/", headers=[("x-user", "a")])).body for _ in range(9)}) == 3
    assert len({(await c.request("/", headers=[("x-user", "a"), ("x-sticky", "1")])).body for _ in range(9)}) == 1


async def test_passthrough_goes_to_the_original_destination_never_the_host_header(nursery):
    from proxy.l7.server import serve_connection
    from tests.config.helpers import doc
    from tests.integration.traffic_harness import LISTENER

    target = await TrafficBackend("target").start(nursery)
    other = await TrafficBackend("other").start(nursery)
    se = service_entry(HOST, [(other, {})])
    dr = destination_rule("svc", HOST, trafficPolicy={"loadBalancer": {"simple": "PASSTHROUGH"}})
    vs = doc("VirtualService", "any", {"hosts": ["*"], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": HOST}}]}]})
    proxy = await start(nursery, se, dr, vs)
    # at an edge listener there is no original destination: naming an address in Host must not
    # turn the gateway into an open proxy
    r = await Client(proxy.port).request("/", host=f"127.0.0.1:{target.port}")
    assert r.status == 503
    assert target.requests == [] and other.requests == []

    # a captured connection (as the transparent listener hands it over) goes where it was headed
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        client = trio.socket.socket()
        await client.connect(lsock.getsockname())
        accepted, addr = lsock.accept()
        nursery.start_soon(partial(serve_connection, proxy.plane, LISTENER, accepted, addr, nursery=nursery,
                                   original_destination=("127.0.0.1", target.port)))
        with client:
            await client.send(b"GET / HTTP/1.1\r\nhost: anything.example\r\nconnection: close\r\n\r\n")
            got = b""
            with trio.fail_after(5):
                while chunk := await client.recv(65536):
                    got += chunk
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"target")
    assert other.requests == []


# --- connection pool (circuit breaker) ---------------------------------------------------------------


async def test_overflow_is_503_uo_at_once_and_counted(nursery):
    proxy, (be,) = await _setup(nursery, 1, {"connectionPool": {"tcp": {"maxConnections": 1},
                                                                "http": {"http1MaxPendingRequests": 1}}})
    be.delay_s = 0.3
    results = []

    async def one():
        t0 = trio.current_time()
        r = await Client(proxy.port).request("/")
        results.append((r.status, trio.current_time() - t0, r.body, r.header("x-envoy-overloaded")))

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(one)
    ok = [r for r in results if r[0] == 200]
    over = [r for r in results if r[0] == 503]
    assert len(ok) == 2 and len(over) == 6, results  # one on the connection, one pending
    assert all(t < 0.25 for _, t, _, _ in over), "overflow is answered at once, not queued (the upstream takes 0.3 s)"
    assert all(b"overflow" in body for _, _, body, _ in over)
    # Envoy's router marks what a circuit breaker dropped; responses that went through do not say so
    assert [overloaded for *_, overloaded in over] == ["true"] * 6
    assert [overloaded for *_, overloaded in ok] == [None, None]
    assert proxy.counter("triomesh_upstream_rq_pending_overflow_total", cluster=CLUSTER) == 6
    assert proxy.counter("triomesh_response_flags_total", flag="UO") == 6
    assert be.connections == 1


async def test_pending_requests_wait_for_the_one_connection(nursery):
    proxy, (be,) = await _setup(nursery, 1, {"connectionPool": {"tcp": {"maxConnections": 1},
                                                                "http": {"http1MaxPendingRequests": 10}}})
    be.delay_s = 0.05
    statuses = []

    async def one():
        statuses.append((await Client(proxy.port).request("/")).status)

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    assert statuses == [200] * 5
    assert trio.current_time() - t0 >= 0.25, "served one after another on one connection"
    assert be.connections == 1


async def test_max_requests_per_connection_and_idle_timeout(nursery):
    proxy, (be,) = await _setup(nursery, 1, {"connectionPool": {"http": {"maxRequestsPerConnection": 2,
                                                                         "idleTimeout": "200ms"}}})
    c = Client(proxy.port)
    for _ in range(6):
        assert (await c.request("/")).status == 200
    assert be.connections == 3
    await trio.sleep(0.4)
    assert (await c.request("/")).status == 200
    assert be.connections == 4, "the idle connection expired after 200ms"


async def test_connect_timeout_from_the_rule():
    from tests.config.helpers import compile_docs
    from tests.integration.traffic_harness import gateway
    be = TrafficBackend("x")
    be.port = 9
    snap = compile_docs(gateway(), service_entry(HOST, [(be, {})]),
                        destination_rule("svc", HOST, trafficPolicy={"connectionPool": {"tcp": {"connectTimeout": "250ms"}}}))
    assert snap.clusters[CLUSTER].connect_timeout_s == 0.25


# --- outlier detection ----------------------------------------------------------------------------------


async def test_failing_host_is_ejected_and_returns_after_the_ejection_time(nursery):
    proxy, (bad, good1, good2) = await _setup(nursery, 3, {"outlierDetection": {
        "consecutive5xxErrors": 2, "interval": "50ms", "baseEjectionTime": "300ms", "maxEjectionPercent": 100}},
        route={"route": [{"destination": {"host": HOST}}], "retries": {"attempts": 0}})
    bad.status = 503
    c = Client(proxy.port)
    statuses = [(await c.request("/")).status for _ in range(30)]
    assert statuses.count(503) == 2, "two 5xx in a row, then the host is out"
    assert proxy.counter("triomesh_outlier_ejections_total", cluster=CLUSTER) == 1
    assert proxy.gauge("triomesh_outlier_ejections_active", cluster=CLUSTER) == 1
    bad.status = 200
    seen = len(bad.requests)
    await trio.sleep(0.4)
    for _ in range(9):
        assert (await c.request("/")).status == 200
    assert len(bad.requests) > seen, "back in rotation after baseEjectionTime"
    assert proxy.gauge("triomesh_outlier_ejections_active", cluster=CLUSTER) == 0


async def test_connect_failures_count_as_5xx_for_ejection(nursery):
    good = await TrafficBackend("good").start(nursery)
    dead = TrafficBackend("dead")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead.port = s.getsockname()[1]
    s.close()
    se = service_entry(HOST, [(dead, {}), (good, {})])
    dr = destination_rule("svc", HOST, trafficPolicy={"outlierDetection": {"consecutive5xxErrors": 1, "baseEjectionTime": "30s"}})
    proxy = await start(nursery, se, dr, virtual_service("svc", HOST, [{"route": [{"destination": {"host": HOST}}]}]))
    c = Client(proxy.port)
    assert {(await c.request("/")).status for _ in range(20)} == {200}  # the default retry policy covers the first
    assert proxy.counter("triomesh_upstream_cx_connect_fail_total", cluster=CLUSTER) == 1
    assert proxy.counter("triomesh_outlier_ejections_total", cluster=CLUSTER) == 1


async def test_http2_max_requests_limits_active_requests_for_every_protocol(nursery):
    proxy, (be,) = await _setup(nursery, 1, {"connectionPool": {"http": {"http2MaxRequests": 2}}})
    be.delay_s = 0.3
    statuses = []

    async def one():
        r = await Client(proxy.port).request("/")
        statuses.append((r.status, r.header("x-envoy-overloaded")))

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    assert sorted(statuses, key=str) == [(200, None), (200, None), (503, "true"), (503, "true"), (503, "true")]
    assert proxy.counter("triomesh_upstream_rq_overflow_total", cluster=CLUSTER) == 3


async def test_max_connection_duration_and_tcp_keepalive(nursery):
    proxy, (be,) = await _setup(nursery, 1, {"connectionPool": {"tcp": {
        "maxConnectionDuration": "200ms", "tcpKeepalive": {"probes": 3, "time": "30s", "interval": "5s"}}}})
    c = Client(proxy.port)
    for _ in range(3):
        assert (await c.request("/")).status == 200
    assert be.connections == 1
    (pool,) = [p for k, p in proxy.plane.pools.items() if k[0] == CLUSTER]
    sock = pool.idle[0][0].sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    await trio.sleep(0.25)
    assert (await c.request("/")).status == 200
    assert (await c.request("/")).status == 200
    assert be.connections == 2, "the connection older than maxConnectionDuration was not reused"


async def test_retry_limit_exceeded_flag(nursery):
    proxy, (be,) = await _setup(nursery, 1, {}, route={"route": [{"destination": {"host": HOST}}],
                                                       "retries": {"attempts": 2, "retryOn": "5xx"}})
    be.status = 500
    assert (await Client(proxy.port).request("/")).status == 500
    assert len(be.requests) == 3
    assert proxy.counter("triomesh_response_flags_total", flag="URX") == 1


async def test_consistent_hash_on_query_parameter(nursery):
    proxy, _ = await _setup(nursery, 3, {"loadBalancer": {"consistentHash": {"httpQueryParameterName": "user"}}})
    c = Client(proxy.port)
    # 100 users: even a host owning only a fifth of the ring gets one with probability 1 - 0.8^100
    picks = {u: {(await c.request(f"/?a=1&user={u}")).body for _ in range(3)} for u in range(100)}
    assert all(len(p) == 1 for p in picks.values())
    assert len(set().union(*picks.values())) == 3


async def test_retry_budget_caps_concurrent_retries(nursery):
    proxy, (be,) = await _setup(nursery, 1, {"retryBudget": {"percent": {"value": 10}, "minRetryConcurrency": 1}},
                                route={"route": [{"destination": {"host": HOST}}],
                                       "retries": {"attempts": 1, "retryOn": "5xx", "backoff": "200ms"}})
    be.status = 503
    be.delay_s = 0.05
    statuses = []

    async def one():
        r = await Client(proxy.port).request("/")
        statuses.append((r.status, r.header("x-envoy-overloaded")))

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    # 5 requests in flight, 10 % of them is 0 retries, but minRetryConcurrency allows one at a time
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster=CLUSTER) == 1
    assert proxy.counter("triomesh_upstream_rq_retry_overflow_total", cluster=CLUSTER) == 4
    # a retry the budget refuses is not a drop: the upstream's own 503 reaches the client, unmarked
    assert statuses == [(503, None)] * 5


async def test_generated_cookie_attributes(nursery):
    proxy, _ = await _setup(nursery, 2, {"loadBalancer": {"consistentHash": {"httpCookie": {
        "name": "s", "ttl": "0s", "attributes": [{"name": "SameSite", "value": "Strict"}, {"name": "Secure"}]}}}})
    r = await Client(proxy.port).request("/")
    cookie = r.header("set-cookie")
    assert cookie.startswith("s=") and cookie.endswith("; HttpOnly; SameSite=Strict; Secure") and "Max-Age" not in cookie
