"""ONNX Runtime CPU target on real models: ours (static QDQ from the plan, dynamic) vs ONNX Runtime's own
``quantize_static`` and ``quantize_dynamic`` defaults on the same model, same calibration and held-out
data, fidelity and throughput (queries/s) in one run.

    python benchmarks/onnxruntime_bench.py --models efficientnet-lite0,minilm --out benchmarks/results/onnxruntime.json

Throughput: batch 1 and 32, 1 and 2 intra-op threads, median of ``--repeats`` timed runs per model, all
variants timed in alternation (the machine may be shared). Models are re-exported with a dynamic batch
(and, for MiniLM, sequence) axis; MiniLM batches are padded to their longest text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import LoweringContext  # noqa: E402
from backends.onnxruntime.backend import OnnxRuntimeBackend, cpu_features  # noqa: E402
from backends.onnxruntime.throughput import (BENCHMARK_GRID, Setting, concat_batcher, measure_pair,  # noqa: E402
                                            session)
from deployer.model_io import canonicalize  # noqa: E402
from deployer.plan import QuantPlan  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan  # noqa: E402
from deployer.recovery import prepare_for_lowering  # noqa: E402
from deployer.verify import cosine_mean, top1_agreement  # noqa: E402


def export_dynamic(module, example: dict, outputs: list[str], axes: dict) -> onnx.ModelProto:
    import io

    import torch

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), tuple(torch.from_numpy(v) for v in example.values()), buf, dynamo=False,
                          opset_version=17, input_names=list(example), output_names=outputs,
                          dynamic_axes=axes, do_constant_folding=True)
    return canonicalize(onnx.load_model_from_string(buf.getvalue()))


def text_batcher(samples):
    b = concat_batcher(samples)
    width = max(1, int(b["attention_mask"].sum(axis=1).max()))
    return {k: v[:, :width] for k, v in b.items()}


# deployer variants per model: (label, recipe, smoothquant alpha or None = the recipe's choice, backend options).
# MiniLM: the default int8 plan, the same with SmoothQuant 0.8, the mixed recipe (attention and the residual
# Add before each LayerNorm kept float: FP32 islands on this CPU provider) and dynamic quantization, with
# the default U8U8 kernels and with U8S8 7-bit weights (ort_kernels="u8s8", reduce_range).
VARIANTS = {
    "efficientnet-lite0": [("deployer static", "int8", None, {"ort_mode": "static"}),
                           ("deployer static (stem conv FP32)", "int8+stem-fp32", None, {"ort_mode": "static"}),
                           ("deployer dynamic", "int8", None, {"ort_mode": "dynamic"})],
    "minilm": [("deployer static", "int8", None, {"ort_mode": "static"}),
               ("deployer static +SmoothQuant 0.8", "int8", 0.8, {"ort_mode": "static"}),
               ("deployer static mixed", "mixed", None, {"ort_mode": "static"}),
               ("deployer dynamic", "int8", None, {"ort_mode": "dynamic"}),
               ("deployer dynamic u8s8 7-bit", "int8", None, {"ort_mode": "dynamic", "ort_kernels": "u8s8"})],
}
ORT_DEFAULTS = ("ort quantize_static (defaults)", "ort quantize_dynamic (defaults)")


def stem_fp32_recipe(model: onnx.ModelProto, work: Path) -> str:
    """A rules file (``deploy --recipe FILE``): int8, with the first Conv reading a graph input in FP32."""
    import re

    inputs = {i.name for i in model.graph.input}
    stem = next(n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs)
    path = work / "stem-fp32.json"
    path.write_text(json.dumps({"base": "int8", "rules": [
        {"match": {"name": f"^{re.escape(stem)}$"}, "precision": "fp32", "label": "stem conv in FP32"}]}))
    return str(path)


def loadavg() -> list[float]:
    return [float(v) for v in open("/proc/loadavg").read().split()[:3]]


def load(name: str, n_calib: int, n_held: int):
    if name == "efficientnet-lite0":
        from deployer.examples import efficientnet as ex

        data = ex.build(n_calib, n_held, 0)
        model = export_dynamic(ex.load_module(), {"input": np.zeros((1, 3, 224, 224), np.float32)}, ["logits"],
                               {"input": {0: "batch"}, "logits": {0: "batch"}})
        return data, model, concat_batcher
    from deployer.examples import minilm as ex

    data = ex.build(n_calib, max(n_held, ex.MIN_HELDOUT), 0)
    module, _ = ex.load_module()
    dummy = {"input_ids": np.zeros((1, ex.SEQ), np.int64), "attention_mask": np.ones((1, ex.SEQ), np.int64)}
    model = export_dynamic(module, dummy, ["embedding"], {"input_ids": {0: "batch", 1: "seq"},
                                                          "attention_mask": {0: "batch", 1: "seq"},
                                                          "embedding": {0: "batch"}})
    return data, model, text_batcher


def ort_defaults(model: onnx.ModelProto, calib, work: Path, wanted) -> dict[str, tuple[onnx.ModelProto, float]]:
    """ONNX Runtime's quantize_static (QDQ, MinMax, uint8 activations, int8 weights, per-tensor) and
    quantize_dynamic (int8 weights, per-tensor) with their default arguments."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(calib))

        def get_next(self):
            return next(self.it, None)

    src = work / "fp32.onnx"
    onnx.save(model, str(src))
    out = {}
    if wanted(ORT_DEFAULTS[0]):
        t = time.perf_counter()
        quantize_static(str(src), str(work / "ort_static.onnx"), Reader())
        out[ORT_DEFAULTS[0]] = (onnx.load(str(work / "ort_static.onnx")), time.perf_counter() - t)
    if wanted(ORT_DEFAULTS[1]):
        t = time.perf_counter()
        quantize_dynamic(str(src), str(work / "ort_dynamic.onnx"))
        out[ORT_DEFAULTS[1]] = (onnx.load(str(work / "ort_dynamic.onnx")), time.perf_counter() - t)
    return out


def run_model(name: str, args, work: Path) -> dict:
    t0 = time.perf_counter()
    data, model, batcher = load(name, args.calib, args.heldout)
    held = list(data.heldout)
    base = DeployOptions(calib_samples=args.calib, heldout_samples=args.heldout, no_cache=True)
    inputs = Inputs(model, data.calibration, data.heldout, data.task, f"example:{name}", data.split)
    stats = compute_statistics(inputs, base)
    variants: dict[str, tuple[onnx.ModelProto, float]] = {"fp32": (model, 0.0)}
    def wanted(label: str) -> bool:
        return not args.only or label in args.only.split(",")

    for label, recipe, alpha, backend_options in VARIANTS[name]:
        if not wanted(label):
            continue
        d = work / label.replace(" ", "_").replace("+", "")
        d.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if recipe == "int8+stem-fp32":
            recipe = stem_fp32_recipe(model, work)
        opts = dataclasses.replace(base, recipe=recipe, smoothquant=alpha)
        plan = make_plan(inputs, stats, opts)
        art = OnnxRuntimeBackend().lower(LoweringContext(prepare_for_lowering(model, plan), plan, d, data.calibration,
                                                        {**backend_options, "ort_throughput": False},
                                                        fp32_reference=model))
        variants[label] = (onnx.load(str(art.path)), time.perf_counter() - t)
        print(name, label, "lowered", flush=True)
    for spec in args.plan_variant:  # LABEL=PLAN.json: a plan written by `deploy` (same node names) lowered here
        label, path = spec.split("=", 1)
        if label.startswith(f"{name}:"):
            label = label.split(":", 1)[1]
            plan = QuantPlan.load(path)
            d = work / "plan-variant"
            d.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            art = OnnxRuntimeBackend().lower(LoweringContext(prepare_for_lowering(model, plan), plan, d,
                                                            data.calibration, {"ort_throughput": False},
                                                            fp32_reference=model))
            variants[label] = (onnx.load(str(art.path)), time.perf_counter() - t)
    variants.update(ort_defaults(model, data.calibration, work, wanted))
    rows = {}
    ref = None
    for label, (m, secs) in variants.items():
        sess = session(m, 2)
        names = [o.name for o in sess.get_outputs()]
        # each held-out sample alone, text trimmed to its own length (what a batch-1 query looks like)
        outs = [[np.asarray(v, np.float32) for v in sess.run(names, batcher([s]))] for s in held]
        y = np.concatenate([o[0] for o in outs])
        if ref is None:
            ref = y
        r = {"lower_seconds": round(secs, 1), "size_mb": round(len(m.SerializeToString()) / 1e6, 2)}
        if data.task == "classification":
            r["top1_agreement"] = round(top1_agreement(ref, y), 4)
        else:
            r["cosine"] = round(cosine_mean(ref, y), 4)
        if data.metric is not None:
            r.update(data.metric(outs))
        rows[label] = r
        print(name, label, r, flush=True)
    grid = []
    labels = list(variants)
    grid_settings = [Setting(*map(int, g.split("x"))) for g in args.grid.split(",")] if args.grid else BENCHMARK_GRID
    for s in grid_settings:
        before = loadavg()
        qps = measure_pair([variants[k][0] for k in labels], held, s, args.repeats, args.min_seconds, batcher)
        row = {"batch": s.batch, "threads": s.threads, **{k: round(q, 2) for k, q in zip(labels, qps)},
               "load_average_1min": [before[0], loadavg()[0]]}
        grid.append(row)
        print(name, row, flush=True)
    return {"model": name, "split": data.split, "heldout": len(held), "calibration": args.calib,
            "repeats": args.repeats, "min_seconds": args.min_seconds, "fidelity": rows, "throughput_qps": grid,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="efficientnet-lite0,minilm")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--only", default="", help="comma-separated variant labels (FP32 always; default: all)")
    p.add_argument("--grid", default="", help="settings BATCHxTHREADS, comma-separated (default 1x1,1x2,32x1,32x2)")
    p.add_argument("--plan-variant", action="append", default=[],
                   help="MODEL:LABEL=PLAN.json: also lower a plan written by deploy (e.g. with --fidelity-target)")
    p.add_argument("--out", default="benchmarks/results/onnxruntime.json")
    p.add_argument("--work", default="/tmp/ort-bench")
    a = p.parse_args()
    logging.getLogger().setLevel(logging.WARNING)  # ONNX Runtime's quantizer logs INFO lines per node
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"cpu": cpu_features(), "load_average_start": loadavg(), "models": []}
    for name in a.models.split(","):
        res["models"].append(run_model(name, a, work / name))
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    res["load_average_end"] = loadavg()
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
