"""The 80/20 `recommendation` canary as Istio users write it (the classic Istio tutorial's YAML), with a
ServiceEntry and WorkloadEntries standing in for the Kubernetes Service and pods."""

from __future__ import annotations

import random
from collections import Counter

from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes, load_path
from tests.config.helpers import head, route_for

# As in the tutorial: no namespace (so "default"), short host names, apiVersion v1alpha3.
RECOMMENDATION_YAML = b"""\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: recommendation
spec:
  host: recommendation
  subsets:
  - labels:
      version: v1
    name: version-v1
  - labels:
      version: v2
    name: version-v2
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: recommendation
spec:
  hosts:
  - recommendation
  http:
  - route:
    - destination:
        host: recommendation
        subset: version-v1
      weight: 80
    - destination:
        host: recommendation
        subset: version-v2
      weight: 20
"""

MESH_YAML = b"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: recommendation
spec:
  hosts:
  - recommendation
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 8080
    name: http
    protocol: HTTP
  workloadSelector:
    labels:
      app: recommendation
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: recommendation-v1
spec:
  address: 127.0.0.1
  ports:
    http: 18083
  labels:
    app: recommendation
    version: v1
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: recommendation-v2
spec:
  address: 127.0.0.1
  ports:
    http: 18084
  labels:
    app: recommendation
    version: v2
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
spec:
  egress:
  - port:
      number: 15001
      protocol: HTTP
      name: egress-http
    bind: 127.0.0.1
    hosts:
    - "./*"
"""


def _snapshot():
    resources = load_bytes(MESH_YAML, "mesh.yaml") + load_bytes(RECOMMENDATION_YAML, "recommendation.yaml")
    return compile_resources(resources, version="1")


def test_loads_as_written():
    resources = load_bytes(RECOMMENDATION_YAML, "recommendation.yaml")
    assert [(r.kind, r.namespace, r.name, r.document) for r in resources] == [
        ("DestinationRule", "default", "recommendation", 0),
        ("VirtualService", "default", "recommendation", 1),
    ]
    vs = resources[1].obj
    assert vs.api_version == "networking.istio.io/v1alpha3"
    assert [(d.destination.subset, d.weight) for d in vs.spec.http[0].route] == [("version-v1", 80), ("version-v2", 20)]


def test_subset_clusters_hold_the_labelled_endpoints():
    snap = _snapshot()
    v1 = snap.clusters["outbound|8080|version-v1|recommendation"]
    v2 = snap.clusters["outbound|8080|version-v2|recommendation"]
    assert [(e.address, e.port) for e in v1.endpoints] == [("127.0.0.1", 18083)]
    assert [(e.address, e.port) for e in v2.endpoints] == [("127.0.0.1", 18084)]
    both = snap.clusters["outbound|8080||recommendation"]
    assert sorted(e.port for e in both.endpoints) == [18083, 18084]


def test_every_name_for_the_service_reaches_the_split():
    snap = _snapshot()
    for authority in (
        b"recommendation",
        b"recommendation:8080",
        b"recommendation.default",
        b"recommendation.default.svc.cluster.local:8080",
    ):
        route = route_for(snap, "127.0.0.1_15001", head(authority=authority))
        assert route is not None, authority
        assert route.virtual_service == "default/recommendation"


def test_weights_are_exact_over_the_whole_range():
    route = route_for(_snapshot(), "127.0.0.1_15001", head(authority=b"recommendation:8080"))
    assert route.cumulative_weights == (80, 100)
    picks = Counter(route.pick_destination(lambda n, r=r: r).cluster for r in range(100))
    assert picks == {"outbound|8080|version-v1|recommendation": 80, "outbound|8080|version-v2|recommendation": 20}


def test_split_is_80_20_over_10000_random_picks():
    route = route_for(_snapshot(), "127.0.0.1_15001", head(authority=b"recommendation"))
    rng = random.Random(20260)
    picks = Counter(route.pick_destination(rng.randrange).cluster for _ in range(10_000))
    v1 = picks["outbound|8080|version-v1|recommendation"] / 10_000
    # binomial sd at p=0.8, n=10,000 is 0.004; 0.02 is five of them
    assert abs(v1 - 0.80) < 0.02, picks
    assert sum(picks.values()) == 10_000


def test_demo_config_in_examples_compiles(tmp_path):
    # the repository's own demo config must stay valid
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "examples" / "demo"
    snap = compile_resources(load_path(demo), version="demo", bind_address="127.0.0.1")
    assert {l.name for l in snap.listeners} >= {"127.0.0.1_18080"}


# The weighted example of Istio's VirtualService reference (HTTPRouteDestination), verbatim.
REVIEWS_REFERENCE_YAML = b"""\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews-route
spec:
  hosts:
  - reviews.prod.svc.cluster.local
  http:
  - route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v2
      weight: 25
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v1
      weight: 75
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews-destination
spec:
  host: reviews.prod.svc.cluster.local
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"""

REVIEWS_MESH_YAML = b"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: reviews
  namespace: prod
spec:
  hosts:
  - reviews.prod.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 9080
    name: http
    protocol: HTTP
  endpoints:
  - address: 127.0.0.1
    ports:
      http: 19081
    labels:
      version: v1
  - address: 127.0.0.2
    ports:
      http: 19082
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: prod
spec:
  egress:
  - port:
      number: 15001
      protocol: HTTP
    hosts:
    - "*/*"
"""


def test_reference_75_25_example():
    snap = compile_resources(
        load_bytes(REVIEWS_MESH_YAML, "mesh.yaml") + load_bytes(REVIEWS_REFERENCE_YAML, "reviews.yaml"), version="1"
    )
    route = route_for(snap, "127.0.0.1_15001", head(authority=b"reviews:9080"))  # short name inside prod
    picks = Counter(route.pick_destination(lambda n, r=r: r).cluster for r in range(100))
    assert picks == {"outbound|9080|v2|reviews.prod.svc.cluster.local": 25, "outbound|9080|v1|reviews.prod.svc.cluster.local": 75}
    assert [(e.address, e.port) for e in snap.clusters["outbound|9080|v2|reviews.prod.svc.cluster.local"].endpoints] == [
        ("127.0.0.2", 19082)
    ]
