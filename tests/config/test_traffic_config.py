"""Traffic-control fields of VirtualService and DestinationRule: accepted, compiled, validated with
precise errors, and shown in the config dump."""

from __future__ import annotations

import json

import pytest

from proxy.config.errors import ConfigError
from proxy.config.policies import DEFAULT_RETRY
from tests.config.helpers import compile_docs, doc

HOST = "reviews"
SE = doc("ServiceEntry", "reviews", {"hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                     "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
                                     "endpoints": [{"address": "10.0.0.1", "labels": {"version": "v1"}},
                                                   {"address": "10.0.0.2", "labels": {"version": "v2"}}]})
GW = doc("Gateway", "gw", {"servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]})
DR = doc("DestinationRule", "reviews", {"host": HOST, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                                 {"name": "v2", "labels": {"version": "v2"}}]})


def _vs(http: list[dict]) -> dict:
    return doc("VirtualService", "reviews", {"hosts": [HOST], "gateways": ["gw"], "http": http})


def _routes(snap):
    (listener,) = snap.listeners
    vh = listener.route_table.catch_all or next(iter(listener.route_table.exact.values()))
    return vh.routes


def _error(*docs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_docs(GW, SE, DR, *docs)
    return info.value


ROUTE = [{"destination": {"host": HOST, "subset": "v1"}}]


def test_retry_policy_compiles_and_defaults_to_istios():
    snap = compile_docs(GW, SE, DR, _vs([
        {"match": [{"uri": {"prefix": "/a"}}], "route": ROUTE},
        {"match": [{"uri": {"prefix": "/b"}}], "route": ROUTE,
         "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "gateway-error,503,retriable-4xx", "backoff": "10ms"}},
        {"route": ROUTE, "retries": {"attempts": 0}},
    ]))
    a, b, c = _routes(snap)
    assert a.retry == DEFAULT_RETRY and DEFAULT_RETRY.num_retries == 2 and DEFAULT_RETRY.retriable_status_codes == {503}
    assert b.retry.num_retries == 3 and b.retry.per_try_timeout_s == 2.0 and b.retry.backoff_base_s == 0.01
    assert b.retry.retry_on == {"gateway-error", "retriable-4xx", "retriable-status-codes"}
    assert b.retry.retriable_status_codes == {503}
    assert c.retry is None


@pytest.mark.parametrize("http, path, message", [
    ({"route": ROUTE, "retries": {"attempts": 2, "retryOn": "5xx,bogus"}}, "$.spec.http[0].retries.retryOn",
     "unknown retry condition 'bogus'"),
    ({"route": ROUTE, "retries": {"attempts": 2, "retryOn": "700"}}, "$.spec.http[0].retries.retryOn", "out of range"),
    ({"route": ROUTE, "fault": {"abort": {"percentage": {"value": 5}}}}, "$.spec.http[0].fault.abort.httpStatus",
     "exactly one of httpStatus and grpcStatus"),
    ({"route": ROUTE, "fault": {"abort": {"grpcStatus": "SLEEPY"}}}, "$.spec.http[0].fault.abort.grpcStatus",
     "unknown gRPC status 'SLEEPY'"),
    ({"route": ROUTE, "fault": {}}, "$.spec.http[0].fault", "a fault needs `delay` or `abort`"),
    ({"route": ROUTE, "redirect": {"uri": "/x"}}, "$.spec.http[0].redirect", "cannot also have route destinations"),
    ({"redirect": {"uri": "x"}}, "$.spec.http[0].redirect.uri", "must start with '/'"),
    ({"directResponse": {"status": 200, "body": {"bytes": "!!"}}}, "$.spec.http[0].directResponse.body.bytes",
     "not valid base64"),
    ({"route": ROUTE, "headers": {"request": {"set": {"bad header": "x"}}}}, "$.spec.http[0].headers.request.set.bad header",
     "invalid header name"),
    ({"route": ROUTE, "mirror": {"host": HOST, "subset": "v9"}}, "$.spec.http[0].mirror.subset", "subset 'v9'"),
    ({"route": ROUTE, "mirrorPercentage": {"value": 5}}, "$.spec.http[0].mirrorPercentage", "needs `mirror`"),
    ({"route": ROUTE, "rewrite": {}}, "$.spec.http[0].rewrite", "needs `uri`"),
    ({}, "$.spec.http[0].route", "needs at least one destination"),
    ({"route": ROUTE, "corsPolicy": {"allowMethods": ["GET"]}}, "$.spec.http[0].corsPolicy.allowOrigins",
     "at least one allowed origin"),
    ({"route": ROUTE, "corsPolicy": {"allowOrigins": [{"exact": "https://a"}], "allowHeaders": ["bad header"]}},
     "$.spec.http[0].corsPolicy.allowHeaders[0]", "invalid header name"),
])
def test_precise_compile_errors(http, path, message):
    e = _error(_vs([http]))
    assert e.field_path == path and message in e.message, (e.field_path, e.message)


@pytest.mark.parametrize("http, path", [
    ({"route": ROUTE, "fault": {"abort": {"httpStatus": 700}}}, "$.spec.http[0].fault.abort.httpStatus"),
    ({"route": ROUTE, "fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 101}}}},
     "$.spec.http[0].fault.delay.percentage.value"),
    ({"redirect": {"uri": "/x", "redirectCode": 399}}, "$.spec.http[0].redirect"),
    ({"route": ROUTE, "rewrite": {"uri": "/a", "uriRegexRewrite": {"match": "a", "rewrite": "b"}}}, "$.spec.http[0].rewrite"),
    ({"route": ROUTE, "retries": {"attempts": -1}}, "$.spec.http[0].retries.attempts"),
    ({"route": ROUTE, "timeout": "soon"}, "$.spec.http[0].timeout"),
])
def test_schema_errors_name_the_field(http, path):
    e = _error(_vs([http]))
    assert e.field_path == path, (e.field_path, e.message)


def test_destination_rule_policies_compile_with_subset_override():
    dr = doc("DestinationRule", "reviews", {"host": HOST, "trafficPolicy": {
        "loadBalancer": {"simple": "LEAST_CONN"},
        "connectionPool": {"tcp": {"maxConnections": 7, "connectTimeout": "300ms"},
                           "http": {"http1MaxPendingRequests": 3, "maxRequestsPerConnection": 0, "maxRetries": 4,
                                    "idleTimeout": "2s"}},
        "outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "10s",
                             "maxEjectionPercent": 50, "minHealthPercent": 20}},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {
                        "loadBalancer": {"consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"}, "maglev": {"tableSize": 251}}}}}]})
    snap = compile_docs(GW, SE, dr)
    base = snap.clusters[f"outbound|9080||{HOST}"]
    assert base.lb_policy == "LEAST_REQUEST" and base.connect_timeout_s == 0.3
    pool = base.connection_pool
    assert (pool.max_connections, pool.max_pending_requests, pool.max_requests_per_connection, pool.max_retries,
            pool.idle_timeout_s) == (7, 3, None, 4, 2.0)
    od = base.outlier
    assert (od.consecutive_5xx, od.consecutive_gateway, od.interval_s, od.base_ejection_time_s,
            od.max_ejection_percent, od.min_health_percent) == (2, 0, 1.0, 10.0, 50, 20)
    v1 = snap.clusters[f"outbound|9080|v1|{HOST}"]
    assert v1.connection_pool == pool and v1.lb_policy == "LEAST_REQUEST"
    v2 = snap.clusters[f"outbound|9080|v2|{HOST}"]
    assert v2.lb_policy == "CONSISTENT_HASH" and v2.consistent_hash.ring == "maglev" and v2.consistent_hash.ring_size == 251
    assert v2.consistent_hash.cookie_ttl_s == 0.0
    assert v2.connection_pool == pool, "fields the subset does not set are inherited"
    dump = json.loads(json.dumps(snap.dump))
    by_name = {c["name"]: c for c in dump["clusters"]}
    assert by_name[f"outbound|9080||{HOST}"]["connection_pool"]["max_connections"] == 7
    assert by_name[f"outbound|9080||{HOST}"]["outlier_detection"]["consecutive_5xx"] == 2
    assert by_name[f"outbound|9080|v2|{HOST}"]["consistent_hash"]["source"] == "cookie"


@pytest.mark.parametrize("lb, message", [
    ({"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}, "only one of `simple` and `consistentHash`"),
    ({"consistentHash": {"useSourceIp": True, "httpHeaderName": "x"}}, "exactly one of"),
    ({"consistentHash": {}}, "exactly one of"),
    ({"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 1000}}}, "not a prime number"),
])
def test_load_balancer_oneofs(lb, message):
    dr = doc("DestinationRule", "reviews", {"host": HOST, "trafficPolicy": {"loadBalancer": lb}})
    with pytest.raises(ConfigError) as info:
        compile_docs(GW, SE, dr)
    assert message in info.value.message and info.value.field_path.startswith("$.spec.trafficPolicy.loadBalancer")


def test_route_policies_in_config_dump():
    snap = compile_docs(GW, SE, DR, _vs([
        {"match": [{"uri": {"prefix": "/p"}}, {"uri": {"prefix": "/q"}}], "rewrite": {"uri": "/r"}, "route": ROUTE,
         "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 0.5}}},
         "mirror": {"host": HOST, "subset": "v2"}, "mirrorPercentage": {"value": 12.5},
         "headers": {"response": {"remove": ["server"]}}, "timeout": "3s"},
        {"match": [{"uri": {"exact": "/gone"}}], "redirect": {"uri": "/new", "redirectCode": 308}},
        {"directResponse": {"status": 404, "body": {"string": "nope"}}},
    ]))
    routes = _routes(snap)
    assert [r.rewrite.prefix if r.rewrite else None for r in routes] == [b"/p", b"/q", None, None]
    assert routes[0].fault.delay_ppm == 5000 and routes[0].mirrors[0].ppm == 125_000
    vh = json.loads(json.dumps(snap.dump))["listeners"][0]["virtual_hosts"][0]
    first, _, redirect, direct = vh["routes"]
    assert first["rewrite"]["uri"] == "/r" and first["timeout_s"] == 3.0
    assert first["fault"]["delay_s"] == 1.0 and first["mirrors"][0]["cluster"] == f"outbound|9080|v2|{HOST}"
    assert first["response_headers"]["remove"] == ["server"]
    assert first["retry"]["num_retries"] == 2
    assert redirect["redirect"]["code"] == 308 and redirect["retry"] is None
    assert direct["direct_response"] == {"status": 404, "body": "nope"}


def test_outlier_durations_are_checked():
    dr = doc("DestinationRule", "reviews", {"host": HOST, "trafficPolicy": {"outlierDetection": {"interval": "0s"}}})
    with pytest.raises(ConfigError) as info:
        compile_docs(GW, SE, dr)
    assert info.value.field_path == "$.spec.trafficPolicy.outlierDetection"
    assert "interval must be at least 1ms" in info.value.message


def test_delegate_errors():
    root = _vs([{"match": [{"uri": {"prefix": "/a"}}], "delegate": {"name": "team"}}])
    e = _error(root)
    assert (e.field_path, e.message) == ("$.spec.http[0].delegate", "no host-less VirtualService default/team to delegate to")
    e = _error(_vs([{"delegate": {"name": "team"}, "route": ROUTE}]))
    assert e.message == "a route with delegate cannot also have route, redirect or directResponse"
    lonely = doc("VirtualService", "lonely", {"http": [{"route": ROUTE}]})
    e = _error(_vs([{"route": ROUTE}]), lonely)
    assert e.field_path == "$.spec.hosts" and "no route delegates to this one" in e.message
    team = doc("VirtualService", "team", {"http": [{"match": [{"uri": {"prefix": "/a/x"}}], "route": ROUTE},
                                                   {"match": [{"uri": {"prefix": "/b"}}], "route": ROUTE},
                                                   {"route": ROUTE, "timeout": "2s"}]})
    snap = compile_docs(GW, SE, DR, root, team)
    routes = _routes(snap)
    assert len(routes) == 2, "the /b route contradicts the root's /a prefix and is dropped"
    assert routes[1].timeout_s == 2.0


def test_port_level_settings_precedence():
    se = doc("ServiceEntry", "reviews", {"hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                         "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"},
                                                   {"number": 9090, "name": "admin", "protocol": "HTTP"}],
                                         "endpoints": [{"address": "10.0.0.1", "labels": {"version": "v1"}}]})
    dr = doc("DestinationRule", "reviews", {"host": HOST, "trafficPolicy": {
        "loadBalancer": {"simple": "RANDOM"}, "connectionPool": {"tcp": {"maxConnections": 5}},
        "portLevelSettings": [{"port": {"number": 9090}, "loadBalancer": {"simple": "LEAST_REQUEST"}}]},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {
            "portLevelSettings": [{"port": {"number": 9080}, "connectionPool": {"tcp": {"maxConnections": 1}}}]}},
            {"name": "plain", "labels": {"version": "v1"}}]})
    c = compile_docs(GW, se, dr).clusters
    assert (c[f"outbound|9080||{HOST}"].lb_policy, c[f"outbound|9080||{HOST}"].connection_pool.max_connections) == ("RANDOM", 5)
    # the port-level entry replaces the host policy's fields as a whole: no inherited maxConnections
    assert (c[f"outbound|9090||{HOST}"].lb_policy, c[f"outbound|9090||{HOST}"].connection_pool.max_connections) == (
        "LEAST_REQUEST", None)
    assert (c[f"outbound|9080|v1|{HOST}"].lb_policy, c[f"outbound|9080|v1|{HOST}"].connection_pool.max_connections) == (
        "ROUND_ROBIN", 1)
    assert c[f"outbound|9090|v1|{HOST}"].lb_policy == "LEAST_REQUEST"
    assert c[f"outbound|9090|plain|{HOST}"].lb_policy == "LEAST_REQUEST"
    assert c[f"outbound|9080|plain|{HOST}"].connection_pool.max_connections == 5
