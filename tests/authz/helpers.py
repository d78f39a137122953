"""Policies from YAML text, compiled as a proxy would compile them, and request attributes to ask about."""

from __future__ import annotations

import textwrap

from proxy.authz.compile import compile_authorization
from proxy.authz.evaluate import Attributes, Verdict, evaluate, parse_ip
from proxy.authz.paths import normalize_path
from proxy.config.load import load_bytes

SLEEP = "cluster.local/ns/default/sa/sleep"


def policies(yaml_text: str, *, namespace: str | None = "foo", labels: dict | None = None):
    resources = load_bytes(textwrap.dedent(yaml_text), "policies.yaml")
    return compile_authorization([r for r in resources if r.kind == "AuthorizationPolicy"], "istio-system",
                                 namespace, labels if labels is not None else {"app": "httpbin"})


def policy(spec_yaml: str, name: str = "p", namespace: str = "foo") -> str:
    """One AuthorizationPolicy document around an indented `spec` body."""
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, "
            f"namespace: {namespace}}}\nspec:\n" + textwrap.indent(textwrap.dedent(spec_yaml), "  ") + "\n---\n")


def http(method: str = "GET", path: str = "/", host: str = "httpbin.foo", principal: str | None = None,
         source: str = "10.1.2.3", remote: str | None = None, port: int = 8000, headers: dict | None = None,
         destination: str = "10.9.9.9", sni: str | None = None) -> Attributes:
    return Attributes(source_ip=parse_ip(source), remote_ip=parse_ip(remote or source), principal=principal,
                      destination_ip=parse_ip(destination), destination_port=port, sni=sni, http=True, method=method,
                      host=host, path=normalize_path(path.encode()), headers=headers or {})


def tcp(principal: str | None = None, source: str = "10.1.2.3", port: int = 9000, destination: str = "10.9.9.9",
        sni: str | None = None) -> Attributes:
    return Attributes(source_ip=parse_ip(source), remote_ip=parse_ip(source), principal=principal,
                      destination_ip=parse_ip(destination), destination_port=port, sni=sni)


def decide(compiled, attributes: Attributes) -> Verdict:
    assert compiled is not None, "no policy applies"
    return evaluate(compiled, attributes)
