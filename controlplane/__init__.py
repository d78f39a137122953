"""Control plane: watches config, computes per-proxy snapshots, streams them to proxies."""
