"""Telemetry `metrics` overrides applied to the merged series when /stats/prometheus is served (pure).

Nothing happens per request: the proxy records every Istio metric with every label, and the
overrides reshape what is exposed. A disabled metric's series are left out; a removed label is
dropped and the series that then have equal labels are summed (as Prometheus' `sum without(label)`
would); a literal UPSERT sets a label's value (the same summing applies). Histogram rows keep their
`le` last, so buckets of merged series still add up bucket by bucket."""

from __future__ import annotations

from proxy.config.telemetry import MetricsPolicy
from proxy.stats import LabelPairs, metric_family

Merged = dict[tuple[str, str, LabelPairs], "int | float"]

def apply_overrides(merged: Merged, policy: MetricsPolicy | None) -> Merged:
    if policy is None:
        return merged
    rules = policy.rules
    touched = frozenset().union(*(rule.metrics for rule in rules))
    out: Merged = {}
    for (kind, name, labels), value in merged.items():
        family = metric_family(kind, name)
        if family not in touched:
            out[(kind, name, labels)] = out.get((kind, name, labels), 0) + value
            continue
        le = None
        if name.endswith("_bucket") and labels and labels[-1][0] == "le":
            le, labels = labels[-1], labels[:-1]
        reporter = next((v for k, v in labels if k == "reporter"), "")
        disabled = False
        current = dict(labels)  # keeps the recorded order; new labels go last
        for rule in rules:
            if family not in rule.metrics or reporter not in rule.reporters:
                continue
            if rule.disabled is not None:
                disabled = rule.disabled
            for label in rule.remove:
                current.pop(label, None)
            for label, text in rule.upsert:
                current[label] = text
        if disabled:
            continue
        key_labels = tuple(current.items()) + ((le,) if le is not None else ())
        key = (kind, name, key_labels)
        out[key] = out.get(key, 0) + value
    return out
