"""Writes ``benchmarks/results/tflite_zoo.md``: the zoo on ``tflite`` next to the QDQ targets.

Per model: does ``tflite`` convert, how many ops it left float, the worst output cosine and the task
metric vs FP32 for ``tflite`` and for ``tensorrt`` / ``ascend`` / ``onnxruntime`` (the same plan: every
deploy computes the plan from the same calibration samples and the same defaults; ``plan_sha256`` in
the raw records says whether the plans were byte-identical), the deploy's wall time and peak RSS.

    python benchmarks/zoo_run.py          # the runs (raw JSON under benchmarks/results/zoo/)
    python benchmarks/tflite_zoo.py       # this table from those records
    python benchmarks/tflite_zoo.py --run # both
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import zoo_tables as zt  # noqa: E402

OUT = zt.ROOT / "benchmarks" / "results" / "tflite_zoo.md"


def render(recs: list[dict], baseline: str) -> str:  # type: ignore[type-arg]
    lines = zt.header("TFLite on the model zoo", recs, baseline)
    lines += ["Cosine: the worst output's mean cosine with FP32 over the held-out samples. Task metric: the "
              "model's first passing metric (thresholds in the per-model list below); `PASS`/`fail` against it.",
              "", "| model | tflite converts | ops left float | tflite cosine | tflite task metric | tensorrt "
              "cosine / task | ascend cosine / task | onnxruntime cosine / task | tflite time s | tflite peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in recs:
        meta = r.get("meta") or {}
        tg = r.get("targets") or {}
        tf = tg.get("tflite") or {}
        def cell(rec: dict) -> str:  # type: ignore[type-arg]
            if not rec:
                return "not run"
            if not rec.get("converts"):
                return f"fails (exit {rec.get('exit_code')})"
            verdict = "" if rec.get("passes") is None else (" PASS" if rec["passes"] else " fail")
            return f"{zt.fmt(zt.worst_cosine(rec), 4)} / {zt.primary_metric(meta, rec)}{verdict}"
        child = tf.get("child") or {}
        lines.append("| " + " | ".join([
            r["model"], "yes" if tf.get("converts") else ("not run" if not tf else "**no**"),
            zt.ops_left_float(tf) if tf.get("converts") else "n/a",
            zt.fmt(zt.worst_cosine(tf), 4) if tf.get("converts") else "n/a",
            (zt.primary_metric(meta, tf) + ("" if tf.get("passes") is None else (" PASS" if tf["passes"] else " fail")))
            if tf.get("converts") else "n/a",
            cell(tg.get("tensorrt") or {}), cell(tg.get("ascend") or {}), cell(tg.get("onnxruntime") or {}),
            zt.fmt(child.get("wall_seconds"), 0), zt.fmt(child.get("peak_rss_mib"), 0)]) + " |")
        if tf and not tf.get("converts"):
            notes.append(f"- `{r['model']}` tflite: {zt.error_cell(tf, 240)}")
    lines += ["", "## TFLite failures (first line of each error)", ""] + (notes or ["none"])
    lines += zt.not_run(recs)
    lines += ["", "## The zoo", "", "| model | domain | weights | inputs | outputs (kind) | passing |",
              "|---|---|---|---|---|---|"]
    for r in recs:
        m = r.get("meta") or {}
        lines.append(f"| {r['model']} | {m.get('domain', 'n/a')} | {m.get('weights', 'n/a')} | {m.get('inputs', 'n/a')}"
                     + "".join(f"; {x}" for x in m.get("notes") or []) + " | "
                     + ", ".join(f"`{k}` ({v})" for k, v in (m.get("outputs") or {}).items()) + " | "
                     + ", ".join(f"{k} {op} {thr}" for k, (op, thr) in (m.get("passing") or {}).items()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run benchmarks/zoo_run.py first (whole zoo)")
    ap.add_argument("--results", type=Path, default=zt.RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--baseline", default="", help="a sentence on which code was measured")
    a = ap.parse_args(argv)
    if a.run:
        from benchmarks import zoo_run

        if zoo_run.main(["--out", str(a.results)]) != 0:
            return 1
    return zt.write_table("tflite_zoo", a.results, a.out, a.baseline, render)


if __name__ == "__main__":
    sys.exit(main())
