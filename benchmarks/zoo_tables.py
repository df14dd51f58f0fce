"""Shared reading and formatting of the zoo results (``benchmarks/results/zoo/<model>.json``).

Used by ``tflite_zoo.py`` and ``fidelity_zoo.py``; the raw records are written by ``zoo_run.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "zoo"
TARGETS = ("tflite", "tensorrt", "ascend", "onnxruntime")


def load(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every model's record, in the zoo's registry order (models without a record are left out)."""
    from benchmarks.zoo import ZOO

    recs = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    return [recs[n] for n in ZOO if n in recs]


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table cell ("n/a" for missing, "inf" for exact)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def worst_cosine(rec: dict[str, Any]) -> float | None:
    """The lowest per-output cosine of a target record (None when not measured)."""
    outs = rec.get("outputs") or {}
    vals = [o["cosine"] for o in outs.values() if o.get("cosine") is not None]
    return min(vals) if vals else None


def primary_metric(meta: dict[str, Any], rec: dict[str, Any]) -> str:
    """``name value`` of the model's first thresholded task metric on this target ("n/a" if not run)."""
    tm = rec.get("task_metric")
    if not tm:
        return "n/a"
    k = next(iter(meta.get("passing") or {}), next(iter(tm)))
    return f"{k} {fmt(tm.get(k))}"


def ops_left_float(rec: dict[str, Any]) -> str:
    """Count of ops the target left in float, from the report's ``float_nodes`` (the new field) or the
    older ``float_ops`` / ``fp32_islands``; "n/a" when the report says nothing."""
    for key in ("float_nodes", "float_ops"):
        v = rec.get(key)
        if isinstance(v, (list, dict)):
            return str(len(v))
    isl = rec.get("fp32_islands")
    if isinstance(isl, dict):
        return str(sum(len(v) for v in isl.values() if isinstance(v, list)))
    return "n/a"


def error_cell(rec: dict[str, Any], width: int = 90) -> str:
    """The first line of a failed target's error, shortened, pipes escaped."""
    e = " ".join(str(rec.get("error") or "").split())
    return (e[:width] + ("..." if len(e) > width else "")).replace("|", "/")


def header(title: str, recs: list[dict[str, Any]], baseline: str) -> list[str]:
    """Title, CPU line and the run's provenance."""
    cpu = next((r.get("cpu") for r in recs if r.get("cpu")), "CPU: unknown")
    dates = sorted({r.get("date_utc", "?") for r in recs})
    return [f"# {title}", "", f"{cpu}.", "",
            f"Run {dates[0]} to {dates[-1]} UTC with `benchmarks/zoo_run.py` (one `deployer.deploy` child process "
            f"per model and target group, defaults otherwise); raw records: `benchmarks/results/zoo/*.json`. "
            f"{baseline}", "",
            "Each model: 32 calibration and 32 held-out samples from disjoint sources (see the zoo list); `tflite` "
            "is deployed alone and `tensorrt`, `ascend`, `onnxruntime` together in one deploy (one plan), so their "
            "time and peak RSS are those of that shared child process (calibration, three lowerings, verification, "
            "report). Times were measured on a machine shared with other jobs (load average 10-15 on 2 cores): "
            "compare them with each other, not with a quiet machine.", ""]


def not_run(recs: list[dict[str, Any]]) -> list[str]:
    """A section listing models whose build (prepare child) failed or that have no target records."""
    from benchmarks.zoo import ZOO

    have = {r["model"] for r in recs}
    lines = [f"- `{r['model']}`: {' '.join(str(r.get('error')).split())[:200]}"
             + (f" (build child timed out after {r['prepare']['wall_seconds']} s)"
                if (r.get("prepare") or {}).get("timed_out") and "timed out" not in str(r.get("error")) else "")
             for r in recs if r.get("error")]
    lines += [f"- `{n}`: not run in this session (no record)" for n in ZOO if n not in have]
    return ["", "## Models without deploy results", ""] + (lines or ["none"])


def write_table(prog: str, results: Path, out: Path, baseline: str, render: Any) -> int:
    """Load the zoo records, render one table to ``out``; 2 (with a message) when there are none."""
    import sys

    recs = load(results)
    if not recs:
        print(f"{prog}: error: no records in {results}; run benchmarks/zoo_run.py first", file=sys.stderr)
        return 2
    out.write_text(render(recs, baseline), encoding="utf-8")
    print(f"wrote {out} ({len(recs)} models)")
    return 0
