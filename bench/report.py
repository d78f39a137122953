"""Turns one run's measurements into a markdown table (with ratios to Envoy), JSON and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]  # {"scenario", "metric", "unit", "better", "values": {target: value}}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(rows: list[Row], targets: list[str], meta: dict[str, Any]) -> str:
    head = ["scenario", "metric"] + targets + ["triomesh / envoy"]
    lines = [f"Run {meta.get('started')}, {meta.get('machine')}; {meta.get('note', '')}".strip(), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = r["values"]
        ratio = None
        if vals.get("triomesh") is not None and vals.get("envoy"):
            ratio = vals["triomesh"] / vals["envoy"]
        cells = [r["scenario"], f"{r['metric']} ({r['unit']}, {r['better']} is better)"]
        cells += [_fmt(vals.get(t)) for t in targets]
        cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_all(out_dir: Path, rows: list[Row], targets: list[str], meta: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "latest.md"
    md.write_text(markdown(rows, targets, meta))
    js = out_dir / "latest.json"
    js.write_text(json.dumps({"meta": meta, "targets": targets, "rows": rows}, indent=2))
    paths = {"markdown": md, "json": js}
    png = out_dir / "latest.png"
    if _chart(png, rows, targets):
        paths["chart"] = png
    return paths


def _chart(path: Path, rows: list[Row], targets: list[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    charted = [r for r in rows if r["values"].get("envoy")]
    if not charted:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(charted) + 2))
    labels = [f"{r['scenario']}: {r['metric']} ({r['better']} better)" for r in charted]
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        ys = [j + i * width for j in range(len(charted))]
        xs = [(r["values"].get(t) or 0) / r["values"]["envoy"] for r in charted]
        ax.barh(ys, xs, height=width, label=t)
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(charted))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio to Envoy (same run)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
