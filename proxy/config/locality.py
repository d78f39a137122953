"""Locality load balancing as Istio compiles it for one proxy: the proxy's own locality, and a
cluster's endpoints grouped by locality with the priority (failover) or weight (distribute)
DestinationRule `loadBalancer.localityLbSetting` gives them.

Istio's rules (pilot's loadbalancer package), for a proxy in locality R/Z/S:
- locality load balancing is on unless `enabled: false` (the mesh default enables it);
- `distribute`: the first entry whose `from` matches R/Z/S weights the localities its `to` matches
  (a locality's weight is shared among the localities one pattern matches, in proportion to their
  endpoint weights, rounded up); localities no `to` matches get no traffic;
- otherwise failover, applied only when the cluster has outlierDetection (without it nothing ever
  moves traffic away from a priority): priority 0 = same region/zone/subzone, 1 = same zone,
  2 = same region, 3 = elsewhere, 4 = elsewhere but not the `failover.to` region of a `failover`
  entry whose `from` is R; priorities are then renumbered densely from 0.
Localities are "region/zone/subzone"; a pattern's `*` or missing segment matches any value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

from proxy.config.istio import LocalityLoadBalancerSetting
from proxy.config.snapshot import Endpoint, LocalityGroup, LocalityLb

# proxy labels that give its locality: Istio's pod label (dots or slashes between segments), else
# the Kubernetes topology labels
LOCALITY_LABEL = "istio-locality"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"


def proxy_locality(labels: Mapping[str, str] | None) -> str:
    """The proxy's "region/zone/subzone" from its labels ("" when they say nothing)."""
    if not labels:
        return ""
    value = labels.get(LOCALITY_LABEL, "")
    if value:
        return value if "/" in value else value.replace(".", "/")
    parts = [labels.get(REGION_LABEL, ""), labels.get(ZONE_LABEL, ""), labels.get(SUBZONE_LABEL, "")]
    return "/".join(parts).rstrip("/")


def _split(locality: str) -> tuple[str, str, str]:
    region, zone, subzone = (locality.split("/") + ["", "", ""])[:3]
    return region, zone, subzone


def locality_matches(locality: str, pattern: str) -> bool:
    """Istio's LocalityMatch: each pattern segment is `*`, missing, or equal."""
    have = _split(locality)
    want = _split(pattern)
    if want[0] != "*" and want[0] != have[0]:
        return False
    return all(w in ("*", "") or w == h for w, h in zip(want[1:], have[1:]))


def _priority(proxy: tuple[str, str, str], endpoint: tuple[str, str, str]) -> int:
    if proxy[0] != endpoint[0]:
        return 3
    if proxy[1] != endpoint[1]:
        return 2
    return 0 if proxy[2] == endpoint[2] else 1


def _groups(endpoints: Sequence[Endpoint]) -> dict[str, list[Endpoint]]:
    out: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        out.setdefault(e.locality, []).append(e)
    return out


def locality_lb(setting: LocalityLoadBalancerSetting | None, has_outlier_detection: bool, proxy: str,
                endpoints: Sequence[Endpoint]) -> LocalityLb | None:
    """What localityLbSetting does to one cluster for a proxy in locality `proxy`; None when it
    changes nothing (the cluster balances over all its endpoints as before)."""
    if setting is not None and setting.enabled is False:
        return None
    groups = _groups(endpoints)
    if setting is not None and setting.distribute:
        rule = next((d for d in setting.distribute if locality_matches(proxy, d.from_)), None)
        if rule is None:
            return None
        unmatched = dict(groups)
        weighted: list[LocalityGroup] = []
        for pattern, weight in rule.to.items():
            hit = {loc: eps for loc, eps in unmatched.items() if locality_matches(loc, pattern)}
            total = sum(max(1, e.weight) for eps in hit.values() for e in eps)
            for loc, eps in hit.items():
                del unmatched[loc]
                share = math.ceil(sum(max(1, e.weight) for e in eps) * weight / total)
                weighted.append(LocalityGroup(loc, 0, share, tuple(eps)))
        return LocalityLb("distribute", tuple(weighted))  # localities left unmatched get nothing
    if not has_outlier_detection:
        return None  # failover needs outlier detection to ever leave a priority (Istio skips it)
    me = _split(proxy)
    failover = setting.failover if setting is not None else ()
    raw: dict[str, int] = {}
    for loc in groups:
        priority = _priority(me, _split(loc))
        if priority == 3:
            for f in failover:
                if f.from_ == me[0]:
                    if _split(loc)[0] != f.to:
                        priority = 4
                    break
        raw[loc] = priority
    dense = {p: i for i, p in enumerate(sorted(set(raw.values())))}
    if len(dense) < 2:
        return None  # one priority: nothing to fail over to
    return LocalityLb("failover", tuple(LocalityGroup(loc, dense[raw[loc]], 0, tuple(eps)) for loc, eps in groups.items()))


def describe(lb: LocalityLb | None) -> dict | None:
    """The config dump's view."""
    if lb is None:
        return None
    by_priority: dict[int, list] = defaultdict(list)
    for g in lb.groups:
        by_priority[g.priority].append({"locality": g.locality, "weight": g.weight,
                                        "endpoints": [e.host_port for e in g.endpoints]})
    return {"mode": lb.mode, "priorities": [by_priority[p] for p in sorted(by_priority)]}
