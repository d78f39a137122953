"""The evaluator: every rule field and its `not` form, Istio's evaluation order, TCP semantics, and the
Istio documentation's own examples (authorization-policy reference and tasks) as cases."""

from __future__ import annotations

import pytest

from proxy.authz.evaluate import namespace_of, parse_ip, remote_address
from tests.authz.helpers import SLEEP, decide, http, policies, policy, tcp

# ---- the Istio reference's examples ------------------------------------------------------------------

ALLOW_READ = policy("""
    selector: {matchLabels: {app: httpbin, version: v1}}
    action: ALLOW
    rules:
    - from:
      - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
      - source: {namespaces: ["test"]}
      to:
      - operation: {methods: ["GET"], paths: ["/info*"]}
      - operation: {methods: ["POST"], paths: ["/data"]}
    """, name="httpbin")


def test_reference_allow_example_allows_the_listed_sources_and_operations():
    p = policies(ALLOW_READ, labels={"app": "httpbin", "version": "v1"})
    assert decide(p, http("GET", "/info/x", principal=SLEEP)).allowed
    assert decide(p, http("POST", "/data", principal="cluster.local/ns/test/sa/any")).allowed
    verdict = decide(p, http("GET", "/info", principal="cluster.local/ns/dev/sa/sleep"))
    assert (verdict.allowed, verdict.policy) == (False, "none")
    assert verdict.details == "rbac_access_denied_matched_policy[none]"
    assert not decide(p, http("POST", "/info", principal=SLEEP)).allowed
    assert not decide(p, http("GET", "/info", principal=None)).allowed  # plaintext: no principal


def test_reference_allow_example_does_not_apply_to_other_workloads():
    assert policies(ALLOW_READ, labels={"app": "httpbin", "version": "v2"}) is None
    assert policies(ALLOW_READ, namespace="bar", labels={"app": "httpbin", "version": "v1"}) is None


def test_reference_deny_example_names_the_matched_rule():
    p = policies(policy("""
        action: DENY
        rules:
        - from:
          - source: {notNamespaces: ["foo"]}
          to:
          - operation: {methods: ["POST"]}
        """, name="httpbin-deny"))
    verdict = decide(p, http("POST", principal="cluster.local/ns/dev/sa/x"))
    assert (verdict.allowed, verdict.policy) == (False, "ns[foo]-policy[httpbin-deny]-rule[0]")
    assert verdict.details == "rbac_access_denied_matched_policy[ns[foo]-policy[httpbin-deny]-rule[0]]"
    assert decide(p, http("POST", principal="cluster.local/ns/foo/sa/x")).allowed
    assert decide(p, http("GET", principal="cluster.local/ns/dev/sa/x")).allowed


def test_allow_nothing_denies_everything():
    p = policies("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, "
                 "namespace: foo}\nspec: {}\n")
    assert decide(p, http()).policy == "none"
    assert not decide(p, tcp()).allowed


def test_deny_all_and_allow_all_with_an_empty_rule():
    deny_all = policies(policy("action: DENY\nrules: [{}]", name="deny-all"))
    assert decide(deny_all, http()).policy == "ns[foo]-policy[deny-all]-rule[0]"
    allow_all = policies(policy("action: ALLOW\nrules: [{}]", name="allow-all"))
    assert decide(allow_all, http()).allowed and decide(allow_all, tcp()).allowed


def test_ingress_gateway_ip_allow_list_on_remote_ip_blocks():
    # the ingress task: an allow list of client addresses at the gateway (root namespace, selector)
    p = policies(policy("""
        selector: {matchLabels: {app: istio-ingressgateway}}
        action: ALLOW
        rules:
        - from:
          - source: {remoteIpBlocks: ["1.2.3.4", "5.6.7.0/24"]}
        """, name="ingress-policy", namespace="istio-system"), namespace=None,
        labels={"app": "istio-ingressgateway"})
    assert decide(p, http(remote="5.6.7.9")).allowed
    assert decide(p, http(remote="1.2.3.4")).allowed
    assert not decide(p, http(remote="1.2.3.5")).allowed


def test_header_condition_example():
    p = policies(policy("""
        action: ALLOW
        rules:
        - to:
          - operation: {hosts: ["bookinfo.com"]}
          when:
          - key: request.headers[version]
            values: ["v1", "v2"]
        """))
    assert decide(p, http(host="bookinfo.com", headers={"version": "v2"})).allowed
    assert not decide(p, http(host="bookinfo.com", headers={"version": "v3"})).allowed
    assert not decide(p, http(host="bookinfo.com")).allowed


# ---- evaluation order --------------------------------------------------------------------------------

ORDER = (policy("action: DENY\nrules: [{to: [{operation: {paths: [/admin*]}}]}]", name="deny-admin")
         + policy("action: ALLOW\nrules: [{to: [{operation: {methods: [GET]}}]}]", name="allow-get")
         + policy("action: AUDIT\nrules: [{to: [{operation: {paths: [/audit*]}}]}]", name="audit"))


def test_deny_is_decided_before_allow():
    p = policies(ORDER)
    assert decide(p, http("GET", "/admin")).policy == "ns[foo]-policy[deny-admin]-rule[0]"
    assert decide(p, http("GET", "/")).policy == "ns[foo]-policy[allow-get]-rule[0]"
    assert decide(p, http("POST", "/")).policy == "none"


def test_audit_only_marks():
    p = policies(ORDER)
    verdict = decide(p, http("GET", "/audit/1"))
    assert verdict.allowed and verdict.audit == "ns[foo]-policy[audit]-rule[0]"
    verdict = decide(p, http("POST", "/audit/1"))
    assert not verdict.allowed and verdict.audit
    only_audit = policies(policy("action: AUDIT\nrules: [{}]", name="audit-all"))
    assert decide(only_audit, http()).allowed


def test_no_allow_policy_means_allowed():
    p = policies(policy("action: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]"))
    verdict = decide(p, http("GET"))
    assert verdict.allowed and verdict.policy == ""


def test_root_namespace_policy_applies_mesh_wide_and_its_selector_too():
    text = (policy("action: DENY\nrules: [{to: [{operation: {paths: [/mesh]}}]}]", name="mesh", namespace="istio-system")
            + policy("selector: {matchLabels: {app: other}}\naction: DENY\nrules: [{}]", name="other",
                     namespace="istio-system"))
    p = policies(text, namespace="anything", labels={"app": "httpbin"})
    assert [x.name for x in p.deny] == ["mesh"]
    assert not decide(p, http(path="/mesh")).allowed
    assert policies(policy("action: DENY\nrules: [{}]", namespace="bar"), namespace="foo") is None


# ---- every field, and its not form ------------------------------------------------------------------

def _deny(rule_yaml: str):
    return policies(policy(f"action: DENY\nrules:\n- {rule_yaml}"))


@pytest.mark.parametrize(("rule", "denied", "allowed"), [
    ("{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}", http(principal=SLEEP),
     http(principal="cluster.local/ns/default/sa/other")),
    ("{from: [{source: {principals: [spiffe://cluster.local/ns/default/sa/sleep]}}]}", http(principal=SLEEP),
     http(principal=None)),
    ("{from: [{source: {principals: [\"*\"]}}]}", http(principal=SLEEP), http(principal=None)),
    ("{from: [{source: {principals: [\"cluster.local/ns/default/*\"]}}]}", http(principal=SLEEP),
     http(principal="cluster.local/ns/dev/sa/sleep")),
    ("{from: [{source: {principals: [\"*/sa/sleep\"]}}]}", http(principal=SLEEP),
     http(principal="cluster.local/ns/default/sa/web")),
    ("{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]}",
     http(principal="cluster.local/ns/default/sa/web"), http(principal=SLEEP)),
    ("{from: [{source: {namespaces: [default]}}]}", http(principal=SLEEP),
     http(principal="cluster.local/ns/defaultx/sa/sleep")),
    ("{from: [{source: {namespaces: [\"dev-*\"]}}]}", http(principal="td/ns/dev-1/sa/a"), http(principal="td/ns/prod/sa/a")),
    ("{from: [{source: {notNamespaces: [default]}}]}", http(principal="td/ns/dev/sa/a"), http(principal=SLEEP)),
    ("{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}", http(source="10.1.2.3"), http(source="10.2.0.1")),
    ("{from: [{source: {ipBlocks: [\"::1\"]}}]}", http(source="::1"), http(source="127.0.0.1")),
    ("{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}", http(source="10.2.0.1"), http(source="10.1.2.3")),
    ("{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}", http(remote="192.0.2.7"), http(remote="198.51.100.1")),
    ("{from: [{source: {notRemoteIpBlocks: [192.0.2.0/24]}}]}", http(remote="198.51.100.1"), http(remote="192.0.2.7")),
    ("{to: [{operation: {hosts: [Example.COM]}}]}", http(host="example.com"), http(host="example.com:80")),
    ("{to: [{operation: {hosts: [\"*.example.com\"]}}]}", http(host="API.example.com"), http(host="example.com")),
    ("{to: [{operation: {hosts: [\"example.com:*\"]}}]}", http(host="example.com:8080"), http(host="example.com")),
    ("{to: [{operation: {notHosts: [example.com]}}]}", http(host="other.com"), http(host="EXAMPLE.com")),
    ("{to: [{operation: {ports: [\"8000\"]}}]}", http(port=8000), http(port=8001)),
    ("{to: [{operation: {notPorts: [\"8000\"]}}]}", http(port=8001), http(port=8000)),
    ("{to: [{operation: {methods: [POST, PUT]}}]}", http("PUT"), http("GET")),
    ("{to: [{operation: {notMethods: [GET]}}]}", http("DELETE"), http("GET")),
    ("{to: [{operation: {paths: [/admin]}}]}", http(path="/admin?x=1"), http(path="/admin/")),
    ("{to: [{operation: {paths: [\"/admin/*\"]}}]}", http(path="/public/../admin/x"), http(path="/public/x")),
    ("{to: [{operation: {paths: [\"*.js\"]}}]}", http(path="/a/b.js"), http(path="/a/b.jsx")),
    ("{to: [{operation: {paths: [\"*\"]}}]}", http(path="/"), None),
    ("{to: [{operation: {notPaths: [\"/healthz\"]}}]}", http(path="/x"), http(path="/healthz")),
    ("{when: [{key: source.ip, values: [10.0.0.0/8]}]}", http(source="10.3.3.3"), http(source="11.0.0.1")),
    ("{when: [{key: source.ip, notValues: [10.0.0.0/8]}]}", http(source="11.0.0.1"), http(source="10.3.3.3")),
    ("{when: [{key: remote.ip, values: [192.0.2.1]}]}", http(remote="192.0.2.1"), http(remote="192.0.2.2")),
    ("{when: [{key: source.namespace, values: [default]}]}", http(principal=SLEEP), http(principal=None)),
    ("{when: [{key: source.principal, values: [cluster.local/ns/default/sa/sleep]}]}", http(principal=SLEEP),
     http(principal="cluster.local/ns/default/sa/web")),
    ("{when: [{key: destination.ip, values: [10.9.0.0/16]}]}", http(destination="10.9.1.1"), http(destination="10.8.1.1")),
    ("{when: [{key: destination.port, values: [\"8000\"]}]}", http(port=8000), http(port=9000)),
    ("{when: [{key: connection.sni, values: [\"*.example.com\"]}]}", http(sni="a.example.com"), http(sni=None)),
    # a DNS name: the SNI a client writes in capitals or with a trailing dot reaches the same server
    ("{when: [{key: connection.sni, values: [new.example.com]}]}", http(sni="NEW.Example.com."),
     http(sni="new.example.org")),
    ("{when: [{key: connection.sni, values: [New.Example.COM.]}]}", http(sni="new.example.com"), None),
    # a lone dot is still a name sent; "*." still asks for a trailing dot, not for any name
    ("{when: [{key: connection.sni, values: [\"*\"]}]}", http(sni="."), http(sni=None)),
    ("{when: [{key: connection.sni, values: [\"*.\"]}]}", http(sni="."), http(sni="a.example.com")),
    ("{when: [{key: \"request.headers[X-Token]\", values: [secret]}]}", http(headers={"x-token": "secret"}),
     http(headers={"x-token": "public"})),
    ("{when: [{key: \"request.headers[x-token]\", notValues: [\"*\"]}]}", http(), http(headers={"x-token": "a"})),
])
def test_each_field(rule, denied, allowed):
    p = _deny(rule)
    assert not decide(p, denied).allowed
    if allowed is not None:
        assert decide(p, allowed).allowed


def test_a_rule_needs_every_part_and_any_entry_of_a_list():
    p = _deny("{from: [{source: {ipBlocks: [10.0.0.0/8]}}, {source: {principals: [\"*\"]}}], "
              "to: [{operation: {methods: [GET]}}], when: [{key: destination.port, values: [\"80\"]}]}")
    assert not decide(p, http("GET", port=80, source="10.0.0.1")).allowed
    assert not decide(p, http("GET", port=80, source="11.0.0.1", principal=SLEEP)).allowed
    assert decide(p, http("GET", port=80, source="11.0.0.1")).allowed
    assert decide(p, http("POST", port=80, source="10.0.0.1")).allowed
    assert decide(p, http("GET", port=81, source="10.0.0.1")).allowed


def test_within_a_source_every_field_must_hold():
    p = _deny("{from: [{source: {namespaces: [default], ipBlocks: [10.0.0.0/8]}}]}")
    assert not decide(p, http(principal=SLEEP, source="10.0.0.1")).allowed
    assert decide(p, http(principal=SLEEP, source="11.0.0.1")).allowed
    assert decide(p, http(principal=None, source="10.0.0.1")).allowed


def test_plaintext_peer_matches_no_principal_or_namespace_but_their_not_forms():
    assert decide(_deny("{from: [{source: {namespaces: [\"*\"]}}]}"), http(principal=None)).allowed
    assert not decide(_deny("{from: [{source: {notPrincipals: [\"x/ns/y/sa/z\"]}}]}"), http(principal=None)).allowed



# ---- path templates: a path with `{*}` or `{**}` is an Envoy URI template (Istio 1.22+) -------------

@pytest.mark.parametrize(("template", "denied", "allowed"), [
    # {**}: zero or more characters to the end, `/` included; the `/` before it stays literal
    ("/admin/{**}", ["/admin/users", "/admin/", "/admin/a/b.json"], ["/admin", "/administrator", "/x/admin/a"]),
    ("/{**}", ["/", "/a/b"], []),
    # a literal after {**} is allowed (only operators may not follow it)
    ("/{**}/healthz", ["/a/b/healthz", "//healthz"], ["/healthz", "/a/healthz/x"]),
    # {*}: exactly one segment, at least one character
    ("/api/{*}/info", ["/api/v1/info"], ["/api//info", "/api/v1/v2/info", "/api/v1/info/x", "/api/info"]),
    ("/api/{*}", ["/api/x", "/api/a%2Fb"], ["/api/", "/api/x/", "/api"]),
    ("/api/{*}/", ["/api/v1/"], ["/api/v1"]),
    ("/{*}/{*}/{**}", ["/a/b/", "/a/b/c/d"], ["/a/b", "/a//c"]),
    # matched after normalization, case-sensitive, like any path
    ("/admin/{**}", ["/public/../admin/x", "/%61dmin/x"], ["/Admin/x"]),
    # only RFC 3986 path characters (pchar) match an operator, as in Envoy: `*` or `|` is none
    ("/files/{*}", ["/files/a-b_c.~!$&'()+,;=:@%20"], ["/files/a*b", "/files/a|b"]),
])
def test_path_templates_match_as_envoy_uri_templates(template, denied, allowed):
    p = _deny(f'{{to: [{{operation: {{paths: ["{template}"]}}}}]}}')
    for path in denied:
        assert not decide(p, http(path=path)).allowed, path
    for path in allowed:
        assert decide(p, http(path=path)).allowed, path


def test_path_templates_in_not_paths_and_beside_plain_paths():
    p = _deny('{to: [{operation: {notPaths: ["/public/{**}", "/healthz"]}}]}')
    assert not decide(p, http(path="/private")).allowed
    assert not decide(p, http(path="/public")).allowed
    assert decide(p, http(path="/public/index.html")).allowed
    assert decide(p, http(path="/healthz")).allowed
    allow = policies(policy('action: ALLOW\nrules: [{to: [{operation: {paths: ["/v1/{*}/items", "/static/*"]}}]}]'))
    assert decide(allow, http(path="/v1/shop/items")).allowed
    assert decide(allow, http(path="/static/{*}/x")).allowed  # no template: `*` and braces stay what they were
    assert not decide(allow, http(path="/v1/shop/items/1")).allowed


def test_a_path_template_is_http_only_like_any_path():
    p = _deny('{to: [{operation: {paths: ["/admin/{**}"], ports: ["9000"]}}]}')
    assert not decide(p, tcp(port=9000)).allowed
    allow = policies(policy('action: ALLOW\nrules: [{to: [{operation: {paths: ["/{**}"]}}]}]'))
    assert not decide(allow, tcp()).allowed


# ---- `*` in conditions: presence for headers, non-empty elsewhere ------------------------------------

def test_header_star_is_presence_so_an_empty_value_matches():
    # Istio makes request.headers[...] `*` Envoy's present_match: the header is there, empty or not
    p = _deny('{when: [{key: "request.headers[x-token]", values: ["*"]}]}')
    assert not decide(p, http(headers={"x-token": ""})).allowed
    assert not decide(p, http(headers={"x-token": "a"})).allowed
    assert decide(p, http()).allowed
    absent = _deny('{when: [{key: "request.headers[X-Token]", notValues: ["*"]}]}')
    assert not decide(absent, http()).allowed
    assert decide(absent, http(headers={"x-token": ""})).allowed


def test_header_prefix_and_suffix_still_need_their_text():
    p = _deny('{when: [{key: "request.headers[x-user]", values: ["adm*", "*-ops"]}]}')
    assert not decide(p, http(headers={"x-user": "admin"})).allowed
    assert not decide(p, http(headers={"x-user": "team-ops"})).allowed
    assert decide(p, http(headers={"x-user": ""})).allowed


@pytest.mark.parametrize("key", ["connection.sni", "source.principal", "source.namespace"])
def test_star_outside_headers_still_needs_a_non_empty_value(key):
    # Istio's `*` there is the regex `.+`: an empty SNI, or no peer identity, does not match
    p = _deny(f'{{when: [{{key: {key}, values: ["*"]}}]}}')
    assert decide(p, http(sni="", principal=None)).allowed
    assert not decide(p, http(sni="a.example.com", principal=SLEEP)).allowed

# ---- TCP ---------------------------------------------------------------------------------------------

def test_tcp_allow_rule_with_http_fields_never_matches():
    p = policies(policy("action: ALLOW\nrules:\n- to: [{operation: {methods: [GET], ports: [\"9000\"]}}]"))
    assert decide(p, http("GET", port=9000)).allowed
    assert not decide(p, tcp(port=9000)).allowed


def test_tcp_deny_rule_ignores_http_fields():
    # the TCP task: a DENY on methods and a port denies every connection to that port
    p = policies(policy("action: DENY\nrules:\n- to: [{operation: {methods: [GET], ports: [\"9000\"]}}]"))
    assert not decide(p, tcp(port=9000)).allowed
    assert decide(p, tcp(port=9001)).allowed
    assert decide(p, http("POST", port=9000)).allowed
    headers = policies(policy("action: DENY\nrules:\n- when: [{key: \"request.headers[a]\", values: [b]}]"))
    assert not decide(headers, tcp()).allowed


def test_tcp_source_and_port_rules():
    p = policies(policy("action: ALLOW\nrules:\n- from: [{source: {ipBlocks: [10.0.0.0/8]}}]\n"
                        "  to: [{operation: {ports: [\"9000\"]}}]"))
    assert decide(p, tcp(source="10.0.0.2", port=9000)).allowed
    assert not decide(p, tcp(source="10.0.0.2", port=9001)).allowed
    assert not decide(p, tcp(source="11.0.0.2", port=9000)).allowed


# ---- helpers -----------------------------------------------------------------------------------------

def test_namespace_of_a_principal():
    assert namespace_of(SLEEP) == "default"
    assert namespace_of("td/ns/a/b/sa/c") == "a/b"
    assert namespace_of("no-namespace") is None
    assert namespace_of(None) is None


def test_remote_address_with_trusted_proxies():
    direct = parse_ip("10.0.0.1")
    assert remote_address(direct, "1.1.1.1, 2.2.2.2", 0) == direct
    assert remote_address(direct, "1.1.1.1, 2.2.2.2", 1) == parse_ip("2.2.2.2")
    assert remote_address(direct, "1.1.1.1, 2.2.2.2", 2) == parse_ip("1.1.1.1")
    assert remote_address(direct, "1.1.1.1", 2) == direct
    assert remote_address(direct, "garbage", 1) == direct


# ---- the mesh demo's access-control examples (examples/security), with identities --------------------

def _example(name: str, labels: dict):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "security" / name).read_text()
    return policies(text, namespace="tutorial", labels=labels)


def test_demo_deny_list_refuses_customer_at_preference():
    p = _example("deny-customer.yaml", {"app": "preference", "version": "v1"})
    verdict = decide(p, http(principal="cluster.local/ns/tutorial/sa/customer"))
    assert verdict.details == ("rbac_access_denied_matched_policy[ns[tutorial]-policy[preference-deny-customer]"
                               "-rule[0]]")
    assert decide(p, http(principal="cluster.local/ns/tutorial/sa/recommendation")).allowed
    assert _example("deny-customer.yaml", {"app": "recommendation"}) is None


def test_demo_allow_list_admits_only_the_tutorial_path():
    preference = _example("allow-chain.yaml", {"app": "preference", "version": "v1"})
    assert decide(preference, http(principal="cluster.local/ns/tutorial/sa/customer")).allowed
    assert decide(preference, http(principal="cluster.local/ns/tutorial/sa/recommendation")).policy == "none"
    assert decide(preference, http(principal=None)).policy == "none"
    recommendation = _example("allow-chain.yaml", {"app": "recommendation", "version": "v2"})
    assert decide(recommendation, http(principal="cluster.local/ns/tutorial/sa/preference")).allowed
    assert decide(recommendation, http(principal="cluster.local/ns/tutorial/sa/customer")).policy == "none"
    assert _example("allow-chain.yaml", {"app": "customer"}) is None
