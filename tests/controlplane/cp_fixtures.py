"""Shared config fixtures for the control-plane tests: a small mesh in the `tutorial` namespace."""

from __future__ import annotations

from pathlib import Path

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: recommendation, namespace: tutorial}
spec:
  hosts: [recommendation]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: recommendation}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: preference, namespace: tutorial}
spec:
  hosts: [preference]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 18082}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: billing, namespace: finance}
spec:
  hosts: [billing]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9090, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 19090}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: recommendation-v1, namespace: tutorial}
spec: {address: 127.0.0.1, ports: {http: 18083}, labels: {app: recommendation, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: recommendation-v2, namespace: tutorial}
spec: {address: 127.0.0.1, ports: {http: 18084}, labels: {app: recommendation, version: v2}}
"""

RULES = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: recommendation, namespace: tutorial}
spec:
  host: recommendation
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def split(v1: int, v2: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: recommendation, namespace: tutorial}}
spec:
  hosts: [recommendation]
  http:
  - route:
    - {{destination: {{host: recommendation, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: recommendation, subset: v2}}, weight: {v2}}}
"""


SIDECAR_NARROW = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: tutorial}
spec:
  egress:
  - port: {number: 15001, name: http, protocol: HTTP}
    bind: 127.0.0.1
    hosts: ["./preference"]
"""


def write_mesh(directory: Path, *, v1: int = 80, v2: int = 20) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "services.yaml").write_text(SERVICES)
    (directory / "rules.yaml").write_text(RULES)
    (directory / "routes.yaml").write_text(split(v1, v2))
    return directory
