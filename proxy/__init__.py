"""triomesh: a service mesh proxy on Trio that speaks Istio's config."""
