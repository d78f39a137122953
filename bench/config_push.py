"""What a config push costs a proxy: CPU time per stage, from the control plane's wire bytes to a
Snapshot a worker can swap in, for a small and a large mesh.

Stages (each the median of --repeat runs of process CPU time, in one process, nothing else running in
it; other load on the machine stretches wall time, not CPU time):
- control plane: each resource encoded once (MessagePack), reused for every proxy of a class;
- supervisor: the wire bodies decoded and validated (no YAML), compiled once, the Snapshot encoded for
  the workers (proxy/config/snapshot_transfer.py);
- worker: the encoded Snapshot loaded (what each worker pays per push now);
- for comparison, what a worker would pay instead: compiling the typed resources itself, or (the
  former handoff) parsing the resources as YAML text and compiling them.
The mesh is bench/controlplane_bench.py's: per service a ServiceEntry, two WorkloadEntries, a
DestinationRule with two subsets and a weighted VirtualService.

usage: python -m bench.config_push [--services 5 500] [--repeat 5] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.controlplane_bench import NAMESPACE, mesh_yaml  # noqa: E402


def _cpu_ms(fn, repeat: int):
    times = []
    out = None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        times.append(1000 * (time.process_time() - start))
    return statistics.median(times), out


def measure(services: int, repeat: int) -> dict:
    from controlplane.wire import decode_istio, encode_istio
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes
    from proxy.config.snapshot_transfer import decode_snapshot, encode_snapshot
    from proxy.runner.config_source import build_snapshot
    from proxy.xds.sources import to_sources

    resources = [r for name, text in mesh_yaml(services).items() for r in load_bytes(text.encode(), name)]
    labels = {"app": "svc0"}  # a proxy of the first service: what a sidecar compiles
    compile_args = dict(version="1", bind_address="0.0.0.0", proxy_labels=labels, proxy_namespace=NAMESPACE)
    row: dict = {"services": services, "resources": len(resources)}
    row["encode_ms"], bodies = _cpu_ms(lambda: [encode_istio(r.obj) for r in resources], repeat)
    row["wire_bytes"] = sum(len(b) for b in bodies)
    row["decode_ms"], loaded = _cpu_ms(lambda: [decode_istio(b, file="<controlplane>", document=i)
                                                for i, b in enumerate(bodies)], repeat)
    row["compile_ms"], snapshot = _cpu_ms(lambda: compile_resources(loaded, **compile_args), repeat)
    row["encode_snapshot_ms"], encoded = _cpu_ms(lambda: encode_snapshot(snapshot), repeat)
    row["snapshot_bytes"] = len(encoded)
    row["worker_load_ms"], _ = _cpu_ms(lambda: decode_snapshot(encoded), repeat)
    # the alternatives a worker would pay
    row["worker_compile_ms"] = row["compile_ms"]
    sources = to_sources(loaded, "1")
    row["yaml_bytes"] = sum(len(data) for _, data in sources)
    row["worker_yaml_ms"], _ = _cpu_ms(lambda: build_snapshot(sources, **compile_args), repeat)
    return row


COLUMNS = [
    ("services", "services", "{:,}"), ("resources", "resources", "{:,}"),
    ("encode_ms", "control plane: encode (ms)", "{:.1f}"), ("wire_bytes", "wire bytes", "{:,}"),
    ("decode_ms", "supervisor: decode+validate (ms)", "{:.1f}"), ("compile_ms", "supervisor: compile (ms)", "{:.1f}"),
    ("encode_snapshot_ms", "supervisor: encode Snapshot (ms)", "{:.1f}"), ("snapshot_bytes", "Snapshot bytes", "{:,}"),
    ("worker_load_ms", "worker: load Snapshot (ms)", "{:.1f}"),
    ("worker_compile_ms", "worker if it compiled typed resources (ms)", "{:.1f}"),
    ("worker_yaml_ms", "worker if it parsed YAML and compiled (ms)", "{:.1f}"),
]


def markdown(rows: list[dict], repeat: int) -> str:
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    head = (f"CPU time per push stage, median of {repeat} (python -m bench.config_push), "
            f"{os.cpu_count()} cores, load average {load} at the end.\n\n")
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, nargs="+", default=[5, 500], help="services in the mesh (5 resources each)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    rows = [measure(n, args.repeat) for n in args.services]
    text = markdown(rows, args.repeat)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
