"""Every class of config error names the file, document, kind, namespace/name and field path."""

from __future__ import annotations

import pytest

from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.load import load_bytes, load_path
from tests.config.helpers import doc, dump, service, workload

VS_OK = doc(
    "VirtualService",
    "reviews",
    {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]},
    "prod",
)
DR_OK = doc("DestinationRule", "reviews", {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}, "prod")


def _load_error(*docs: dict, source: str = "bad.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bytes(dump(*docs), source)
    return info.value


def _compile_error(*docs: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_resources(load_bytes(dump(*docs), "cfg.yaml"), version="t")
    return info.value


def _where(e: ConfigError) -> tuple:
    return (e.file, e.document, e.kind, e.name, e.field_path)


def test_unknown_field_is_reported_at_its_path():
    bad = doc("VirtualService", "reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subnet": "v1"}}]}]}, "prod")
    e = _load_error(service("reviews", namespace="prod"), bad)
    assert _where(e) == ("bad.yaml", 1, "VirtualService", "prod/reviews", "$.spec.http[0].route[0].destination.subnet")
    assert e.message == "unknown field `subnet`"
    assert str(e) == "bad.yaml: document 1 (VirtualService prod/reviews): $.spec.http[0].route[0].destination.subnet: unknown field `subnet`"


def test_unknown_metadata_and_envelope_fields_are_errors():
    # Kubernetes' server-managed metadata (uid...) loads; a field Kubernetes does not know stays an error
    e = _load_error(doc("Gateway", "gw", {"servers": []}, "edge", lables={"app": "x"}))
    assert (e.field_path, e.message) == ("$.metadata.lables", "unknown field `lables`")
    d = doc("Gateway", "gw", {"servers": []})
    d["extra"] = 1
    assert _load_error(d).field_path == "$.extra"


def test_wrong_type():
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": "80"}]}]})
    e = _load_error(bad)
    assert _where(e) == ("bad.yaml", 0, "VirtualService", "default/r", "$.spec.http[0].route[0].weight")
    assert e.message == "Expected `int`, got `str`"


def test_out_of_range_values():
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": 101}]}]})
    assert _load_error(bad).message == "Expected `int` <= 100"
    port = service("r")
    port["spec"]["ports"][0]["number"] = 70000
    assert _load_error(port).field_path == "$.spec.ports[0].number"


def test_labels_must_be_strings():
    e = _load_error(doc("WorkloadEntry", "w", {"address": "127.0.0.1", "labels": {"version": 1}}))
    assert (e.field_path, e.message) == ("$.spec.labels[...]", "Expected `str`, got `int`")


def test_bad_enum_lists_the_allowed_values():
    e = _load_error(service("r", resolution="STATICK"))
    assert _where(e) == ("bad.yaml", 0, "ServiceEntry", "default/r", "$.spec.resolution")
    assert e.message == "Invalid enum value 'STATICK'; expected one of DNS, DNS_ROUND_ROBIN, NONE, STATIC"
    lb = doc("DestinationRule", "r", {"host": "r", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}})
    assert _load_error(lb).field_path == "$.spec.trafficPolicy.loadBalancer.simple"


def test_bad_protocol():
    e = _load_error(service("r", ports=[{"number": 80, "name": "http", "protocol": "HTTP3"}]))
    assert e.field_path == "$.spec.ports[0].protocol"
    assert "unknown protocol 'HTTP3'" in e.message


def test_protocol_is_case_insensitive():
    (r,) = load_bytes(dump(service("r", ports=[{"number": 80, "name": "http", "protocol": "http"}])))
    assert r.obj.spec.ports[0].protocol == "HTTP"


@pytest.mark.parametrize(
    "regex, why",
    [("(unclosed", "invalid regex"), ("(?=lookahead)", "RE2 does not support"), (r"(a)\1", "RE2 does not support")],
)
def test_bad_regex(regex, why):
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"match": [{"headers": {"user-agent": {"regex": regex}}}], "route": [{"destination": {"host": "r"}}]}]})
    e = _load_error(bad)
    assert _where(e) == ("bad.yaml", 0, "VirtualService", "default/r", "$.spec.http[0].match[0].headers[...].regex")
    assert why in e.message


def test_string_match_is_a_oneof():
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"match": [{"uri": {"exact": "/a", "prefix": "/"}}], "route": [{"destination": {"host": "r"}}]}]})
    e = _load_error(bad)
    assert e.field_path == "$.spec.http[0].match[0].uri"
    assert "only one of" in e.message


@pytest.mark.parametrize("value", ["2x", "1.5", "-1s", "s", ""])
def test_bad_duration(value):
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"timeout": value, "route": [{"destination": {"host": "r"}}]}]})
    e = _load_error(bad)
    assert e.field_path == "$.spec.http[0].timeout"
    assert "invalid duration" in e.message


def test_unknown_kind():
    e = _load_error(service("r"), {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "prod"}, "spec": {}})
    assert _where(e) == ("bad.yaml", 1, "Widget", "prod/w", "$.kind")
    assert e.message.startswith("unknown kind 'Widget' (apiVersion 'example.com/v1'); triomesh understands Gateway, ")


def test_missing_kind_and_bad_api_version():
    e = _load_error({"apiVersion": "networking.istio.io/v1", "metadata": {"name": "x"}})
    assert (e.field_path, e.message) == ("$.kind", "required field `kind` is missing")
    d = service("r")
    d["apiVersion"] = "networking.istio.io/v2"
    assert _load_error(d).field_path == "$.apiVersion"


def test_missing_required_field():
    e = _load_error(doc("DestinationRule", "r", {"subsets": []}))
    assert (e.field_path, e.message) == ("$.spec.host", "required field `host` is missing")


def test_unsupported_istio_fields_say_so():
    bad = doc("VirtualService", "r", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}]}],
                                      "tcp": [{"match": [{"sourceNamespace": "shop"}],
                                               "route": [{"destination": {"host": "r"}}]}]})
    e = _load_error(bad)
    assert e.field_path == "$.spec.tcp[0].match[0].sourceNamespace"
    assert e.message == "`sourceNamespace` is an Istio L4MatchAttributes field triomesh does not support yet"
    gw = doc("Gateway", "gw", {"servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"], "tls": {"mode": "SIMPLE", "subjectAltNames": ["a"]}}]})
    assert _load_error(gw).field_path == "$.spec.servers[0].tls.subjectAltNames"
    pool = doc("DestinationRule", "r", {"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"idleTimeout": "1h"}}}})
    e = _load_error(pool)
    assert (e.field_path, e.message) == ("$.spec.trafficPolicy.connectionPool.tcp.idleTimeout",
                                         "`idleTimeout` is an Istio TCPSettings field triomesh does not support yet")


def test_h2_upgrade_policy_and_max_concurrent_streams_are_supported():
    http = {"h2UpgradePolicy": "UPGRADE", "maxConcurrentStreams": 100}
    (r,) = load_bytes(dump(doc("DestinationRule", "r", {"host": "r", "trafficPolicy": {"connectionPool": {"http": http}}})))
    assert r.obj.spec.traffic_policy.connection_pool.http.h2_upgrade_policy == "UPGRADE"
    assert r.obj.spec.traffic_policy.connection_pool.http.max_concurrent_streams == 100


@pytest.mark.parametrize("http, message", [
    ({"maxConcurrentStreams": -1}, "Expected `int` >= 0"),
    ({"maxConcurrentStreams": 2**31}, "Expected `int` <= 2147483647"),
    ({"h2UpgradePolicy": "UPGRADE", "useClientProtocol": True},
     "useClientProtocol must not be true when h2UpgradePolicy is UPGRADE"),  # Istio's validation rule
])
def test_connection_pool_http_checks(http, message):
    e = _load_error(doc("DestinationRule", "r", {"host": "r", "trafficPolicy": {"connectionPool": {"http": http}}}))
    assert e.field_path.startswith("$.spec.trafficPolicy.connectionPool.http"), e.field_path
    assert message in e.message, e.message


def test_dangling_subset():
    bad = doc("VirtualService", "reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 50}, {"destination": {"host": "reviews", "subset": "v3"}, "weight": 50}]}]}, "prod")
    e = _compile_error(service("reviews", namespace="prod"), DR_OK, bad)
    assert _where(e) == ("cfg.yaml", 2, "VirtualService", "prod/reviews", "$.spec.http[0].route[1].destination.subset")
    assert e.message == "subset 'v3' is not defined by a DestinationRule for host 'reviews' (subsets: v1)"


def test_dangling_host():
    bad = doc("VirtualService", "reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}, "prod")
    e = _compile_error(service("reviews", namespace="prod"), bad)
    assert _where(e) == ("cfg.yaml", 1, "VirtualService", "prod/reviews", "$.spec.http[0].route[0].destination.host")
    assert e.message == "host 'ratings' matches no ServiceEntry host"


def test_short_names_resolve_in_the_resource_namespace_only():
    # `reviews` in namespace "test" is reviews.test.svc.cluster.local, not the prod service
    bad = doc("VirtualService", "reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}, "test")
    e = _compile_error(service("reviews.prod.svc.cluster.local", namespace="prod"), bad)
    assert e.field_path == "$.spec.http[0].route[0].destination.host"


def test_destination_rule_for_unknown_host():
    e = _compile_error(service("reviews", namespace="prod"), doc("DestinationRule", "r", {"host": "ratings"}, "prod"))
    assert _where(e) == ("cfg.yaml", 1, "DestinationRule", "prod/r", "$.spec.host")


def test_weights_must_total_100():
    bad = doc("VirtualService", "r", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": 60}, {"destination": {"host": "reviews"}, "weight": 60}]}]}, "prod")
    e = _compile_error(service("reviews", namespace="prod"), bad)
    assert (e.field_path, e.message) == ("$.spec.http[0].route", "total destination weight 120 != 100")


def test_unknown_gateway_and_port():
    bad = doc("VirtualService", "r", {"hosts": ["reviews"], "gateways": ["mesh", "edge"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}, "prod")
    e = _compile_error(service("reviews", namespace="prod"), bad)
    assert (e.field_path, e.message) == ("$.spec.gateways[1]", "gateway 'prod/edge' is not defined (no Gateway prod/edge)")
    bad = doc("VirtualService", "r", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "port": {"number": 9090}}}]}]}, "prod")
    e = _compile_error(service("reviews", namespace="prod"), bad)
    assert e.field_path == "$.spec.http[0].route[0].destination.port.number"


def test_duplicate_in_one_file():
    e = _load_error_dup()
    assert _where(e) == ("<memory>", 1, "DestinationRule", "prod/reviews", "$.metadata.name")
    assert "duplicate DestinationRule prod/reviews" in e.message


def _load_error_dup() -> ConfigError:
    resources = load_bytes(dump(DR_OK, DR_OK))
    with pytest.raises(ConfigError) as info:
        compile_resources(resources, version="t")
    return info.value


def test_duplicate_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(dump(service("reviews", namespace="prod"), DR_OK))
    (tmp_path / "b.yml").write_text(dump(VS_OK, DR_OK))
    (tmp_path / "notes.txt").write_text("not config")
    with pytest.raises(ConfigError) as info:
        load_path(tmp_path)
    e = info.value
    assert _where(e) == (str(tmp_path / "b.yml"), 1, "DestinationRule", "prod/reviews", "$.metadata.name")
    assert f"already defined in {tmp_path / 'a.yaml'} document 1" in e.message


def test_duplicate_host_across_service_entries():
    e = _compile_error(service("reviews", namespace="prod"), service("reviews", namespace="prod", name="again"))
    assert _where(e) == ("cfg.yaml", 1, "ServiceEntry", "prod/again", "$.spec.hosts[0]")


def test_yaml_syntax_and_duplicate_keys():
    first = dump(workload("w", "a", 1)).encode()
    with pytest.raises(ConfigError) as info:
        load_bytes(first + b"---\nkind: Gateway\nkind: Sidecar\n", "dup.yaml")
    e = info.value
    assert (e.file, e.document) == ("dup.yaml", 1)
    line = first.count(b"\n") + 3  # the second `kind:` of the second document
    assert f"invalid YAML at line {line}, column 1: found duplicate key 'kind'" in e.message


def test_static_endpoints_need_ip_addresses():
    bad = service("db", workloadSelector=None, endpoints=[{"address": "db.example.com", "ports": {"http": 5432}}])
    del bad["spec"]["workloadSelector"]
    e = _compile_error(bad)
    assert e.field_path == "$.spec.endpoints[0].address"
    bad["spec"]["endpoints"][0] = {"address": "10.0.0.1", "ports": {"tcp": 5432}}
    assert _compile_error(bad).field_path == "$.spec.endpoints[0].ports.tcp"


def test_listener_collisions():
    gw = doc("Gateway", "gw", {"servers": [{"port": {"number": 15001, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]})
    sc = doc("Sidecar", "default", {"egress": [{"port": {"number": 15001, "protocol": "HTTP"}, "hosts": ["*/*"]}]})
    e = _compile_error(gw, sc)
    assert _where(e) == ("cfg.yaml", 1, "Sidecar", "default/default", "$.spec.egress[0].port.number")
    assert "overlaps listener 0.0.0.0:15001 of Gateway default/gw" in e.message


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_path(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file or directory"
    with pytest.raises(ConfigError):
        load_path(tmp_path)


def test_workload_entries_used_by_static_service_need_ip():
    e = _compile_error(service("reviews"), doc("WorkloadEntry", "w", {"address": "host.example", "labels": {"app": "reviews"}}))
    assert _where(e) == ("cfg.yaml", 1, "WorkloadEntry", "default/w", "$.spec.address")


def test_status_written_by_kubernetes_is_tolerated():
    d = workload("w", "reviews", 9080)
    d["status"] = {"conditions": []}
    (r,) = load_bytes(dump(d))
    assert r.obj.spec.ports == {"http": 9080}


def test_virtual_service_needs_http_routes_with_destinations():
    e = _compile_error(service("a"), doc("VirtualService", "a", {"hosts": ["a"]}))
    assert (e.field_path, e.message) == ("$.spec.http", "a VirtualService needs at least one http, tls or tcp route")
    e = _compile_error(service("a"), doc("VirtualService", "a", {"hosts": ["a"], "http": [{"name": "empty"}]}))
    assert e.field_path == "$.spec.http[0].route"
    e = _compile_error(service("a"), doc("VirtualService", "a", {"http": [{"route": [{"destination": {"host": "a"}}]}]}))
    assert e.field_path == "$.spec.hosts"


def test_load_document_checks_a_parsed_mapping_like_a_file_document():
    from proxy.config.load import load_document

    good = load_document(workload("w", "a", 9000), "push:7", 3)
    assert (good.file, good.document, good.key) == ("push:7", 3, ("WorkloadEntry", "default", "w"))
    with pytest.raises(ConfigError) as info:
        load_document(doc("WorkloadEntry", "w", {"adress": "127.0.0.1"}), "push:7", 3)
    assert _where(info.value) == ("push:7", 3, "WorkloadEntry", "default/w", "$.spec.adress")
