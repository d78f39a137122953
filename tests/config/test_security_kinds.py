"""PeerAuthentication and AuthorizationPolicy as loaded: every field, Istio's validation, the fields
and values refused by name, and the compiled view in the snapshot."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.load import load_bytes

FULL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: full, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/a/sa/b]
        notPrincipals: [cluster.local/ns/a/sa/c]
        namespaces: [a]
        notNamespaces: [b]
        ipBlocks: [10.0.0.0/8, 1.2.3.4]
        notIpBlocks: ["::1/128"]
        remoteIpBlocks: [192.0.2.0/24]
        notRemoteIpBlocks: [198.51.100.1]
    to:
    - operation:
        hosts: [example.com]
        notHosts: ["*.internal"]
        ports: ["8000"]
        notPorts: ["9000"]
        methods: [GET]
        notMethods: [DELETE]
        paths: ["/api/*"]
        notPaths: [/api/admin]
    when:
    - {key: "request.headers[x-user]", values: [alice], notValues: [bob]}
    - {key: source.ip, values: [10.0.0.1]}
    - {key: remote.ip, values: [10.0.0.0/8]}
    - {key: source.namespace, values: [a]}
    - {key: source.principal, values: ["*"]}
    - {key: destination.ip, values: [10.0.0.2]}
    - {key: destination.port, values: ["8000"]}
    - {key: connection.sni, values: ["*.example.com"]}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: full, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    9090: {mode: DISABLE}
"""


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bytes(textwrap.dedent(text), "security.yaml")
    return info.value


def _edit(old: str, new: str) -> str:
    assert old in FULL, old
    return FULL.replace(old, new, 1)


def test_every_field_loads_and_compiles():
    resources = load_bytes(FULL, "security.yaml")
    assert [r.kind for r in resources] == ["AuthorizationPolicy", "PeerAuthentication"]
    source = resources[0].obj.spec.rules[0].from_[0].source
    assert source.not_remote_ip_blocks == ("198.51.100.1",)
    snapshot = compile_resources(resources, version="1", proxy_labels={"app": "httpbin"}, proxy_namespace="foo")
    assert [p.name for p in snapshot.authorization.deny] == ["full"]
    assert snapshot.mtls.mode == "STRICT" and dict(snapshot.mtls.port_modes) == {8080: "PERMISSIVE", 9090: "DISABLE"}
    assert snapshot.dump["authorization"]["deny"] == ["foo/full"]
    assert snapshot.dump["peer_authentication"] == {"mode": "STRICT", "port_modes": {"8080": "PERMISSIVE",
                                                                                       "9090": "DISABLE"},
                                                    "sources": ["foo/full"]}


def test_a_workload_no_policy_selects_has_no_authorization():
    snapshot = compile_resources(load_bytes(FULL), version="1", proxy_labels={"app": "web"}, proxy_namespace="foo")
    assert snapshot.authorization is None and snapshot.authorized_listeners == frozenset()
    assert snapshot.mtls.mode == "PERMISSIVE"


@pytest.mark.parametrize(("old", "new", "path", "message"), [
    ("methods: [GET]", "method: [GET]", "$.spec.rules[0].to[0].operation.method", "unknown field `method`"),
    ("notHosts:", "notHost:", "$.spec.rules[0].to[0].operation.notHost", "unknown field `notHost`"),
    ("principals: [cluster.local/ns/a/sa/b]", "principal: [x]", "$.spec.rules[0].from[0].source.principal",
     "unknown field `principal`"),
    ("action: DENY", "action: REJECT", "$.spec.action", "Invalid enum value 'REJECT'; expected one of ALLOW, AUDIT, CUSTOM, DENY"),
    ("action: DENY", "action: CUSTOM", "$.spec.action", "action CUSTOM is not supported by triomesh yet"),
    ("action: DENY", "action: DENY\n  provider: {name: ext}", "$.spec.provider", "`provider` is an Istio"),
    ("action: DENY", "action: DENY\n  targetRef: {kind: Gateway, name: gw}", "$.spec.targetRef", "`targetRef` is an Istio"),
    ("action: DENY", "action: DENY\n  targetRefs: [{kind: Service, name: s}]", "$.spec.targetRefs", "`targetRefs` is an Istio"),
    ("principals: [cluster.local/ns/a/sa/b]", "requestPrincipals: [iss/sub]",
     "$.spec.rules[0].from[0].source.requestPrincipals", "needs RequestAuthentication (JWT)"),
    ("principals: [cluster.local/ns/a/sa/b]", "notRequestPrincipals: [\"*\"]",
     "$.spec.rules[0].from[0].source.notRequestPrincipals", "needs RequestAuthentication (JWT)"),
    ("principals: [cluster.local/ns/a/sa/b]", "serviceAccounts: [a/b]",
     "$.spec.rules[0].from[0].source.serviceAccounts", "`serviceAccounts` is an Istio"),
    ("key: source.ip,", "key: \"request.auth.claims[groups]\",", "$.spec.rules[0].when[1].key", "needs RequestAuthentication (JWT)"),
    ("key: source.ip,", "key: request.auth.principal,", "$.spec.rules[0].when[1].key", "needs RequestAuthentication (JWT)"),
    ("key: source.ip,", "key: source.ipp,", "$.spec.rules[0].when[1]", "unknown condition key 'source.ipp'"),
    ("key: source.ip,", "key: \"request.header[x]\",", "$.spec.rules[0].when[1]", "unknown condition key"),
    ("key: source.ip,", "key: \"request.headers[ ]\",", "$.spec.rules[0].when[1]", "names no header"),
    ("{key: source.ip, values: [10.0.0.1]}", "{key: source.ip}", "$.spec.rules[0].when[1]",
     "at least one of `values` or `notValues` must be set for key source.ip"),
    ("{key: source.ip, values: [10.0.0.1]}", "{key: source.ip, values: [not-an-ip]}", "$.spec.rules[0].when[1]",
     "'not-an-ip' is not an IP address or CIDR block"),
    ("{key: destination.port, values: [\"8000\"]}", "{key: destination.port, values: [\"http\"]}",
     "$.spec.rules[0].when[6]", "'http' is not a port number"),
    ("ipBlocks: [10.0.0.0/8, 1.2.3.4]", "ipBlocks: [10.0.0.0/40]", "$.spec.rules[0].from[0].source",
     "ipBlocks: '10.0.0.0/40' is not an IP address or CIDR block"),
    ("remoteIpBlocks: [192.0.2.0/24]", "remoteIpBlocks: [\"\"]", "$.spec.rules[0].from[0].source",
     "remoteIpBlocks"),
    ("namespaces: [a]", "namespaces: [\"\"]", "$.spec.rules[0].from[0].source", "empty value is found in namespaces"),
    ("ports: [\"8000\"]", "ports: [\"70000\"]", "$.spec.rules[0].to[0].operation", "'70000' is not a port number"),
    ("methods: [GET]", "methods: [\"\"]", "$.spec.rules[0].to[0].operation", "empty value is found in methods"),
    ("selector: {matchLabels: {app: httpbin}}\n  action", "selector: {matchLabels: {app: \"http*\"}}\n  action",
     "$.spec.selector", "wildcard is not supported in selector"),
    ("selector: {matchLabels: {app: httpbin}}\n  action", "selector: {labels: {app: x}}\n  action",
     "$.spec.selector.labels", "unknown field `labels`"),
    ("mtls: {mode: STRICT}", "mtls: {mode: ENABLED}", "$.spec.mtls.mode",
     "Invalid enum value 'ENABLED'; expected one of DISABLE, PERMISSIVE, STRICT, UNSET"),
    ("8080: {mode: PERMISSIVE}", "0: {mode: PERMISSIVE}", "$.spec", "portLevelMtls port 0 is not a port number"),
    ("8080: {mode: PERMISSIVE}", "\"70000\": {mode: PERMISSIVE}", "$.spec",
     "portLevelMtls port 70000 is not a port number in [1, 65535]"),
    ("8080: {mode: PERMISSIVE}", "http: {mode: PERMISSIVE}", "$.spec",
     "portLevelMtls port 'http' is not a port number in [1, 65535]"),
    ("8080: {mode: PERMISSIVE}", "\"+8080\": {mode: PERMISSIVE}", "$.spec", "portLevelMtls port '+8080' is not a port"),
    ("8080: {mode: PERMISSIVE}", "\"8080\": {mode: PERMISSIVE}\n    8080: {mode: STRICT}", "$.spec",
     "portLevelMtls port 8080 is given twice"),
    ("ports: [\"8000\"]", "ports: [\"\uff18\uff10\"]", "$.spec.rules[0].to[0].operation", "is not a port number"),
    ('paths: ["/api/*"]', 'paths: ["/api/{**}/{*}"]', "$.spec.rules[0].to[0].operation",
     "paths: '/api/{**}/{*}' is not a valid path template: {**} must be the last operator"),
    ('paths: ["/api/*"]', 'paths: ["/api/{**}/{**}"]', "$.spec.rules[0].to[0].operation",
     "{**} must be the last operator"),
    ('paths: ["/api/*"]', 'paths: ["/api/v{*}"]', "$.spec.rules[0].to[0].operation",
     "paths: '/api/v{*}' is not a valid path template: '{' and '}' may only make a whole segment {*} or {**}"),
    ('paths: ["/api/*"]', 'paths: ["/api/{name}"]', "$.spec.rules[0].to[0].operation",
     "'{' and '}' may only make a whole segment {*} or {**}"),
    ('paths: ["/api/*"]', 'paths: ["/api/{*"]', "$.spec.rules[0].to[0].operation",
     "'{' and '}' may only make a whole segment {*} or {**}"),
    ('paths: ["/api/*"]', 'paths: ["/api/*/{*}"]', "$.spec.rules[0].to[0].operation",
     "paths: '/api/*/{*}' is not a valid path template: segment '*' has a character other than"),
    ('paths: ["/api/*"]', 'paths: ["/api//{*}"]', "$.spec.rules[0].to[0].operation",
     "paths: '/api//{*}' is not a valid path template: it has an empty segment"),
    ("notPaths: [/api/admin]", 'notPaths: ["api/{*}"]', "$.spec.rules[0].to[0].operation",
     "notPaths: 'api/{*}' is not a valid path template: it must start with '/'"),
    ("  selector: {matchLabels: {app: httpbin}}\n  mtls", "  mtls", "$.spec",
     "mesh/namespace peer authentication cannot have port level mTLS"),
])
def test_errors_name_the_field(old, new, path, message):
    e = _error(_edit(old, new))
    assert e.field_path == path, str(e)
    assert message in e.message, str(e)
    assert e.file == "security.yaml"


def test_path_templates_load():
    text = _edit('paths: ["/api/*"]', 'paths: ["/api/{*}/items/", "/{**}", "/v1/{*}/{**}/x:y@z"]')
    operation = load_bytes(text)[0].obj.spec.rules[0].to[0].operation
    assert operation.paths == ("/api/{*}/items/", "/{**}", "/v1/{*}/{**}/x:y@z")


def test_port_level_mtls_takes_port_numbers_written_as_strings():
    # `kubectl get -o yaml` and JSON write map keys as strings
    text = _edit("8080: {mode: PERMISSIVE}\n    9090: {mode: DISABLE}",
                 "\"8080\": {mode: PERMISSIVE}\n    \"09090\": {mode: DISABLE}")
    spec = load_bytes(text)[1].obj.spec
    assert spec.port_level_mtls == load_bytes(FULL)[1].obj.spec.port_level_mtls
    assert list(spec.port_level_mtls) == [8080, 9090]
    as_json = load_bytes('{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", '
                         '"metadata": {"name": "p", "namespace": "foo"}, "spec": {"selector": {"matchLabels": '
                         '{"app": "a"}}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}}', "pa.json")
    assert as_json[0].obj.spec.port_level_mtls == {8080: as_json[0].obj.spec.port_level_mtls[8080]}
    snapshot = compile_resources(load_bytes(text), version="1", proxy_labels={"app": "httpbin"}, proxy_namespace="foo")
    assert dict(snapshot.mtls.port_modes) == {8080: "PERMISSIVE", 9090: "DISABLE"}


@pytest.mark.parametrize(("rule", "message"), [
    ("{from: []}", "`from` must not be empty"),
    ("{to: []}", "`to` must not be empty"),
    ("{when: []}", "`when` must not be empty"),
    ("{from: [{}]}", "`from.source` must be set"),
    ("{from: [{source: {}}]}", "`source` must not be empty"),
    ("{to: [{}]}", "`to.operation` must be set"),
    ("{to: [{operation: {}}]}", "`operation` must not be empty"),
])
def test_empty_rule_parts_are_errors(rule, message):
    text = f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: foo}}
        spec:
          rules: [{rule}]
        """
    e = _error(text)
    assert e.field_path.startswith("$.spec.rules[0]") and message in e.message, str(e)


def test_deny_without_rules_is_an_error():
    e = _error("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec: {action: DENY}
        """)
    assert (e.kind, e.name, e.field_path) == ("AuthorizationPolicy", "foo/p", "$.spec")
    assert "DENY action without `rules` is meaningless" in e.message


def test_security_kinds_take_security_api_versions():
    e = _error("""
        apiVersion: networking.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: p, namespace: foo}
        spec: {}
        """)
    assert e.field_path == "$.apiVersion"
    assert "security.istio.io/v1, security.istio.io/v1beta1" in e.message


def test_request_authentication_is_refused_as_not_supported_yet():
    e = _error("""
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: foo}
        spec: {}
        """)
    assert e.message == "RequestAuthentication (security.istio.io/v1) is an Istio kind triomesh does not support yet"


def test_empty_rule_and_empty_spec_are_valid():
    resources = load_bytes("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec: {action: DENY, rules: [{}]}
""")
    assert [r.obj.spec.action for r in resources] == ["ALLOW", "DENY"]
