"""Fuzz target: the config loader, YAML text -> resources (load_bytes) -> snapshot (compile_resources).

Property: any text either compiles or raises a ConfigError that names the file; nothing else escapes
(a config file is operator input: a typo must be an error message, never a traceback)."""

from __future__ import annotations

from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.load import load_bytes

MAX_LEN = 4096
SOURCE = "fuzz.yaml"


def check(data: bytes) -> None:
    try:
        resources = load_bytes(data, SOURCE)
        compile_resources(resources, version="fuzz")
        # a proxy that knows its labels and namespace takes the selector and Sidecar-scoping paths
        compile_resources(resources, version="fuzz", proxy_labels={"app": "fuzz", "istio": "ingressgateway"},
                          proxy_namespace="default")
    except ConfigError as e:
        assert e.file == SOURCE, f"ConfigError names {e.file!r}, not the file loaded"
        assert str(e).startswith(SOURCE), str(e)
