"""The tflite backend on models of the zoo (``benchmarks/zoo``, built on another branch), next to the
tensorrt QDQ graph lowered from the same plan.

Per model: converts?, ops left float, worst per-output cosine with FP32 on the zoo's held-out samples
(tflite and tensorrt, the latter run exactly in ONNX Runtime), the zoo's task metric, lowering time.
Reads the zoo from ``--zoo-root`` (a checkout holding ``benchmarks/zoo``); writes a Markdown table.

    python benchmarks/tflite_zoo_try.py --zoo-root /work/wt/zoo --models mnist_cnn,ppocr_det \\
        --out benchmarks/results/tflite_zoo_try.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cosine(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Worst output's mean per-sample cosine."""
    worst = 1.0
    for j in range(len(ref[0])):
        cs = []
        for r, g in zip(ref, got):
            a, b = np.ravel(r[j]).astype(np.float64), np.ravel(g[j]).astype(np.float64)
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cs.append(1.0 if na == nb == 0 else float(a @ b / (na * nb + 1e-30)))
        worst = min(worst, float(np.mean(cs)))
    return worst


def run_one(name: str, work: Path) -> dict[str, Any]:
    import onnx

    from backends.base import LoweringContext, discover, onnx_runner
    from benchmarks.zoo import build
    from calibration.collect import collect_statistics
    from calibration.dataset import CalibrationSet
    from deployer.model_io import canonicalize
    from deployer.pipeline import DeployOptions, Inputs, make_plan
    from deployer.recovery import prepare_for_lowering

    zm = build(name)
    model = canonicalize(onnx.load(str(zm.onnx_path)))
    cal, held = CalibrationSet(zm.calibration), CalibrationSet(zm.heldout)
    plan = make_plan(Inputs(model, cal, held, "generic", name, "zoo"), collect_statistics(model, cal), DeployOptions())
    ref = onnx_runner(model)(held)
    row: dict[str, Any] = {"model": name, "domain": zm.domain}
    backends = discover()
    for target in ("tflite", "tensorrt"):
        t0 = time.perf_counter()
        try:
            ctx = LoweringContext(prepare_for_lowering(model, plan), plan, work / name / target, cal,
                                  {"tflite_latency_runs": 0}, fp32_reference=model)
            art = backends[target].lower(ctx)
            assert art.run is not None
            got = art.run(held)
            row[target] = {"converts": True, "cosine": cosine(ref, got), "metric": zm.task_metric(ref, got),
                           "seconds": round(time.perf_counter() - t0, 1)}
            if target == "tflite":
                row[target]["float_ops"] = sorted({f["op"] for f in art.extra["float_nodes"]})
                row[target]["n_float"] = len(art.extra["float_nodes"])
                row[target]["input_shapes"] = art.extra["input_shapes"].get("mode")
        except Exception as e:  # noqa: BLE001 - a benchmark records every failure and goes on
            row[target] = {"converts": False, "error": " ".join(str(e).split())[:300],
                           "kind": type(e).__name__, "seconds": round(time.perf_counter() - t0, 1)}
            traceback.print_exc()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo-root", type=Path, required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(ROOT)]
    sys.path.append(str(args.zoo_root))  # benchmarks/ is a namespace package in both checkouts
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            rows.append(run_one(name, Path(d)))
            print(json.dumps(rows[-1], default=float), file=sys.stderr, flush=True)
    lines = ["# tflite on zoo models (same plan as tensorrt)", "",
             "| model | tflite converts | ops left float | tflite cosine | tensorrt cosine | tflite task metric | "
             "tflite s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t, q = r["tflite"], r["tensorrt"]
        lines.append(f"| {r['model']} | {'yes' if t['converts'] else 'no: ' + t['error'][:120]} | "
                     f"{t.get('n_float', '-')} {','.join(t.get('float_ops', []))} | "
                     f"{t.get('cosine', float('nan')):.4f} | {q.get('cosine', float('nan')):.4f} | "
                     f"{json.dumps(t.get('metric', {}), default=lambda v: round(float(v), 4))} | {t['seconds']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
