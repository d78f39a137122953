"""A proxy process for the control-plane process tests: the real proxy/xds client with the runner's
reload step in miniature (compile the pushed resources with this proxy's labels). Prints one JSON line
per applied snapshot on stdout.

usage: python sim_proxy.py HOST:PORT NODE_ID NAMESPACE [label=value ...]
(env SIM_ADMIN_ADDRESS: the admin address to announce in Hello)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio  # noqa: E402

from proxy import logging as tm_logging  # noqa: E402
from proxy.config.compile import compile_resources  # noqa: E402
from proxy.xds.client import ClientOptions, NodeInfo, run_client  # noqa: E402


def main() -> None:
    address, node_id, namespace, *pairs = sys.argv[1:]
    labels = dict(p.split("=", 1) for p in pairs)
    tm_logging.configure(level="info", fmt="json", process="sim_proxy")

    def on_resources(resources, version):
        snapshot = compile_resources(resources, version=version, proxy_labels=labels)
        routes = {}
        for r in resources:
            if r.kind == "VirtualService":
                routes[r.name] = [rd.weight for rd in r.obj.spec.http[0].route]
        print(json.dumps({"version": version, "resources": len(resources), "routes": routes,
                          "clusters": sorted(snapshot.clusters)}), flush=True)

    options = ClientOptions(backoff_initial_s=0.05, backoff_max_s=0.5)
    node = NodeInfo(node_id, namespace=namespace, labels=labels, admin_address=os.environ.get("SIM_ADMIN_ADDRESS", ""))
    trio.run(lambda: run_client(address, node, on_resources, options=options))


if __name__ == "__main__":
    main()
