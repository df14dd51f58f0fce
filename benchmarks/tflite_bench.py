"""TFLite benchmark: deployer's plan-driven full-integer `.tflite` vs onnx2tf ``-oiqt`` vs ai-edge-quantizer.

One run, same data for everyone: the example's calibration samples (deployer's plan, onnx2tf's
``-cind`` file, ai-edge-quantizer's calibration set) and its held-out samples (top-1 agreement with the
FP32 ONNX reference). Size ratios are against the FP32 ``.tflite`` built by the same TFLite converter
from the same TF translation (``model_fp32.tflite``). Latency: LiteRT interpreter, XNNPACK, 1 thread,
batch 1, median of ``--runs`` invokes after warm-up.

    python benchmarks/tflite_bench.py                     # efficientnet-lite0 and mnist
    python benchmarks/tflite_bench.py --models mnist --out /tmp/b.md

Peers run where they are installed: onnx2tf from ``--onnx2tf-venv`` (a separate venv, DESIGN.md section
3: it pins old TF/NumPy/ONNX and is installed there with --no-deps on the current stack), and
ai-edge-quantizer from this venv. A peer that cannot run is recorded with the reason.

The onnx2tf venv used for the results (onnx2tf's own pins are TF 2.19 / NumPy 1.26 / ONNX 1.19; its
onnx-graphsurgeon 0.5.8 pin fails on ONNX 1.23, 0.6.1 works):

    python3.11 -m venv /tmp/onnx2tf-venv
    .venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
        > /tmp/onnx2tf-venv/lib/python3.11/site-packages/main_venv.pth   # reuse this venv's TF stack
    /tmp/onnx2tf-venv/bin/pip install --no-deps onnx2tf==1.29.24 onnxsim==0.4.36 onnx-graphsurgeon==0.6.1 \
        sng4onnx psutil tf-keras==2.21.0 opencv-python-headless
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from backends.base import LoweringContext, onnx_runner  # noqa: E402
from backends.tflite.backend import TFLiteBackend, measure_latency, tflite_runner  # noqa: E402
from deployer.examples import get_example  # noqa: E402
from deployer.pipeline import DeployOptions, compute_statistics, load_inputs, make_plan  # noqa: E402
from deployer.recovery import apply_bias_correction  # noqa: E402

# How each example's float input relates to pixels in [0, 1], NHWC (onnx2tf's -cind convention):
# model_input = (pixels - mean) / std
PIXELS = {"efficientnet-lite0": (127.0 / 255.0, 128.0 / 255.0), "mnist": (0.0, 1.0)}


def top1(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    return float(np.mean([np.argmax(r[0]) == np.argmax(g[0]) for r, g in zip(ref, got)]))


def run_onnx2tf(model_path: Path, calib_nhwc: np.ndarray, input_name: str, mean: float, std: float,
                work: Path, venv: Path, timeout: int) -> Path:
    """onnx2tf -oiqt with our calibration samples; returns its full-integer (int8 I/O) .tflite."""
    exe = venv / "bin" / "onnx2tf"
    if not exe.exists():
        raise RuntimeError(f"onnx2tf not installed at {exe}")
    c = calib_nhwc.shape[-1]
    np.save(work / "calib.npy", calib_nhwc.astype(np.float32))
    # onnx2tf downloads this sample file for image inputs unless it is present (DESIGN.md section 3)
    np.save(work / "calibration_image_sample_data_20x128x128x3_float32.npy", np.zeros((20, 128, 128, 3), np.float32))
    argv = [str(exe), "-i", str(model_path), "-o", str(work / "out"), "-oiqt",
            "-cind", input_name, str(work / "calib.npy"), json.dumps([[[[mean] * c]]]), json.dumps([[[[std] * c]]])]
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}")
    p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    found = sorted((work / "out").glob("*_full_integer_quant.tflite"))
    if p.returncode != 0 or not found:
        raise RuntimeError(f"onnx2tf exit {p.returncode}: {(p.stdout + p.stderr)[-800:]}")
    return found[0]


def run_aeq(fp32_tflite: Path, calib_nhwc: list[np.ndarray], out: Path) -> Path:
    """ai-edge-quantizer, default static int8 recipe (static_wi8_ai8), calibrated on the same samples."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    it = Interpreter(model_path=str(fp32_tflite))
    sigs = it.get_signature_list()
    key = next(iter(sigs))
    in_name = sigs[key]["inputs"][0]
    q = quantizer.Quantizer(str(fp32_tflite), recipe.static_wi8_ai8())
    cal = q.calibrate({key: [{in_name: x} for x in calib_nhwc]}, num_threads=1)
    res = q.quantize(cal, enable_progress_report=False)
    out.write_bytes(bytes(res.quantized_model))
    return out


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    opts = DeployOptions(calib_samples=args.calib_samples, heldout_samples=args.heldout_samples, no_cache=True,
                         backend_options={"tflite_latency_runs": args.runs})
    inputs = load_inputs(name, None, opts)
    data = get_example(name).build(args.calib_samples, args.heldout_samples, 0) if name == "mnist" else None
    stats = compute_statistics(inputs, opts)
    plan = make_plan(inputs, stats, opts)
    ref_out = onnx_runner(inputs.reference)(inputs.heldout)
    in_name = inputs.reference.graph.input[0].name
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)
    prepared = apply_bias_correction(inputs.reference, plan.bias_correction)
    ctx = LoweringContext(prepared, plan, mdir, inputs.calibration, dict(opts.backend_options),
                          fp32_reference=inputs.reference)
    art = TFLiteBackend().lower(ctx)
    assert art.run is not None and art.fp32_run is not None and art.fp32_path is not None
    fp32_size = art.fp32_path.stat().st_size
    lat = art.extra["latency_ms"]
    sample = [np.transpose(inputs.calibration[0][in_name], (0, 2, 3, 1))]
    rows: dict[str, Any] = {
        "FP32 .tflite (same converter)": {"top1": top1(ref_out, art.fp32_run(inputs.heldout)), "size": fp32_size,
                                          "latency_ms": lat["fp32"], "io": "float32"},
        "deployer (plan ranges)": {"top1": top1(ref_out, art.run(inputs.heldout)), "size": art.path.stat().st_size,
                                   "latency_ms": lat["artifact"], "io": art.extra["io"]["inputs"][0]["dtype"],
                                   "tensors_without_plan_range": len(art.extra["tensors_without_plan_range"]),
                                   "float_ops": len(art.extra["float_ops"])},
    }
    calib_nhwc = [np.transpose(s[in_name], (0, 2, 3, 1)) for s in inputs.calibration]
    mean, std = PIXELS[name]
    try:
        p = run_onnx2tf(Path(_save(inputs.reference, mdir / "model.onnx")),
                        np.concatenate(calib_nhwc) * std + mean, in_name, mean, std, mdir / "onnx2tf",
                        Path(args.onnx2tf_venv), args.peer_timeout) if _mkdir(mdir / "onnx2tf") else None
        assert p is not None
        rows["onnx2tf -oiqt"] = {"top1": top1(ref_out, tflite_runner(p, inputs.reference, "nhwc")(inputs.heldout)),
                                 "size": p.stat().st_size, "latency_ms": measure_latency(p, sample, args.runs),
                                 "io": "int8"}
    except Exception as e:  # record why a peer could not run
        rows["onnx2tf -oiqt"] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
    try:
        p = run_aeq(art.fp32_path, calib_nhwc, mdir / "aeq_static_wi8_ai8.tflite")
        rows["ai-edge-quantizer static_wi8_ai8"] = {
            "top1": top1(ref_out, tflite_runner(p, inputs.reference, "nhwc")(inputs.heldout)),
            "size": p.stat().st_size, "latency_ms": measure_latency(p, sample, args.runs), "io": "float32"}
    except Exception as e:
        traceback.print_exc()
        rows["ai-edge-quantizer static_wi8_ai8"] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
    for r in rows.values():
        if "size" in r:
            r["size_ratio"] = round(r["size"] / fp32_size, 4)
    result: dict[str, Any] = {"model": name, "calib": len(inputs.calibration), "heldout": len(inputs.heldout),
                              "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                              "deployer_notes": art.notes}
    if data is not None and data.metric is not None:
        result["label_accuracy"] = {"fp32": data.metric(ref_out)["label_accuracy"],
                                    "deployer": data.metric(art.run(inputs.heldout))["label_accuracy"]}
    return result


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def _mkdir(p: Path) -> bool:
    p.mkdir(parents=True, exist_ok=True)
    return True


def to_markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    for r in results:
        lines += [f"### {r['model']} ({r['calib']} calibration / {r['heldout']} held-out samples, {r['seconds']} s)", "",
                  "| route | I/O | top-1 agreement with FP32 | size | size vs FP32 .tflite | latency ms (XNNPACK, 1 thread) "
                  "| speed-up vs FP32 |",
                  "|---|---|---|---|---|---|---|"]
        fp32_lat = next(iter(r["rows"].values()))["latency_ms"]
        for route, row in r["rows"].items():
            if "error" in row:
                lines.append(f"| {route} | - | could not run: {row['error'][:300].replace('|', '/')} | | | | |")
                continue
            lines.append(f"| {route} | {row['io']} | {row['top1']:.3f} | {row['size'] / 1e6:.2f} MB | "
                         f"{100 * row['size_ratio']:.1f}% | {row['latency_ms']:.2f} | {fp32_lat / row['latency_ms']:.2f}x |")
        if "label_accuracy" in r:
            la = r["label_accuracy"]
            lines += ["", f"Label accuracy on the held-out digits: FP32 {la['fp32']:.3f}, deployer {la['deployer']:.3f}."]
        lines += ["", "deployer notes: " + "; ".join(r["deployer_notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet-lite0,mnist")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--heldout-samples", type=int, default=300)
    p.add_argument("--runs", type=int, default=20, help="timed invokes per latency (median)")
    p.add_argument("--onnx2tf-venv", default="/tmp/onnx2tf-venv")
    p.add_argument("--peer-timeout", type=int, default=1800)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tflite.md"))
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tflite-bench-"))
    results = []
    try:
        for name in a.models.split(","):
            results.append(bench_model(name.strip(), a, work))
            print(json.dumps(results[-1], indent=1, default=str), flush=True)
            write(results, a)  # after each model: a long run keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}")
    return 0


def write(results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    import platform

    header = (f"## TFLite benchmark\n\n`python benchmarks/tflite_bench.py --models {a.models} --calib-samples "
              f"{a.calib_samples} --heldout-samples {a.heldout_samples} --runs {a.runs}` on {platform.machine()}, "
              f"{os.cpu_count()} CPU cores (shared with other jobs: latency is indicative; the ratio is what matters).\n"
              f"Every route gets the same calibration samples; top-1 agreement is against the FP32 ONNX model on the "
              f"held-out samples; sizes are against the FP32 `.tflite` from the same converter.")
    Path(a.out).write_text(to_markdown(results, header), encoding="utf-8")
    Path(a.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
