"""``report.html``: the human view of ``report.json``, self-contained (no network, no script).

Sections: a summary table per target (fidelity, size, latency where measured, gates), the per-layer
error plot (SQNR per quantized layer, worst first), activation histograms of the most sensitive layers
with the plan's range marked, the precision decision per layer, and provenance. Plots are drawn by
matplotlib (Agg backend) and embedded as base64 PNG, so the file opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

SENSITIVE_LAYERS = 6
"""How many of the worst layers get a histogram plot."""
MAX_BAR_LAYERS = 60
"""The per-layer plot shows at most this many layers (worst first); the table lists all."""
NOT_EVALUATED = "not evaluated"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.muted{color:#656d76}
img{max-width:100%;height:auto;border:1px solid #eaeef2}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
details{margin:8px 0}code{font-size:12px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{_e(alt)}">'


def format_gates(gates: Any) -> str:
    """One-line text of a target's ``gates`` entry (whatever its shape), or ``not evaluated``."""
    if gates is None or gates == {} or gates == []:
        return NOT_EVALUATED
    if isinstance(gates, dict):
        if "passed" in gates and len(gates) <= 3:
            return ("pass" if gates["passed"] else "FAIL") + ("" if gates.get("enforced", True) else " (not enforced)")
        if all(isinstance(v, dict) and "status" in v for v in gates.values()):  # named gates (deployer.gates)
            return "; ".join(f"{k}: {v['status']}" + (f" ({v['reason']})" if v.get("reason") else "")
                             + (" (not enforced)" if v.get("enforced") is False and str(v["status"]).lower()
                                in ("fail", "failed") else "") for k, v in gates.items())
        return "; ".join(f"{k}: {format_gates(v) if isinstance(v, (dict, list)) else v}" for k, v in gates.items())
    if isinstance(gates, list):
        parts = []
        for g in gates:
            if isinstance(g, dict):
                name = g.get("name") or g.get("gate") or "gate"
                state = g.get("status") or ("pass" if g.get("passed") else "FAIL" if "passed" in g else "?")
                parts.append(f"{name}: {state}")
            else:
                parts.append(str(g))
        return "; ".join(parts)
    return str(gates)


def format_fidelity(fid: dict[str, Any]) -> str:
    parts = []
    for k in ("top1_agreement", "cosine_mean"):
        if isinstance(fid.get(k), (int, float)):
            parts.append(f"{k} {fid[k]:.4f}")
    for name, rec in (fid.get("outputs") or {}).items():
        v = rec.get("sqnr_db")
        extra = f" {rec['metric']} {rec['value']}" if rec.get("metric") not in (None, "sqnr_db") else ""
        parts.append(f"{name} [{rec.get('kind')}]{extra} SQNR {v:.1f} dB" if isinstance(v, (int, float))
                     else f"{name} [{rec.get('kind')}]{extra} SQNR inf")
    if "samples" in fid:
        parts.append(f"{fid['samples']} samples")
    return ", ".join(parts) or "not measured"


def format_size(size: dict[str, Any]) -> str:
    art = size.get("artifact")
    if not isinstance(art, (int, float)):
        return "?"
    text = f"{art / 1e6:.2f} MB"
    if size.get("ratio"):
        text += f" ({100 * size['ratio']:.1f}% of FP32)"
    return text


def format_latency(t: dict[str, Any]) -> str:
    """Speed where a backend measured it (``speed``, else ``latency_ms``, ``latency``, ``throughput_qps``)."""
    sp = t.get("speed")
    if isinstance(sp, dict) and isinstance(sp.get("ratio"), (int, float)):
        text = (f"{sp.get('artifact_qps', 0):.1f} samples/s vs FP32 {sp.get('fp32_qps', 0):.1f} ({sp['ratio']:.2f}x), "
                f"batch {sp.get('batch')}, {sp.get('threads')} thread(s)")
        flavour = t.get("kernel_flavour") or {}
        if flavour.get("name"):
            text += f"; kernels {flavour['name']} for {flavour.get('isa')}"
        return text
    tp = t.get("throughput_qps")
    if isinstance(tp, dict) and isinstance(tp.get("artifact"), (int, float)):
        text = f"{tp['artifact']:.1f} q/s"
        if isinstance(tp.get("fp32"), (int, float)):
            text += f" vs FP32 {tp['fp32']:.1f} q/s ({tp.get('speedup', 0):.2f}x)"
        setting = tp.get("setting") or {}
        if setting:
            text += f", batch {setting.get('batch')}, {setting.get('threads')} threads"
        return text
    for key in ("latency_ms", "latency"):
        v = t.get(key)
        if isinstance(v, (int, float)):
            return f"{v:.2f} ms"
        if isinstance(v, dict):
            return ", ".join(f"{k} {x:.2f} ms" if isinstance(x, (int, float)) and not isinstance(x, bool)
                             else f"{k} {x}" for k, x in v.items() if not isinstance(x, (dict, list)))
        if v is not None:
            return str(v)
    return "not measured"


def _summary(report: dict[str, Any]) -> str:
    rows = []
    for name, t in report.get("targets", {}).items():
        gates = format_gates(t.get("gates"))
        cls = "bad" if "FAIL" in gates else "ok" if gates.startswith("pass") else "muted"
        notes = "<br>".join(_e(n) for n in t.get("notes", []))
        warn = t.get("speed_warning")  # an INT8 artifact slower than FP32 where it was built: red
        speed_cls, speed_note = (' class="bad"', f"<br>{_e(warn)}") if warn else ("", "")
        rows.append(f"<tr><td><b>{_e(name)}</b></td><td><code>{_e(t.get('artifact', ''))}</code></td>"
                    f"<td>{_e(format_fidelity(t.get('fidelity', {})))}</td><td>{_e(format_size(t.get('size_bytes', {})))}</td>"
                    f"<td{speed_cls}>{_e(format_latency(t))}{speed_note}</td><td class=\"{cls}\">{_e(gates)}</td>"
                    f"<td>{_e(t.get('verified_by', ''))}</td><td>{notes}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("target", "artifact", "fidelity vs FP32", "size", "latency", "gates",
                                             "verified by", "notes"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _fidelity_plot(report: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    names, vals, label = [], [], ""
    for name, t in report.get("targets", {}).items():
        fid = t.get("fidelity", {})
        for k in ("top1_agreement", "cosine_mean"):
            if isinstance(fid.get(k), (int, float)):
                names.append(name)
                vals.append(100.0 * fid[k])
                label = k
                break
    if not names:
        return ""
    from deployer.report_views import fidelity_threshold

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    bars = ax.barh(names, vals, color="#0969da")
    ax.bar_label(bars, fmt="%.2f%%", padding=3)
    threshold = fidelity_threshold(report, label)
    marks = vals + ([100.0 * threshold] if threshold is not None else [])
    lo = min(marks)
    ax.set_xlim(max(0.0, lo - max(1.0, 0.25 * (100.0 - lo))), 100.0 + max(0.5, 0.15 * (100.0 - lo)))
    if threshold is not None:  # scaled to the data: 94% and 96% look different; the gate / floor drawn
        ax.axvline(100.0 * threshold, color="#cf222e", lw=1.2, ls="--", label=f"threshold {100 * threshold:g}%")
        ax.legend(loc="lower left", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} vs FP32 (%, axis scaled to the data)")
    ax.set_title("Fidelity per target (held-out samples)")
    return _img(_png(fig), "fidelity per target")


def _layer_plot(layers: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    shown = layers[:MAX_BAR_LAYERS]
    if not shown:
        return ""
    cap = max((r["sqnr_db"] for r in shown if r["sqnr_db"] is not None), default=60.0) + 5
    vals = [r["sqnr_db"] if r["sqnr_db"] is not None else cap for r in shown]
    colors = ["#cf222e" if v < 20 else "#bf8700" if v < 30 else "#1a7f37" for v in vals]
    labels = [f"{r['node']} ({r['op_type']}, {r['precision']})" for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.22 * len(shown)))
    ax.barh(range(len(shown)), vals, color=colors)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(20, color="#cf222e", lw=0.8, ls="--")
    ax.axvline(30, color="#bf8700", lw=0.8, ls="--")
    ax.set_xlabel("SQNR of the layer output vs FP32 (dB, higher is better; < 20 dB red, < 30 dB amber)")
    more = f" (worst {len(shown)} of {len(layers)})" if len(layers) > len(shown) else ""
    ax.set_title(f"Per-layer error, worst first{more}")
    ax.grid(axis="x", alpha=0.3)
    return _img(_png(fig), "per-layer SQNR")


def _hist_plots(layers: list[dict[str, Any]], stats_path: Path, plan: dict[str, Any]) -> str:
    if not stats_path.is_file() or not layers:
        return '<p class="muted">No statistics.json in this output (a run with --plan, or a verify run).</p>'
    import matplotlib.pyplot as plt

    from calibration.observers import Statistics

    stats = Statistics.load(stats_path)
    ranges = plan.get("ranges", {})
    imgs = []
    for row in layers[:SENSITIVE_LAYERS]:
        tensor = str(row.get("input") if row.get("input") in stats.tensors else row["tensor"])
        st = stats.tensors.get(tensor)
        if st is None or st.hist is None or st.hist.total == 0:
            continue
        h = st.hist
        edges = h.edges()
        lo_i = int(np.searchsorted(edges, st.min, side="right")) - 1
        hi_i = int(np.searchsorted(edges, st.max, side="left"))
        lo_i, hi_i = max(lo_i, 0), min(max(hi_i, lo_i + 1), h.bins)
        counts = h.counts[lo_i:hi_i]
        e = edges[lo_i:hi_i + 1]
        group = max(1, len(counts) // 120)
        n = len(counts) // group * group or len(counts)
        c = counts[:n].reshape(-1, group).sum(axis=1) if group > 1 else counts
        e2 = e[: n + 1 : group] if group > 1 else e
        fig, ax = plt.subplots(figsize=(5.5, 3))
        ax.stairs(np.maximum(c, 0.5), e2[: len(c) + 1], fill=True, color="#0969da", alpha=0.8)
        ax.set_yscale("log")
        r = ranges.get(tensor)
        if r:
            for x in (r["min"], r["max"]):
                ax.axvline(x, color="#cf222e", lw=1.2, ls="--")
            ax.text(0.01, 0.95, f"plan range [{r['min']:.3g}, {r['max']:.3g}]", transform=ax.transAxes,
                    fontsize=8, va="top", color="#cf222e")
        sq = row["sqnr_db"]
        ax.set_title(f"{row['node']} ({row['op_type']}): {'inf' if sq is None else f'{sq:.1f}'} dB\n"
                     f"input {tensor}", fontsize=8)
        ax.set_xlabel("activation value", fontsize=8)
        ax.set_ylabel("count (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        imgs.append(_img(_png(fig), f"histogram of {tensor}"))
    if not imgs:
        return '<p class="muted">No histogram recorded for the most sensitive layers.</p>'
    return f'<div class="grid">{"".join(imgs)}</div>'


def _precision_table(plan: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    nodes = plan.get("nodes", {})
    if not nodes:
        return '<p class="muted">No plan in this output.</p>'
    err = {r["node"]: r for r in layers}
    counts: dict[str, int] = {}
    for d in nodes.values():
        counts[d["precision"]] = counts.get(d["precision"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    rows = []
    for name, d in nodes.items():
        w = d.get("weight")
        wtxt = f"int{w['bits']} {'sym' if w.get('symmetric', True) else 'asym'} {w['granularity']}" if w else ""
        r = err.get(name)
        sq = "" if r is None else ("inf" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}")
        rows.append(f"<tr><td><code>{_e(name)}</code></td><td>{_e(d['op_type'])}</td><td>{_e(d['precision'])}</td>"
                    f"<td>{_e(wtxt)}</td><td class=\"num\">{sq}</td><td>{_e(d.get('reason', ''))}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("node", "op", "precision", "weight", "SQNR dB", "reason (recipe rule)"))
    return (f"<p>{len(nodes)} nodes in the plan: {_e(summary)}. Nodes not listed compute in FP32.</p>"
            f"<details open><summary>precision per node</summary><table><tr>{head}</tr>{''.join(rows)}</table></details>")


def _provenance(report: dict[str, Any]) -> str:
    prov = report.get("provenance", {})
    rows = [("deployer", prov.get("deployer")), ("python", prov.get("python"))]
    rows += [(k, v) for k, v in sorted(prov.get("libraries", {}).items())]
    model, cal = report.get("model", {}), report.get("calibration", {})
    rows += [("model source", model.get("source")), ("model sha256", model.get("sha256")),
             ("calibration", f"{cal.get('name', '')}: {cal.get('num_samples', '?')} samples, observer "
                             f"{cal.get('observer', '?')}"),
             ("calibration sha256", cal.get("sha256")), ("recipe", report.get("recipe")),
             ("data split", report.get("data", {}).get("split")), ("wall seconds", report.get("wall_seconds"))]
    body = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in rows if v is not None)
    files = "".join(f"<tr><td><code>{_e(k)}</code></td><td><code>{_e(v)}</code></td></tr>"
                    for k, v in sorted(report.get("sha256", {}).items()))
    return (f"<table>{body}</table><details><summary>sha256 of every output file</summary>"
            f"<table><tr><th>file</th><th>sha256</th></tr>{files}</table></details>")


def render(report: dict[str, Any], out_dir: str | Path) -> str:
    """The HTML text of the report for ``report`` (a ``report.json`` dict) written in ``out_dir``.

    ``out_dir`` supplies ``plan.json`` and ``statistics.json`` when present.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    out = Path(out_dir)
    plan_file = out / str(report.get("plan") or "plan.json")
    plan: dict[str, Any] = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else {}
    le = report.get("layers") or {}
    layers: list[dict[str, Any]] = list(le.get("layers", [])) if isinstance(le, dict) else []
    title = f"deployer report: {report.get('model', {}).get('source', '')}"
    from deployer.report_views import floor_db, gate_table, layer_plot, parity_table, verdict_banners

    layer_note = (f"<p class=\"muted\">Cumulative: {_e(le.get('method', ''))}; {le.get('samples', 0)} held-out "
                  f"samples; the error at a layer includes what earlier layers propagate into it. Own "
                  f"sensitivity: {_e(le.get('sensitivity_method', 'not computed'))}. Red: the layer alone breaks "
                  f"the floor; amber: cumulative error below the floor. Shape-only ops are hidden.</p>") if layers else \
        '<p class="muted">Per-layer error was not computed for this output.</p>'
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>Recipe <b>{_e(report.get('recipe'))}</b>, task {_e(report.get('data', {}).get('task'))}, "
        f"{_e(report.get('data', {}).get('heldout_samples'))} held-out samples. Machine-readable: "
        f"<code>report.json</code>; plan: <code>{_e(report.get('plan'))}</code>.</p>",
        "<h2>Verdict per target</h2>", verdict_banners(report),
        "<h2>Gates</h2>", gate_table(report),
        "<h2>Summary per target</h2>", _summary(report), _fidelity_plot(report),
        "<h2>Parity: targets against FP32 and each other</h2>", parity_table(report),
        "<h2>Per-layer error (graph order)</h2>", layer_note, layer_plot(le, floor_db(report), _png)
        if isinstance(le, dict) else "",
        "<h2>Activation histograms of the most sensitive layers</h2>",
        "<p class=\"muted\">Calibration histogram of each layer's quantized input; dashed lines: the plan's range "
        "(values outside are clipped).</p>", _hist_plots(layers, out / "statistics.json", plan),
        "<h2>Precision decision per layer</h2>", _precision_table(plan, layers),
        "<h2>Provenance</h2>", _provenance(report),
        "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


def write_html(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` for ``report``; returns its path."""
    path = Path(out_dir) / "report.html"
    path.write_text(render(report, out_dir), encoding="utf-8")
    return path
