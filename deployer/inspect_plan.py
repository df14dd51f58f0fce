"""``deploy inspect plan.json``: a plan as a readable table (or JSON rows).

One row per node of the plan: name, op type, precision, weight scheme and the recipe rule that decided it. The plan is loaded through
:meth:`deployer.plan.QuantPlan.load`, so older schema versions are migrated and invalid plans rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deployer.plan import QuantPlan


def plan_summary(plan: QuantPlan, path: str | Path = "") -> dict[str, Any]:
    """Machine-readable summary (the ``--json`` output of ``deploy inspect``; schema ``inspect.schema.json``)."""
    counts: dict[str, int] = {}
    rows = []
    for name in sorted(plan.nodes):
        d = plan.nodes[name]
        counts[d.precision.value] = counts.get(d.precision.value, 0) + 1
        w = d.weight
        rows.append({"node": name, "op_type": d.op_type, "precision": d.precision.value,
                     "weight": None if w is None else w.to_dict(), "reason": d.reason})
    return {
        "plan": str(path), "schema_version": plan.schema_version,
        "model": {"sha256": plan.model.get("sha256"), "source": plan.model.get("source"),
                  "opset": plan.model.get("opset")},
        "calibration": {"observer": plan.calibration.get("observer"),
                        "num_samples": plan.calibration.get("num_samples")},
        "recipe": plan.recipe.get("name"), "precision_counts": dict(sorted(counts.items())),
        "ranges": len(plan.ranges), "shared_scales": len(plan.shared_scales),
        "bias_corrected_nodes": len(plan.bias_correction), "adarounded_nodes": len(plan.rounding),
        "smoothed_tensors": len(plan.smoothing), "nodes": rows,
    }


def _weight_text(w: dict[str, Any] | None) -> str:
    if not w:
        return ""
    text = f"int{w['bits']} {'sym' if w.get('symmetric', True) else 'asym'} {w['granularity']}"
    if w.get("block_size"):
        text += f" block {w['block_size']}"
    return text


def render_table(plan: QuantPlan, path: str | Path = "", color: bool = False, width: int = 160) -> str:
    """The plan as a terminal table (rich); colours only when ``color``."""
    from rich.console import Console
    from rich.table import Table

    s = plan_summary(plan, path)
    title = (f"{path or 'plan'}: schema {s['schema_version']}, recipe {s['recipe']}, observer "
             f"{s['calibration']['observer']}, "
             + ", ".join(f"{v} {k}" for k, v in s["precision_counts"].items()))
    table = Table(title=title, title_justify="left")
    for col in ("node", "op", "precision", "weight", "reason"):
        table.add_column(col, overflow="fold")
    for r in s["nodes"]:
        style = {"int8": "green", "fp16": "yellow", "fp32": "red"}.get(r["precision"], "")
        prec = f"[{style}]{r['precision']}[/{style}]" if color and style else r["precision"]
        table.add_row(r["node"], r["op_type"], prec, _weight_text(r["weight"]), r["reason"])
    console = Console(width=width, no_color=not color, force_terminal=color, highlight=False)
    with console.capture() as cap:
        console.print(table)
        console.print(f"{s['ranges']} activation ranges, {s['shared_scales']} shared-scale groups, "
                      f"{s['bias_corrected_nodes']} bias-corrected nodes, {s['adarounded_nodes']} AdaRound-rounded "
                      f"nodes, {s['smoothed_tensors']} SmoothQuant-smoothed inputs; nodes not listed compute in FP32.")
    return cap.get()

