"""Sections of ``report.html`` a release engineer reads first: a verdict banner per target, the gate
results, the parity table, and the per-layer view in graph order (own sensitivity next to cumulative
error, shape-only ops hidden). Pure functions of the ``report.json`` dict; plots via matplotlib (Agg).

Colours of the per-layer view: a layer is red when quantizing it *alone* drops the model output below
the floor's SQNR (default 20 dB): that layer breaks the model by itself; amber when its cumulative error
(what earlier layers propagate into it) is below the floor but its own sensitivity is not; green
otherwise. Cumulative SQNR falls with depth on every healthy network, so it alone never paints red.
"""

from __future__ import annotations

import html
from typing import Any

SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Gather", "Expand",
                       "Concat", "Slice", "Split", "Identity", "Cast", "ConstantOfShape", "Range", "Tile"})
"""Ops that only move or reshape data (Gather/Concat/Slice on shapes included): hidden in the per-layer view."""
MAX_LAYERS = 80
GREEN, RED, AMBER, GREY = "#1a7f37", "#cf222e", "#bf8700", "#656d76"


def _e(v: Any) -> str:
    return html.escape(str(v))


def _db(v: Any) -> str:
    return "inf dB" if v is None else f"{float(v):.1f} dB"


def verdict_banners(report: dict[str, Any]) -> str:
    """One banner per target: ships (green) / does not ship (red), and why in one line."""
    out = []
    for name, t in report.get("targets", {}).items():
        v = t.get("verdict") or {}
        ships = bool(v.get("ships"))
        colour, bg, word = (GREEN, "#dafbe1", "ships") if ships else (RED, "#ffebe9", "does not ship")
        out.append(f'<div class="verdict {"ships" if ships else "noship"}" style="border-left:6px solid {colour};'
                   f'background:{bg};padding:8px 12px;margin:6px 0"><b style="color:{colour}">{_e(name)}: {word}</b>'
                   f' &mdash; {_e(v.get("reason", "not judged"))}</div>')
    return "\n".join(out)


def _gate_detail(g: dict[str, Any]) -> str:
    if "value" in g:
        v = g["value"]
        return f"{'inf' if v is None else v} vs threshold {g.get('threshold')}"
    if "required_speedup" in g:
        return (f"{g.get('metric')} lost {g.get('fidelity_loss_percent')}%; speed-up {g.get('speedup')}x, "
                f"needs {g['required_speedup']}x")
    if "relative_loss" in g:
        return f"{g.get('metric')} lost {100 * float(g['relative_loss']):.2f}% (max {100 * float(g['threshold']):.1f}%)"
    if "misses" in g:
        return "; ".join(g["misses"][:3])
    return str(g.get("reason", ""))


def _gates(target: dict[str, Any]) -> dict[str, Any]:
    """A target's ``gates`` as ``{name: record}`` (an older list form ``[{"name", "passed"}]`` converted)."""
    gates = target.get("gates") or {}
    if isinstance(gates, list):
        return {str(g.get("name", i)): {"status": "pass" if g.get("passed") else "fail", **g}
                for i, g in enumerate(gates) if isinstance(g, dict)}
    return gates if isinstance(gates, dict) else {}


def gate_table(report: dict[str, Any]) -> str:
    """Every gate of every target: status (coloured), enforced, what it compared."""
    rows = []
    for name, t in report.get("targets", {}).items():
        for gname, g in _gates(t).items():
            if not isinstance(g, dict):
                continue
            status = str(g.get("status", "?"))
            colour = GREEN if status == "pass" else RED if status == "fail" else GREY
            rows.append(f"<tr><td>{_e(name)}</td><td><code>{_e(gname)}</code></td>"
                        f'<td style="color:{colour};font-weight:600">{_e(status)}</td>'
                        f"<td>{'yes' if g.get('enforced') else 'no'}</td><td>{_e(_gate_detail(g))}</td></tr>")
    if not rows:
        return '<p class="muted">No gate was evaluated.</p>'
    return ("<table class=\"gates\"><tr><th>target</th><th>gate</th><th>status</th><th>enforced</th>"
            "<th>compared</th></tr>" + "".join(rows) + "</table>")


def parity_table(report: dict[str, Any]) -> str:
    """FP32 vs each target and each pair of targets on the same held-out samples."""
    par = report.get("parity") or {}
    pairs = par.get("pairs") or []
    if not pairs:
        return '<p class="muted">No two runnable outputs to compare.</p>'
    rows = "".join(f"<tr><td>{_e(p['a'])}</td><td>{_e(p['b'])}</td><td class=\"num\">{p['cosine']:.5f}</td>"
                   f"<td class=\"num\">{_db(p['sqnr_db'])}</td></tr>" for p in pairs)
    return (f"<p class=\"muted\">Output <code>{_e(par.get('output'))}</code> on the same {par.get('samples')} "
            f"held-out samples.</p><table class=\"parity\"><tr><th>a</th><th>b</th><th>cosine</th>"
            f"<th>SQNR of b vs a</th></tr>{rows}</table>")


def layer_rows(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-layer rows to show: graph order, shape-only ops dropped."""
    rows = [r for r in layers if r.get("op_type") not in SHAPE_OPS]
    return sorted(rows, key=lambda r: r.get("index", 0))


def layer_plot(le: dict[str, Any], floor_db: float, png: Any) -> str:
    """Cumulative SQNR per layer output and, where measured, the layer's own sensitivity, in graph order."""
    import matplotlib.pyplot as plt

    rows = layer_rows(list(le.get("layers") or []))
    sens: dict[str, Any] = le.get("sensitivity") or {}
    if not rows:
        return ""
    hidden = len(le.get("layers") or []) - len(rows)
    shown = rows[:MAX_LAYERS]
    finite = [r["sqnr_db"] for r in shown if r["sqnr_db"] is not None] + \
             [v for v in sens.values() if v is not None]
    cap = max(finite, default=60.0) + 5
    cum = [r["sqnr_db"] if r["sqnr_db"] is not None else cap for r in shown]
    own = [sens.get(r["node"]) for r in shown]
    colours = []
    for c, o in zip(cum, own):
        if o is not None and o < floor_db:
            colours.append(RED)
        elif c < floor_db:
            colours.append(AMBER)
        else:
            colours.append(GREEN)
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.24 * len(shown)))
    y = list(range(len(shown)))
    ax.barh([i - 0.2 for i in y], cum, height=0.4, color=colours, label="cumulative (layer output vs FP32)")
    xs = [(i + 0.2, o) for i, o in zip(y, own) if o is not None]
    if xs:
        ax.barh([i for i, _ in xs], [o for _, o in xs], height=0.4, color="#0969da", alpha=0.7,
                label="own sensitivity (only this layer quantized, model output)")
    ax.set_yticks(y, [f"{r['node']} ({r['op_type']}, {r['precision']})" for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(floor_db, color=RED, lw=1, ls="--", label=f"floor {floor_db:g} dB")
    lo = min([*cum, *(o for _, o in xs), floor_db])  # the floor line stays in view
    ax.set_xlim(max(0.0, lo - 5), cap + 2)
    ax.set_xlabel("SQNR vs FP32 (dB, higher is better)")
    more = f"; first {len(shown)} of {len(rows)}" if len(rows) > len(shown) else ""
    ax.set_title(f"Per-layer error in graph order ({hidden} shape-only ops hidden{more})")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return f'<img src="{png(fig)}" alt="per-layer SQNR in graph order">'


def floor_db(report: dict[str, Any]) -> float:
    """The run's floor SQNR (dB) from any target's ``fidelity_floor``; 20 dB by default."""
    for t in report.get("targets", {}).values():
        f = ((t.get("fidelity_floor") or {}).get("floor") or {})
        if isinstance(f.get("sqnr_db"), (int, float)):
            return float(f["sqnr_db"])
    return 20.0


def fidelity_threshold(report: dict[str, Any], metric: str) -> float | None:
    """The threshold to draw on the fidelity chart (fraction): a gate on ``metric``, else the floor's cosine
    for ``cosine_mean``."""
    for t in report.get("targets", {}).values():
        g = _gates(t).get(metric)
        if isinstance(g, dict) and isinstance(g.get("threshold"), (int, float)):
            return float(g["threshold"])
    if metric == "cosine_mean":
        for t in report.get("targets", {}).values():
            f = ((t.get("fidelity_floor") or {}).get("floor") or {})
            if isinstance(f.get("cosine"), (int, float)):
                return float(f["cosine"])
    return None
