"""Istio's standard metrics: the proxy's workload identity, the peer metadata exchanged between
sidecars, and the per-request and per-connection series exported at /stats/prometheus."""
