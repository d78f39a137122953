"""Host-name rules as Istio applies them: short names, wildcards, `namespace/host` scoping, exportTo."""

from __future__ import annotations

DOMAIN_SUFFIX = "svc.cluster.local"


def fqdn(host: str, namespace: str) -> str:
    """Istio's short-name rule: a host without dots is a service in the resource's namespace."""
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}.{DOMAIN_SUFFIX}"


def is_wildcard(host: str) -> bool:
    return host.startswith("*")


def matches(pattern: str, host: str) -> bool:
    """Does `pattern` ("*", "*.example.com" or a plain name) cover `host` (which may be a wildcard)?"""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        suffix = pattern[1:]  # ".example.com"
        if host.startswith("*"):
            return host[1:].endswith(suffix)
        return host.endswith(suffix)
    return pattern == host


def intersect(a: str, b: str) -> str | None:
    """The more specific of two host patterns when one covers the other (Istio's gateway/VS rule)."""
    if matches(a, b):
        return b
    if matches(b, a):
        return a
    return None


def aliases(host: str, namespace: str, local_namespace: str | None) -> list[str]:
    """Names a client may use for `host` (declared in `namespace`), most specific first: the host, and
    for a Kubernetes-style name the forms "name.ns.svc", "name.ns" and, inside its own namespace,
    "name". `local_namespace` is the client's namespace (None for gateways)."""
    if is_wildcard(host):
        return [host]
    full = fqdn(host, namespace)
    out = [host] if host == full else [host, full]
    tail = "." + DOMAIN_SUFFIX
    if full.endswith(tail):
        name_ns = full[: -len(tail)]  # "name.ns"
        if name_ns.count(".") == 1:
            name, ns = name_ns.split(".")
            out += [f"{name_ns}.svc", name_ns]
            if ns == local_namespace:
                out.append(name)
    seen: set[str] = set()
    return [h for h in out if not (h in seen or seen.add(h))]


def split_scoped(value: str, default_namespace: str) -> tuple[str, str]:
    """"ns/host" -> (ns, host); "./host" -> own namespace; a bare host is "*/host" (Gateway servers)."""
    ns, sep, host = value.partition("/")
    if not sep:
        return "*", value
    if ns == ".":
        ns = default_namespace
    return ns, host


def exported_to(export_to: tuple[str, ...], owner_namespace: str, client_namespace: str) -> bool:
    """Istio exportTo: empty or "*" = everywhere, "." = own namespace, else listed namespaces."""
    if not export_to:
        return True
    for e in export_to:
        if e == "*" or e == client_namespace or (e == "." and owner_namespace == client_namespace):
            return True
    return False
