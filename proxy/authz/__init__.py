"""Istio's AuthorizationPolicy and PeerAuthentication: compiled per workload (pure), evaluated per
request or connection (pure); the data path only asks."""
