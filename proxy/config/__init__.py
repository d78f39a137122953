"""Istio-typed config: schema, loading, validation, compiling to a Snapshot."""
