"""VirtualService routing through the real data plane: matches, weighted subsets, rewrite, redirect,
directResponse and header operations, against real backends on 127.0.0.1."""

from __future__ import annotations

import base64
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
SUBSETS = {"subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}


async def _two_versions(nursery):
    v1 = await TrafficBackend("v1").start(nursery)
    v2 = await TrafficBackend("v2").start(nursery)
    se = service_entry(HOST, [(v1, {"version": "v1"}), (v2, {"version": "v2"})])
    return v1, v2, se, destination_rule("svc", HOST, **SUBSETS)


def _to(subset: str, weight: int | None = None, **extra) -> dict:
    d = {"destination": {"host": HOST, "subset": subset}, **extra}
    if weight is not None:
        d["weight"] = weight
    return d


async def test_weighted_subsets_80_20_within_5_sigma(nursery):
    _, _, se, dr = await _two_versions(nursery)
    proxy = await start(nursery, se, dr, virtual_service("svc", HOST, [{"route": [_to("v1", 80), _to("v2", 20)]}]))
    client = Client(proxy.port)
    n = 2000
    seen = Counter([(await client.request("/")).body.decode() for _ in range(n)])
    # binomial(2000, 0.2): mean 400, sigma 17.9; 5 sigma = 90
    assert abs(seen["v2"] - 400) < 90, seen
    assert seen["v1"] + seen["v2"] == n


async def test_weights_100_0_and_reapplied_weights_take_effect_without_failures(nursery):
    _, _, se, dr = await _two_versions(nursery)
    proxy = await start(nursery, se, dr, virtual_service("svc", HOST, [{"route": [_to("v1", 100), _to("v2", 0)]}]))
    client = Client(proxy.port)
    assert {(await client.request("/")).body for _ in range(50)} == {b"v1"}
    proxy.apply(se, dr, virtual_service("svc", HOST, [{"route": [_to("v1", 0), _to("v2", 100)]}]))
    replies = [await client.request("/") for _ in range(50)]
    assert {r.status for r in replies} == {200}
    assert {r.body for r in replies} == {b"v2"}


async def test_header_regex_query_and_method_matches_first_match_wins(nursery):
    _, _, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [
        {"match": [{"headers": {"user-agent": {"regex": ".*Safari.*"}}},
                   {"queryParams": {"canary": {"exact": "yes"}}}], "route": [_to("v2")]},
        {"match": [{"method": {"exact": "DELETE"}, "uri": {"prefix": "/admin"}}], "route": [_to("v2")]},
        {"route": [_to("v1")]},
    ])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    assert (await c.request("/", headers=[("user-agent", "Mozilla/5.0 Safari/605.1")])).body == b"v2"
    assert (await c.request("/", headers=[("user-agent", "curl/8")])).body == b"v1"
    assert (await c.request("/x?a=1&canary=yes")).body == b"v2"
    assert (await c.request("/x?canary=no")).body == b"v1"
    assert (await c.request("/admin/x", method="DELETE")).body == b"v2"
    assert (await c.request("/admin/x", method="GET")).body == b"v1"
    assert (await c.request("/other", method="DELETE")).body == b"v1"


async def test_prefix_rewrite_per_match_block_keeps_query_and_rewrites_authority(nursery):
    v1, _, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [
        {"match": [{"uri": {"prefix": "/api/v1"}}, {"uri": {"prefix": "/old"}}],
         "rewrite": {"uri": "/v2", "authority": "backend.internal"}, "route": [_to("v1")]},
        {"match": [{"uri": {"exact": "/exact"}}], "rewrite": {"uri": "/replaced"}, "route": [_to("v1")]},
        {"match": [{"uri": {"prefix": "/re/"}}],
         "rewrite": {"uriRegexRewrite": {"match": "^/re/([a-z]+)/(\\d+)$", "rewrite": "/\\2/\\1"}}, "route": [_to("v1")]},
    ])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    for path in ("/api/v1/users?x=1", "/old/users?x=1", "/exact?q", "/re/items/42?z=2"):
        assert (await c.request(path)).status == 200
    seen = [(r["target"], r["headers"]["host"]) for r in v1.requests]
    assert seen[0] == ("/v2/users?x=1", "backend.internal")
    assert seen[1] == ("/v2/users?x=1", "backend.internal")
    assert seen[2] == ("/replaced?q", HOST)
    assert seen[3] == ("/42/items?z=2", HOST)


async def test_redirects(nursery):
    _, _, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [
        {"match": [{"uri": {"exact": "/moved"}}], "redirect": {"uri": "/new/place"}},
        {"match": [{"uri": {"exact": "/elsewhere"}}],
         "redirect": {"authority": "other.example.com", "redirectCode": 302}},
        {"match": [{"uri": {"exact": "/secure"}}], "redirect": {"scheme": "https", "port": 8443}},
        {"match": [{"uri": {"exact": "/q"}}], "redirect": {"uri": "/n?fresh=1"}},
        {"route": [_to("v1")]},
    ])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    r = await c.request("/moved?keep=1")
    assert (r.status, r.header("location"), r.body) == (301, f"http://{HOST}/new/place?keep=1", b"")
    r = await c.request("/elsewhere", host=f"{HOST}:{8080}")
    assert (r.status, r.header("location")) == (302, "http://other.example.com/elsewhere")
    r = await c.request("/secure")
    assert (r.status, r.header("location")) == (301, f"https://{HOST}:8443/secure")
    r = await c.request("/q?old=1")
    assert r.header("location") == f"http://{HOST}/n?fresh=1"
    assert (await c.request("/")).body == b"v1", "the connection stays usable after local replies"
    assert proxy.counter("triomesh_downstream_rq_total", response_code="301") == 3


async def test_direct_response_with_string_bytes_and_response_headers(nursery):
    _, _, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [
        {"match": [{"uri": {"exact": "/down"}}], "directResponse": {"status": 503, "body": {"string": "maintenance"}},
         "headers": {"response": {"set": {"retry-after": "120"}}}},
        {"match": [{"uri": {"exact": "/bin"}}],
         "directResponse": {"status": 200, "body": {"bytes": base64.b64encode(b"\x00\x01bin").decode()}}},
        {"match": [{"uri": {"exact": "/empty"}}], "directResponse": {"status": 204}},
    ])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    r = await c.request("/down")
    assert (r.status, r.body, r.header("retry-after"), r.header("content-type")) == (503, b"maintenance", "120", "text/plain")
    r = await c.request("/bin")
    assert (r.status, r.body) == (200, b"\x00\x01bin")
    r = await c.request("/empty")
    assert (r.status, r.body) == (204, b"")


async def test_request_and_response_header_operations_route_and_destination(nursery):
    v1, v2, se, dr = await _two_versions(nursery)
    v1.extra_headers = [(b"x-internal", b"secret"), (b"x-version", b"backend-says")]
    vs = virtual_service("svc", HOST, [{
        "headers": {"request": {"set": {"x-env": "prod"}, "add": {"x-added": "a"}, "remove": ["x-drop"]},
                    "response": {"set": {"x-version": "mesh"}, "add": {"x-served-by": "triomesh"},
                                 "remove": ["x-internal"]}},
        "route": [_to("v1", 50, headers={"request": {"set": {"x-dest": "one"}}, "response": {"add": {"x-dest": "one"}}}),
                  _to("v2", 50, headers={"request": {"set": {"x-dest": "two"}}})],
    }])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    for _ in range(40):
        r = await c.request("/", headers=[("x-env", "dev"), ("x-drop", "1"), ("x-keep", "1")])
        assert r.header("x-served-by") == "triomesh"
        assert r.header("x-internal") is None
        if r.body == b"v1":
            assert r.header("x-version") == "mesh" and r.header("x-dest") == "one"
        else:
            assert r.header("x-dest") is None
    assert v1.requests and v2.requests
    for be, dest in ((v1, "one"), (v2, "two")):
        for rec in be.requests:
            h = rec["headers"]
            assert (h["x-env"], h["x-added"], h["x-keep"], h["x-dest"]) == ("prod", "a", "1", dest)
            assert "x-drop" not in h


async def test_host_header_set_rewrites_the_authority(nursery):
    v1, _, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [{"headers": {"request": {"set": {"host": "internal.local"}}}, "route": [_to("v1")]}])
    proxy = await start(nursery, se, dr, vs)
    assert (await Client(proxy.port).request("/")).status == 200
    assert v1.requests[0]["headers"]["host"] == "internal.local"


async def test_mirrors_list_each_with_its_percentage(nursery):
    v1, v2, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [{"route": [_to("v1")], "mirrors": [
        {"destination": {"host": HOST, "subset": "v2"}},
        {"destination": {"host": HOST, "subset": "v1"}, "percentage": {"value": 0}}]}])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    for _ in range(10):
        await c.request("/")
    with trio.fail_after(3):
        while len(v2.requests) < 10:
            await trio.sleep(0.01)
    assert len(v1.requests) == 10, "a 0% mirror sends nothing"
    assert {r["headers"]["host"] for r in v2.requests} == {f"{HOST}-shadow"}


async def test_rewrite_without_uri_match_replaces_the_slash_prefix_like_istio(nursery):
    v1, _, se, dr = await _two_versions(nursery)
    vs = virtual_service("svc", HOST, [{"rewrite": {"uri": "/v2/"}, "route": [_to("v1")]}])
    proxy = await start(nursery, se, dr, vs)
    assert (await Client(proxy.port).request("/items?x=1")).status == 200
    assert v1.requests[0]["target"] == "/v2/items?x=1"


async def test_cors_preflight_answered_and_actual_responses_get_cors_headers(nursery):
    v1, _, se, dr = await _two_versions(nursery)
    cors = {"allowOrigins": [{"exact": "https://app.example.com"}, {"regex": "https://.*\\.trusted\\.dev"}],
            "allowMethods": ["GET", "POST"], "allowHeaders": ["x-token"], "exposeHeaders": ["x-backend"],
            "maxAge": "24h", "allowCredentials": True}
    vs = virtual_service("svc", HOST, [{"route": [_to("v1")], "corsPolicy": cors}])
    proxy = await start(nursery, se, dr, vs)
    c = Client(proxy.port)
    pre = [("origin", "https://a.trusted.dev"), ("access-control-request-method", "POST")]
    r = await c.request("/api", method="OPTIONS", headers=pre)
    assert r.status == 200 and v1.requests == [], "an allowed preflight is answered by the proxy"
    assert r.header("access-control-allow-origin") == "https://a.trusted.dev"
    assert (r.header("access-control-allow-methods"), r.header("access-control-allow-headers"),
            r.header("access-control-max-age"), r.header("access-control-allow-credentials")) == (
        "GET,POST", "x-token", "86400", "true")
    r = await c.request("/api", headers=[("origin", "https://app.example.com")])
    assert r.status == 200 and r.header("access-control-allow-origin") == "https://app.example.com"
    assert r.header("access-control-expose-headers") == "x-backend"
    r = await c.request("/api", headers=[("origin", "https://evil.example")])
    assert r.status == 200 and r.header("access-control-allow-origin") is None
    r = await c.request("/api", method="OPTIONS", headers=[("origin", "https://evil.example"),
                                                            ("access-control-request-method", "GET")])
    assert r.header("access-control-allow-origin") is None
    assert len(v1.requests) == 3, "an unmatched preflight is forwarded (unmatchedPreflights FORWARD)"


async def test_delegate_virtual_service_routes_under_the_root_match(nursery):
    from tests.config.helpers import doc

    v1, v2, se, dr = await _two_versions(nursery)
    root = virtual_service("svc", HOST, [
        {"match": [{"uri": {"prefix": "/reviews"}}], "delegate": {"name": "reviews-team"}},
        {"route": [_to("v1")]},
    ])
    delegate = doc("VirtualService", "reviews-team", {"http": [
        {"match": [{"uri": {"prefix": "/reviews/v2"}}], "route": [_to("v2")]},
        {"match": [{"uri": {"prefix": "/other"}}], "route": [_to("v2")]},  # outside /reviews: dropped
        {"route": [_to("v1")], "headers": {"response": {"set": {"x-team": "reviews"}}}},
    ]})
    proxy = await start(nursery, se, dr, root, delegate)
    c = Client(proxy.port)
    r = await c.request("/reviews/v2/1")
    assert r.body == b"v2"
    r = await c.request("/reviews/1")
    assert (r.body, r.header("x-team")) == (b"v1", "reviews")
    r = await c.request("/other")
    assert (r.body, r.header("x-team")) == (b"v1", None), "the root's last route, not the delegate's"
