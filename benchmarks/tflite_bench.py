"""TFLite benchmark: the plan-driven full-integer ``.tflite`` (onnx2tf 2.6.9 flatbuffer_direct +
ai-edge-quantizer 0.10 fed the plan's ranges) on the built-in examples.

The plan is computed exactly as ``deploy --model NAME --target tflite`` does (default recipe, min/max,
bias correction). Measured: top-1 agreement with the FP32 ONNX model on the held-out samples (INT8 and
the FP32 ``.tflite``), size vs the FP32 ``.tflite`` of the same converter, wall time of
``TFLiteBackend.lower`` (conversion, mapping, quantization; latency measurement excluded), and INT8
vs FP32 latency (LiteRT interpreter, XNNPACK, 1 thread, batch 1, median of ``--runs`` invokes, the two
models timed in alternation ``--rounds`` times).

    python benchmarks/tflite_bench.py --models efficientnet-lite0 --out benchmarks/results/tflite.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from backends.base import LoweringContext, onnx_runner  # noqa: E402
from backends.tflite.backend import TFLiteBackend, measure_latency  # noqa: E402
from deployer.pipeline import DeployOptions, compute_statistics, equalized, load_inputs, make_plan  # noqa: E402
from deployer.recovery import prepare_for_lowering  # noqa: E402


def top1(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    return float(np.mean([np.argmax(r[0]) == np.argmax(g[0]) for r, g in zip(ref, got)]))


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in out]
    return f"{name} ({', '.join(flags)})"


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    opts = DeployOptions(calib_samples=args.calib_samples, heldout_samples=args.heldout_samples, no_cache=True,
                         backend_options={"tflite_latency_runs": 0})
    inputs = equalized(load_inputs(name, None, opts), opts)
    plan = make_plan(inputs, compute_statistics(inputs, opts), opts)
    ref_out = onnx_runner(inputs.reference)(inputs.heldout)
    ctx = LoweringContext(prepare_for_lowering(inputs.reference, plan), plan, work / name, inputs.calibration,
                          dict(opts.backend_options), fp32_reference=inputs.reference)
    t0 = time.perf_counter()
    art = TFLiteBackend().lower(ctx)
    lower_s = time.perf_counter() - t0
    assert art.run is not None and art.fp32_run is not None and art.fp32_path is not None
    lat: dict[str, list[float]] = {"fp32": [], "artifact": []}
    sample = dict(inputs.calibration[0])
    for _ in range(args.rounds):
        m = measure_latency({"fp32": art.fp32_path, "artifact": art.path}, art.extra["runtime_layout"], sample,
                            args.runs)
        lat["fp32"].append(m["fp32"])
        lat["artifact"].append(m["artifact"])
    fp32_ms, int8_ms = float(np.median(lat["fp32"])), float(np.median(lat["artifact"]))
    return {"model": name, "calib": len(inputs.calibration), "heldout": len(inputs.heldout),
            "top1_int8": top1(ref_out, art.run(inputs.heldout)), "top1_fp32_tflite": top1(ref_out,
                                                                                           art.fp32_run(inputs.heldout)),
            "size_ratio": art.path.stat().st_size / art.fp32_path.stat().st_size, "lower_s": round(lower_s, 1),
            "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
            "float_nodes": len(art.extra["float_nodes"]), "tensors_from_plan": art.extra["tensors_from_plan"],
            "without_plan_range": len(art.extra["tensors_without_plan_range"]),
            "deviations": len(art.extra["plan_deviations"]), "mapping": art.extra["mapping"] | {"rejected": len(
                art.extra["mapping"]["rejected"])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet-lite0")
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--heldout-samples", type=int, default=300)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            rows.append(bench_model(name, args, Path(d)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [f"# TFLite (onnx2tf 2.6.9 flatbuffer_direct + ai-edge-quantizer 0.10, plan ranges)", "",
             f"CPU: {cpu()}; `python benchmarks/tflite_bench.py --models {args.models} --calib-samples "
             f"{args.calib_samples} --heldout-samples {args.heldout_samples}`", "",
             "| model | calib / held-out | top-1 INT8 | top-1 FP32 .tflite | size vs FP32 | lowering s | FP32 ms | "
             "INT8 ms | speed-up | float ops | tensors from plan / own range / spec-forced |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['calib']} / {r['heldout']} | {r['top1_int8']:.3f} | "
                     f"{r['top1_fp32_tflite']:.3f} | {100 * r['size_ratio']:.1f}% | {r['lower_s']} | {r['fp32_ms']:.2f} | "
                     f"{r['int8_ms']:.2f} | {r['speedup']:.2f}x | {r['float_nodes']} | {r['tensors_from_plan']} / "
                     f"{r['without_plan_range']} / {r['deviations']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
