"""The counters of authorization, Envoy's RBAC filter stats in triomesh's naming, per listener.

Envoy's rbac.allowed and rbac.denied count the requests (or connections) the policies let through
or refused; AUDIT policies are Envoy's LOG action, whose matches Envoy counts as rbac.logged. Envoy's
shadow_allowed/shadow_denied count Istio's dry-run policies (the `istio.io/dry-run` annotation),
which triomesh does not have.
"""

from __future__ import annotations

from proxy.stats import HELP, Stats

HELP.setdefault("triomesh_rbac_allowed_total",
                "Requests and connections AuthorizationPolicies allowed, by listener (Envoy's rbac.allowed).")
HELP.setdefault("triomesh_rbac_denied_total",
                "Requests (403) and connections (closed) AuthorizationPolicies denied, by listener (Envoy's rbac.denied).")
HELP.setdefault("triomesh_rbac_logged_total",
                "Requests and connections an AUDIT AuthorizationPolicy matched, by listener (Envoy's rbac.logged).")


class RbacCounters:
    __slots__ = ("allowed", "denied", "logged")

    def __init__(self, stats: Stats, listener: str) -> None:
        self.allowed = stats.counter("triomesh_rbac_allowed_total", listener=listener)
        self.denied = stats.counter("triomesh_rbac_denied_total", listener=listener)
        self.logged = stats.counter("triomesh_rbac_logged_total", listener=listener)

    def count(self, allowed: bool, audited: bool) -> None:
        if allowed:
            self.allowed.value += 1
        else:
            self.denied.value += 1
        if audited:
            self.logged.value += 1
