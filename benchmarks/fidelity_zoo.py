"""Writes ``benchmarks/results/fidelity_zoo.md``: per zoo model and target, every output's metric at
default settings, whether a fidelity floor escalated, the precision mix the target ended with, time.

Each output is judged by its kind (``benchmarks/zoo``): cosine and SQNR for every output, plus the
model's task metric (top-1 / decision agreement for class scores, map IoU for probability maps, CTC
string match for sequences, top-box change for detectors, pitch error, embedding cosine). "Floor
escalated" and the verdict come from the report's ``escalation`` / ``verdict`` fields where the
deploy writes them, else "n/a" (today's code has no floor). Precision mix: node count per precision
in the target's own ``plan.json`` if it wrote one, else the shared plan.

    python benchmarks/zoo_run.py && python benchmarks/fidelity_zoo.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import zoo_tables as zt  # noqa: E402

OUT = zt.ROOT / "benchmarks" / "results" / "fidelity_zoo.md"


def _mix(rec: dict) -> str:  # type: ignore[type-arg]
    p = rec.get("precision") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(p.items()) if k != "source") or "n/a"


def _escalated(rec: dict) -> str:  # type: ignore[type-arg]
    if rec.get("escalated") is None:
        return "n/a"
    if not rec["escalated"]:
        return "no"
    esc = rec.get("escalation") or {}
    opts = [t["options"] for t in esc.get("tried", []) if isinstance(t, dict)]
    return (f"yes: {len(esc.get('kept') or [])} layer(s) {esc.get('precision', '')}"
            + (f", tried {opts}" if opts else "") + f", {esc.get('evaluations', '?')} evals").strip()


def render(recs: list[dict], baseline: str) -> str:  # type: ignore[type-arg]
    lines = zt.header("Fidelity on the model zoo, default settings", recs, baseline)
    lines += ["| model | target | output (kind) | cosine | SQNR dB | task metric | passes | floor escalated | "
              "verdict | precision mix | time s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {t: [0, 0, 0] for t in zt.TARGETS}  # passes, converts, models
    for r in recs:
        meta = r.get("meta") or {}
        for t in zt.TARGETS:
            rec = (r.get("targets") or {}).get(t)
            if rec is None:
                continue
            summary[t][2] += 1
            secs = zt.fmt((rec.get("child") or {}).get("wall_seconds"), 0)
            if not rec.get("converts"):
                lines.append(f"| {r['model']} | {t} | fails: {zt.error_cell(rec)} | | | | no | n/a | | | {secs} |")
                continue
            summary[t][1] += 1
            summary[t][0] += bool(rec.get("passes"))
            tm = ", ".join(f"{k} {zt.fmt(v)}" for k, v in (rec.get("task_metric") or {}).items()) or "n/a"
            verdict = rec.get("verdict")
            vtxt = "n/a" if not verdict else ("ships" if verdict.get("ships") else f"does not ship: {verdict.get('reason')}")
            for i, (name, o) in enumerate((rec.get("outputs") or {"n/a": {}}).items()):
                first = i == 0
                lines.append("| " + " | ".join([
                    r["model"] if first else "", t if first else "", f"`{name}` ({o.get('kind', '?')})",
                    zt.fmt(o.get("cosine"), 4), zt.fmt(o.get("sqnr_db"), 1), tm if first else "",
                    zt.fmt(rec.get("passes")) if first else "", _escalated(rec) if first else "",
                    vtxt if first else "", _mix(rec) if first else "", secs if first else ""]) + " |")
    lines += ["", "## Summary", "", "| target | models passing their task threshold | converted | run |",
              "|---|---|---|---|"]
    lines += [f"| {t} | {s[0]} | {s[1]} | {s[2]} |" for t, s in summary.items()]
    lines += zt.not_run(recs)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=zt.RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--baseline", default="", help="a sentence on which code was measured")
    a = ap.parse_args(argv)
    return zt.write_table("fidelity_zoo", a.results, a.out, a.baseline, render)


if __name__ == "__main__":
    sys.exit(main())
