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
from deployer.pipeline import DeployOptions, compute_statistics, equalized, load_inputs, make_plan  # noqa: E402
from deployer.recovery import prepare_for_lowering  # noqa: E402

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


def with_signature(tflite_path: Path, out: Path) -> Path:
    """The same float model with a ``serving_default`` SignatureDef (ai-edge-quantizer calibrates through
    signatures; the converter's ``from_concrete_functions`` output has none). Tensors and buffers unchanged."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_path.read_bytes()))
    if not model.signatureDefs:
        sg = model.subgraphs[0]

        def tensor_map(indices: Any) -> list[Any]:
            maps = []
            for i in indices:
                m = schema.TensorMapT()
                m.name, m.tensorIndex = sg.tensors[int(i)].name, int(i)
                maps.append(m)
            return maps

        sig = schema.SignatureDefT()
        sig.inputs, sig.outputs = tensor_map(sg.inputs), tensor_map(sg.outputs)
        sig.signatureKey, sig.subgraphIndex = "serving_default", 0
        model.signatureDefs = [sig]
    out.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return out


def run_aeq(fp32_tflite: Path, calib_nhwc: list[np.ndarray], out: Path) -> Path:
    """ai-edge-quantizer, default static int8 recipe (static_wi8_ai8), calibrated on the same samples."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    src = with_signature(fp32_tflite, out.with_name("fp32_with_signature.tflite"))
    sigs = Interpreter(model_path=str(src)).get_signature_list()
    key = next(iter(sigs))
    in_name = sigs[key]["inputs"][0]
    q = quantizer.Quantizer(str(src), recipe.static_wi8_ai8())
    cal = q.calibrate({key: [{in_name: x} for x in calib_nhwc]}, num_threads=1)
    res = q.quantize(cal, enable_progress_report=False)
    out.write_bytes(bytes(res.quantized_model))
    return out


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    # the plan exactly as `deploy --model NAME --target tflite` computes and lowers it
    opts = DeployOptions(calib_samples=args.calib_samples, heldout_samples=args.heldout_samples, no_cache=True,
                         backend_options={"tflite_latency_runs": 0})  # latency: interleaved below, every route
    inputs = equalized(load_inputs(name, None, opts), opts)
    stats = compute_statistics(inputs, opts)
    plan = make_plan(inputs, stats, opts)
    ref_out = onnx_runner(inputs.reference)(inputs.heldout)
    in_name = inputs.reference.graph.input[0].name
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)
    ctx = LoweringContext(prepare_for_lowering(inputs.reference, plan), plan, mdir, inputs.calibration,
                          dict(opts.backend_options), fp32_reference=inputs.reference)
    art = TFLiteBackend().lower(ctx)
    assert art.run is not None and art.fp32_run is not None and art.fp32_path is not None
    print(f"[{name}] deployer lowered ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    fp32_size = art.fp32_path.stat().st_size
    paths: dict[str, Path] = {"FP32 .tflite (same converter)": art.fp32_path, "deployer (plan ranges)": art.path}
    rows: dict[str, Any] = {
        "FP32 .tflite (same converter)": {"top1": top1(ref_out, art.fp32_run(inputs.heldout)), "size": fp32_size,
                                          "io": _io(art.fp32_path)},
        "deployer (plan ranges)": {"top1": top1(ref_out, art.run(inputs.heldout)), "size": art.path.stat().st_size,
                                   "io": _io(art.path),
                                   "tensors_without_plan_range": len(art.extra["tensors_without_plan_range"]),
                                   "float_ops": len(art.extra["float_ops"])},
    }
    calib_nhwc = [np.transpose(s[in_name], (0, 2, 3, 1)) for s in inputs.calibration]
    mean, std = PIXELS[name]
    route = "onnx2tf -oiqt"
    try:
        t1 = time.perf_counter()
        o2t = mdir / "onnx2tf"
        o2t.mkdir(parents=True, exist_ok=True)
        p = run_onnx2tf(_save(inputs.reference, mdir / "model.onnx"), np.concatenate(calib_nhwc) * std + mean,
                        in_name, mean, std, o2t, Path(args.onnx2tf_venv), args.peer_timeout)
        rows[route] = {"top1": top1(ref_out, tflite_runner(p, inputs.reference, "nhwc")(inputs.heldout)),
                       "size": p.stat().st_size, "io": _io(p), "seconds": round(time.perf_counter() - t1, 1)}
        paths[route] = p
    except Exception as e:  # record why a peer could not run
        traceback.print_exc()
        rows[route] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
    print(f"[{name}] onnx2tf done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    route = "ai-edge-quantizer static_wi8_ai8"
    try:
        t1 = time.perf_counter()
        p = run_aeq(art.fp32_path, calib_nhwc, mdir / "aeq_static_wi8_ai8.tflite")
        rows[route] = {"top1": top1(ref_out, tflite_runner(p, inputs.reference, "nhwc")(inputs.heldout)),
                       "size": p.stat().st_size, "io": _io(p), "seconds": round(time.perf_counter() - t1, 1)}
        paths[route] = p
    except Exception as e:
        traceback.print_exc()
        rows[route] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
    print(f"[{name}] ai-edge-quantizer done ({time.perf_counter() - t0:.0f} s); latency ...", file=sys.stderr,
          flush=True)
    # latency: every route in each round, so load changes on a shared machine hit all routes alike
    sample = [calib_nhwc[0]]
    per_round: dict[str, list[float]] = {r: [] for r in paths}
    for _ in range(args.rounds):
        for r, path in paths.items():
            per_round[r].append(measure_latency(path, sample, args.runs))
    for r, ms in per_round.items():
        rows[r]["latency_ms"] = round(float(np.median(ms)), 3)
        rows[r]["latency_rounds_ms"] = ms
    for r in rows.values():
        if "size" in r:
            r["size_ratio"] = round(r["size"] / fp32_size, 4)
    result: dict[str, Any] = {"model": name, "calib": len(inputs.calibration), "heldout": len(inputs.heldout),
                              "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                              "deployer_notes": art.notes}
    if inputs.metric is not None:
        fp32_m, dep_m = inputs.metric(ref_out), inputs.metric(art.run(inputs.heldout))
        if "label_accuracy" in fp32_m:
            result["label_accuracy"] = {"fp32": fp32_m["label_accuracy"], "deployer": dep_m["label_accuracy"]}
    return result


def _io(path: Path) -> str:
    """The model's input dtype as LiteRT sees it."""
    from ai_edge_litert.interpreter import Interpreter

    return str(np.dtype(Interpreter(model_path=str(path)).get_input_details()[0]["dtype"]).name)


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


BEGIN, END = "<!-- tflite_bench: begin (generated) -->", "<!-- tflite_bench: end -->"
DEPLOYER, FP32 = "deployer (plan ranges)", "FP32 .tflite (same converter)"


def goals(r: dict[str, Any]) -> list[str]:
    """Issue #5's EfficientNet-Lite0 goals, each stated as met or not met with the measured numbers."""
    rows = r["rows"]
    dep, fp32 = rows[DEPLOYER], rows[FP32]
    peers = {k: v for k, v in rows.items() if k not in (DEPLOYER, FP32)}
    ran = {k: v["top1"] for k, v in peers.items() if "top1" in v}
    failed = [k for k, v in peers.items() if "error" in v]
    ok1 = dep["top1"] >= 0.95 and all(dep["top1"] >= t for t in ran.values())
    peer_txt = ", ".join(f"{k} {t:.3f}" for k, t in ran.items()) or "no peer ran"
    if failed:
        peer_txt += "; could not run: " + ", ".join(failed)
    speed = fp32["latency_ms"] / dep["latency_ms"]
    return [
        f"- Top-1 agreement >= 0.95 and at least as high as either peer: **{'met' if ok1 else 'NOT met'}** "
        f"(deployer {dep['top1']:.3f}; {peer_txt}).",
        f"- Size <= 27% of the FP32 `.tflite`: **{'met' if dep['size_ratio'] <= 0.27 else 'NOT met'}** "
        f"({100 * dep['size_ratio']:.1f}%: {dep['size'] / 1e6:.2f} MB vs {fp32['size'] / 1e6:.2f} MB).",
        f"- INT8 latency >= 1.5x faster than FP32 (XNNPACK, 1 thread, batch 1): **{'met' if speed >= 1.5 else 'NOT met'}** "
        f"({speed:.2f}x: median {dep['latency_ms']:.2f} ms INT8 vs {fp32['latency_ms']:.2f} ms FP32).",
    ]


def to_markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    for r in results:
        lines += [f"### {r['model']} ({r['calib']} calibration / {r['heldout']} held-out samples, {r['seconds']} s)", "",
                  "| route | input dtype | top-1 agreement with FP32 | size | size vs FP32 .tflite "
                  "| latency ms, median (per-round medians) | speed-up vs FP32 |",
                  "|---|---|---|---|---|---|---|"]
        fp32_lat = r["rows"][FP32]["latency_ms"]
        for route, row in r["rows"].items():
            if "error" in row:
                lines.append(f"| {route} | - | could not run: {' '.join(row['error'].split())[-400:].replace('|', '/')} "
                             f"| | | | |")
                continue
            rounds = ", ".join(f"{x:.3g}" for x in row["latency_rounds_ms"])
            lines.append(f"| {route} | {row['io']} | {row['top1']:.3f} | {row['size'] / 1e6:.2f} MB | "
                         f"{100 * row['size_ratio']:.1f}% | {row['latency_ms']:.2f} ({rounds}) | "
                         f"{fp32_lat / row['latency_ms']:.2f}x |")
        if "label_accuracy" in r:
            la = r["label_accuracy"]
            lines += ["", f"Label accuracy on the held-out digits: FP32 {la['fp32']:.3f}, deployer {la['deployer']:.3f}."]
        if r["model"] == "efficientnet-lite0":
            lines += ["", "Goals (issue #5):", ""] + goals(r)
        lines += ["", "deployer notes: " + "; ".join(r["deployer_notes"]), ""]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """CPU model, core count, int8 dot-product extensions, load average (the latency caveats)."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        cpu = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), "")
        flags = set(next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("flags")), []))
        info["cpu"] = model
        info["int8_dot_product"] = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni"}) or "none"
        info["avx512"] = sorted(f for f in flags if f.startswith("avx512"))[:6] or "none"
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet-lite0,mnist")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--heldout-samples", type=int, default=300)
    p.add_argument("--runs", type=int, default=20, help="timed invokes per latency round (median)")
    p.add_argument("--rounds", type=int, default=5, help="latency rounds; each round times every route once")
    p.add_argument("--onnx2tf-venv", default="/tmp/onnx2tf-venv")
    p.add_argument("--peer-timeout", type=int, default=1800)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tflite.md"),
                   help="markdown file; only the section between the generated markers is replaced")
    a = p.parse_args(argv)
    a.command = " ".join(["python", "benchmarks/tflite_bench.py"] + (sys.argv[1:] if argv is None else argv))
    a.machine_start = machine()
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

    m0, m1 = a.machine_start, machine()
    header = (f"## TFLite benchmark\n\n`{a.command}` on {platform.machine()} ({m1.get('cpu', '?')}), "
              f"{m1['cores']} CPU cores shared with other jobs; load average (1/5/15 min) "
              f"{' / '.join(map(str, m0['load_average']))} at the start, {' / '.join(map(str, m1['load_average']))} "
              f"when this was written. INT8 dot-product instructions (VNNI/AMX): {m1.get('int8_dot_product', '?')}. "
              f"Latency: LiteRT interpreter, XNNPACK, 1 thread, batch 1; median of {a.runs} invokes after 3 warm-up "
              f"invokes, in {a.rounds} rounds that each time every route once (the table gives the median of the round "
              f"medians and each round's median).\n"
              f"Every route gets the same calibration samples; top-1 agreement is against the FP32 ONNX model on the "
              f"held-out samples; sizes are against the FP32 `.tflite` from the same converter. Raw numbers: "
              f"`{Path(a.out).with_suffix('.json').name}`.")
    section = f"{BEGIN}\n{to_markdown(results, header)}\n{END}"
    out = Path(a.out)
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END):]
    else:
        new = section + "\n\n" + old
    out.write_text(new, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"command": a.command, "machine_start": m0, "machine_end": m1,
                                                    "results": results}, indent=1, default=str) + "\n",
                                        encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
