"""Turns one run's measurements into a markdown table (with ratios to Envoy), the target checks (issue 5;
HTTP/2), JSON and a PNG chart. Ratios are only ever taken between figures of the same run."""

from __future__ import annotations

import io
import json
import re
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# {"key", "scenario", "metric", "unit", "better", "values": {target: value}}; "key" is (scenario id,
# metric id) as a "scenario/metric" string, so the target checks find their figures without parsing titles.
Row = dict[str, Any]

TARGET_COLORS = {"direct": "#9e9e9e", "triomesh": "#1f77b4", "envoy": "#d62728", "splice": "#1f77b4",
                 "copy": "#7fb2dc"}


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "count":
        return f"{v:,.0f}"
    if unit == "vCPU":
        return f"{v:.3f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(row: Row) -> float | None:
    vals = row["values"]
    t, e = vals.get("triomesh"), vals.get("envoy")
    if t is None or not e:
        return None
    return t / e


def find(rows: list[Row], key: str) -> Row | None:
    return next((r for r in rows if r.get("key") == key), None)


# --- issue 5 targets --------------------------------------------------------------------------------


@dataclass
class Check:
    target: str
    measured: str
    met: bool | None  # None: this run has no figure for it, or a figure reported without a bound
    report_only: bool = False


def _value(rows: list[Row], key: str, target: str) -> float | None:
    r = find(rows, key)
    return None if r is None else r["values"].get(target)


def _ratio_check(rows: list[Row], title: str, key: str, bound: float | None, higher: bool = True) -> Check:
    """triomesh / Envoy for one row, judged against bound (None: reported only)."""
    t, e = _value(rows, key, "triomesh"), _value(rows, key, "envoy")
    if t is None or not e:
        return Check(title, "not measured", None, bound is None)
    q = t / e
    r = find(rows, key)
    unit = r["unit"] if r else ""
    measured = f"{q:.2f}x ({_fmt(t, unit)} vs {_fmt(e, unit)} {unit})"
    if bound is None:
        return Check(title, measured, None, True)
    return Check(title, measured, q >= bound if higher else q <= bound)


def target_checks(rows: list[Row]) -> list[Check]:
    """The targets of issue 5, each judged on this run's figures."""
    checks: list[Check] = []

    def ratio_check(title: str, key: str, bound: float, higher: bool) -> None:
        checks.append(_ratio_check(rows, title, key, bound, higher))

    ratio_check("HTTP/1.1 small c64, one core: req/s >= 1.2x Envoy", "h1-small-c64/rps", 1.2, True)
    ratio_check("HTTP/1.1 small c64, one core: CPU per request <= 0.8x Envoy", "h1-small-c64/cpu", 0.8, False)
    # HTTP/1.1 at 1,000 req/s over 16 connections with staggered starts (the low-rate rows)
    t, e = _value(rows, "lowrate-h1-1000/added-p90", "triomesh"), _value(rows, "lowrate-h1-1000/added-p90", "envoy")
    checks.append(Check("added p90 latency at 1,000 req/s (HTTP/1.1, 16 conns) <= Envoy's",
                        "not measured" if t is None or e is None else f"{t:.2f} ms vs {e:.2f} ms",
                        None if t is None or e is None else t <= e))
    ratio_check("peak RSS at 256 connections <= Envoy's", "h1-small-c256/peak-rss", 1.0, False)
    ratio_check("TCP 100 MiB, splice: CPU-s per GiB <= Envoy tcp_proxy's", "tcp-100MiB-splice/cpu", 1.0, False)
    one, two = _value(rows, "h1-small-c64/rps", "triomesh"), _value(rows, "h1-small-c64-2workers/rps", "triomesh")
    e1, e2 = _value(rows, "h1-small-c64/rps", "envoy"), _value(rows, "h1-small-c64-2workers/rps", "envoy")
    if one and two:
        ref = f"; Envoy 2 workers / 1: {e2 / e1:.2f}x" if e1 and e2 else ""
        d1 = _value(rows, "h1-small-c64/rps", "direct")
        if d1:
            # On 2 cores shared with nginx + wrk, which together run d1 req/s on one core: at R req/s the
            # worker(s) need R/one cores and nginx + wrk R/d1, so R <= 2 / (1/one + 1/d1).
            ceiling = 2 / (1 / one + 1 / d1) / one
            ref += f"; the most 2 cores shared with nginx + wrk allow: {ceiling:.2f}x"
        c1, c2 = _value(rows, "h1-small-c64/cpu", "triomesh"), _value(rows, "h1-small-c64-2workers/cpu", "triomesh")
        if c1 and c2:
            # what 2 workers would give on 2 cores of their own: twice one worker, less what each
            # request costs more when two workers run (shared caches, cross-core wakeups)
            ref += (f"; CPU per request 2 workers / 1: {c2 / c1:.2f}x ({_fmt(c2)} vs {_fmt(c1)} µs), "
                    f"so 2 cores of their own would give {2 * c1 / c2:.2f}x")
        checks.append(Check("--concurrency 2 >= 1.6x one worker (where the load generator is not the limit)",
                            f"{two / one:.2f}x ({_fmt(two)} vs {_fmt(one)} req/s{ref})", two / one >= 1.6))
    else:
        checks.append(Check("--concurrency 2 >= 1.6x one worker", "not measured", None))
    return checks


# the HTTP/2 scenarios: (scenario id, what it is)
H2_SCENARIOS = [("h2c-small-h1up", "h2c downstream, HTTP/1.1 upstream"),
                ("h2c-small-h2up", "h2c downstream, h2c upstream")]
# the low-rate scenarios: (scenario id, what it is)
LOWRATE_SCENARIOS = [(f"lowrate-{p}-{rate}", f"{name} at {rate:,} req/s")
                     for p, name in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")) for rate in (100, 1000)]


def http2_checks(rows: list[Row]) -> list[Check]:
    """The targets of the HTTP/2 work, each judged on this run's figures; then the HTTP/1.1 and low-rate
    ratios of the same run, reported without a bound."""
    checks = []
    for sid, what in H2_SCENARIOS:
        checks.append(_ratio_check(rows, f"{what}, one core: req/s >= Envoy's", f"{sid}/rps", 1.0, True))
        checks.append(_ratio_check(rows, f"{what}, one core: CPU per request <= Envoy's", f"{sid}/cpu", 1.0, False))
        r = find(rows, f"{sid}/errors")
        if r is not None:
            t = r["values"].get("triomesh")
            checks.append(Check(f"{what}: no errors through triomesh", f"{_fmt(t, 'count')} (Envoy: "
                                f"{_fmt(r['values'].get('envoy'), 'count')})", None if t is None else t == 0))
    for key, what in (("h1-small-c64/rps", "HTTP/1.1 100 B, 64 conns: req/s"),
                      ("h1-small-c64/cpu", "HTTP/1.1 100 B, 64 conns: CPU per request"),
                      ("h1-small-c256/rps", "HTTP/1.1 100 B, 256 conns: req/s"),
                      ("h1-small-c256/cpu", "HTTP/1.1 100 B, 256 conns: CPU per request"),
                      ("h1-1m-c16/mibps", "HTTP/1.1 1 MiB, 16 conns: MiB/s"),
                      ("h1-1m-c16/cpu", "HTTP/1.1 1 MiB, 16 conns: CPU per request")):
        checks.append(_ratio_check(rows, f"{what} (triomesh / Envoy)", key, None))
    for sid, what in LOWRATE_SCENARIOS:
        checks.append(_ratio_check(rows, f"{what}: added p90 latency (triomesh / Envoy)", f"{sid}/added-p90", None))
        checks.append(_ratio_check(rows, f"{what}: vCPU per 1,000 req/s (triomesh / Envoy)", f"{sid}/vcpu", None))
    return checks


def mtls_checks(rows: list[Row]) -> list[Check]:
    """The mutual TLS targets of issue 11, each judged on this run's figures; the bulk row reported."""
    return [
        _ratio_check(rows, "HTTP/1.1 over kept-alive mutual TLS, one core: CPU per request <= Envoy's",
                     "mtls-keepalive-c64/cpu", 1.0, False),
        _ratio_check(rows, "HTTP/1.1 over kept-alive mutual TLS: req/s (triomesh / Envoy)", "mtls-keepalive-c64/rps",
                     None),
        # the measured rate is capped by the client (nginx's own handshakes on the load core), so the
        # target is judged on what a core of each proxy takes: its CPU per connection, inverted
        _ratio_check(rows, "new mutual TLS connections/s (TLS 1.3 full handshakes) that one core takes: >= 0.8x "
                     "Envoy's", "mtls-newconn-c64/cps-per-core", 0.8, True),
        _ratio_check(rows, "new mutual TLS connections/s as measured (client-bound) (triomesh / Envoy)",
                     "mtls-newconn-c64/cps", None),
        _ratio_check(rows, "new mutual TLS connections: CPU per connection (triomesh / Envoy)", "mtls-newconn-c64/cpu",
                     None),
        _tls_share_check(rows),
        _ratio_check(rows, "new mutual TLS connections resuming a session: CPU per connection (triomesh / Envoy)",
                     "mtls-resumed-c64/cpu", None),
        _ratio_check(rows, "TCP bulk over mutual TLS: MiB/s (triomesh / Envoy)", "mtls-tcp-bulk/mibps", None),
        _ratio_check(rows, "TCP bulk over mutual TLS: CPU-s per GiB (triomesh / Envoy)", "mtls-tcp-bulk/cpu", None),
    ]


def _tls_share_check(rows: list[Row]) -> Check:
    """What TLS adds to a new connection: the mutual TLS new-connection row's CPU less its plaintext
    twin's (h1-newconn-c64: same request, same client count), each proxy's own."""
    title = "new connections: CPU that mutual TLS adds (mtls-newconn minus h1-newconn; triomesh / Envoy)"
    added = {}
    for t in ("triomesh", "envoy"):
        tls, plain = _value(rows, "mtls-newconn-c64/cpu", t), _value(rows, "h1-newconn-c64/cpu", t)
        added[t] = tls - plain if tls is not None and plain is not None else None
    if added["triomesh"] is None or not added["envoy"]:
        return Check(title, "not measured (needs the h1 and mtls sections)", None, True)
    plain = {t: _value(rows, "h1-newconn-c64/cpu", t) for t in added}
    measured = (f"{added['triomesh'] / added['envoy']:.2f}x ({_fmt(added['triomesh'])} vs {_fmt(added['envoy'])} "
                f"CPU-µs; plaintext: {_fmt(plain['triomesh'])} vs {_fmt(plain['envoy'])})")
    return Check(title, measured, None, True)


def checks_markdown(groups: dict[str, list[Check]]) -> str:
    mark = {True: "met", False: "NOT met", None: "n/a"}
    lines: list[str] = []
    for title, checks in groups.items():
        lines += [f"{title}, judged on this run:", ""]
        lines += [f"- {'report' if c.report_only else mark[c.met]}: {c.target} - measured {c.measured}"
                  for c in checks]
        lines.append("")
    return "\n".join(lines)


# --- outputs ----------------------------------------------------------------------------------------


def markdown(rows: list[Row], targets: list[str], meta: dict[str, Any]) -> str:
    head = ["scenario", "metric"] + targets + ["triomesh / envoy"]
    lines = [f"Run {meta.get('started')} ({meta.get('code', 'code version unknown')}), {meta.get('machine')}; "
             f"{meta.get('note', '')}; total run time {meta.get('run_time_s', '?')} s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = r["values"]
        q = ratio(r)
        cells = [r["scenario"], f"{r['metric']} ({r['unit']}, {r['better']} is better)"]
        cells += [_fmt(vals.get(t), r["unit"]) for t in targets]
        cells.append(f"{q:.2f}x" if q is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def problems_markdown(problems: list[str]) -> str:
    """What went wrong in this run's load runs (errors, h2load's own words, the proxy's log), if anything."""
    if not problems:
        return ""
    return "Problems seen in this run:\n\n" + "\n\n".join(problems) + "\n"


def write_all(out_dir: Path, rows: list[Row], targets: list[str], meta: dict[str, Any],
              checks: dict[str, list[Check]], problems: list[str] | None = None) -> dict[str, Path]:
    """checks: title -> the checks under it (the issue-5 targets, the HTTP/2 targets)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "latest.md"
    md.write_text(markdown(rows, targets, meta) + "\n" + checks_markdown(checks)
                  + ("\n" + problems_markdown(problems) if problems else ""))
    js = out_dir / "latest.json"
    js.write_text(json.dumps({"meta": meta, "targets": targets, "rows": rows,
                              "checks": {title: [asdict(c) for c in cs] for title, cs in checks.items()},
                              "problems": problems or []}, indent=1))
    paths = {"markdown": md, "json": js}
    png = out_dir / "latest.png"
    if chart(png, rows, targets, meta):
        paths["chart"] = png
    return paths


def chart(path: Path, rows: list[Row], targets: list[str], meta: dict[str, Any]) -> bool:
    """Left: every row with an Envoy figure as grouped bars of target / Envoy. Right: absolute req/s of
    the HTTP rows and MiB/s of the TCP rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    charted = [r for r in rows if r["values"].get("envoy") and r["unit"] != "count"]
    if not charted:
        return False
    rps_rows = [r for r in rows if r["unit"] == "req/s"]
    fig = plt.figure(figsize=(17, max(8.0, 0.42 * len(charted) + 2)), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[1.6, 1])
    ax = fig.add_subplot(grid[:, 0])
    clip = 3.0
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        ys = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(charted))]
        xs = [(r["values"].get(t) or 0) / r["values"]["envoy"] for r in charted]
        ax.barh(ys, [max(-1.0, min(x, clip)) for x in xs], height=width, label=t, color=TARGET_COLORS.get(t))
        for y, x in zip(ys, xs):
            if x > clip:
                ax.text(clip, y, f" {x:.1f}x", va="center", fontsize=6)
            elif t == "triomesh" and x and x > -1.0:
                ax.text(x, y, f" {x:.2f}x", va="center", fontsize=7, color=TARGET_COLORS["triomesh"])
    ax.set_yticks(range(len(charted)))
    ax.set_yticklabels([_short_label(r) for r in charted], fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    lowest = min([0.0] + [(r["values"].get(t) or 0) / r["values"]["envoy"] for r in charted for t in targets])
    ax.set_xlim(max(-1.0, lowest - 0.1), clip + 0.35)  # added latency over direct can come out below zero
    ax.set_xlabel(f"ratio to Envoy in the same run (bars clipped at {clip:.0f}x)")
    ax.set_title("each row relative to Envoy", fontsize=10)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    _absolute_bars(fig.add_subplot(grid[0, 1]), rps_rows, targets, "req/s", "100 B responses, one core: req/s")
    _absolute_bars(fig.add_subplot(grid[1, 1]), _tcp_groups(rows), ["direct", "splice", "copy", "envoy"],
                   "MiB/s", "TCP transfers: MiB/s (triomesh splice and copy modes)")
    fig.suptitle(textwrap.fill(f"triomesh vs Envoy vs direct - {meta.get('started')} ({meta.get('code', '')}) - "
                               f"{meta.get('note', '')}", 190), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    _write_small_png(path, buf.getvalue())
    return True


def _write_small_png(path: Path, png: bytes) -> None:
    """A few flat colours need no 24-bit pixels: a 64-colour palette makes the committed file ~4x smaller."""
    try:
        from PIL import Image  # matplotlib depends on Pillow
    except ImportError:
        path.write_bytes(png)
        return
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64).save(path, optimize=True)


def _short_label(r: Row) -> str:
    scenario = re.sub(r" \(x\d+\)", "", r["scenario"])  # the transfer count is in the table
    return f"{scenario}: {r['metric']} ({r['better']} better)"


def _tcp_groups(rows: list[Row]) -> list[Row]:
    """One group per transfer size with direct, triomesh splice, triomesh copy and Envoy side by side."""
    groups = []
    for size in ("1MiB", "100MiB"):
        splice, copy = find(rows, f"tcp-{size}-splice/mibps"), find(rows, f"tcp-{size}-copy/mibps")
        if splice is None:
            continue
        values = {"direct": splice["values"].get("direct"), "splice": splice["values"].get("triomesh"),
                  "copy": copy["values"].get("triomesh") if copy else None, "envoy": splice["values"].get("envoy")}
        groups.append({"scenario": f"TCP {size[:-3]} {size[-3:]} transfers", "values": values})
    return groups


def _absolute_bars(ax, rows: list[Row], targets: list[str], unit: str, title: str) -> None:
    ax.set_title(title, fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        return
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(rows))]
        vals = [r["values"].get(t) for r in rows]
        ax.bar(xs, [v or 0 for v in vals], width=width, label=t, color=TARGET_COLORS.get(t))
        for x, v in zip(xs, vals):
            if v:
                ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(rows)))
    # one line per comma-separated part; tilted, since HTTP/2 scenario names are long
    ax.set_xticklabels([r["scenario"].replace(", ", "\n") for r in rows], fontsize=6, rotation=30, ha="right")
    ax.set_ylabel(unit)
    ax.margins(y=0.18)
    ax.legend(fontsize=7)
