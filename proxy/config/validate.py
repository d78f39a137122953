"""`triomesh validate FILE|DIR`: load and compile a config, print "ok: ..." or the precise error."""

from __future__ import annotations

import argparse
import sys

from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.load import load_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="triomesh validate",
        description="Check Istio config (Gateway, VirtualService, DestinationRule, ServiceEntry, "
        "WorkloadEntry, Sidecar) the way `triomesh proxy` would load it.",
    )
    parser.add_argument("path", metavar="FILE|DIR", help="a YAML file, or a directory of *.yaml/*.yml files")
    args = parser.parse_args(argv)
    try:
        resources = load_path(args.path)
        snapshot = compile_resources(resources, version="validate")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts: dict[str, int] = {}
    for r in resources:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
    print(
        f"ok: {len(resources)} resources ({kinds}); "
        f"{len(snapshot.listeners)} listeners, {len(snapshot.clusters)} clusters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
