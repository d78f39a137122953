"""Workload identity: SPIFFE IDs, the proxy's key and certificate, and their renewal."""
