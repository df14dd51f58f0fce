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
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import LoweringContext  # noqa: E402
from backends.onnxruntime.backend import OnnxRuntimeBackend, cpu_features  # noqa: E402
from backends.onnxruntime.throughput import BENCHMARK_GRID, concat_batcher, measure_pair, session  # noqa: E402
from deployer.model_io import canonicalize  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan  # noqa: E402
from deployer.recovery import apply_bias_correction  # noqa: E402
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


def ort_defaults(model: onnx.ModelProto, calib, work: Path) -> dict[str, onnx.ModelProto]:
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
    t = time.perf_counter()
    quantize_static(str(src), str(work / "ort_static.onnx"), Reader())
    out["ort quantize_static (defaults)"] = (onnx.load(str(work / "ort_static.onnx")), time.perf_counter() - t)
    t = time.perf_counter()
    quantize_dynamic(str(src), str(work / "ort_dynamic.onnx"))
    out["ort quantize_dynamic (defaults)"] = (onnx.load(str(work / "ort_dynamic.onnx")), time.perf_counter() - t)
    return out


def run_model(name: str, args, work: Path) -> dict:
    t0 = time.perf_counter()
    data, model, batcher = load(name, args.calib, args.heldout)
    opts = DeployOptions(calib_samples=args.calib, heldout_samples=args.heldout, no_cache=True)
    inputs = Inputs(model, data.calibration, data.heldout, data.task, f"example:{name}", data.split)
    stats = compute_statistics(inputs, opts)
    plan = make_plan(inputs, stats, opts)
    prepared = apply_bias_correction(model, plan.bias_correction)
    variants: dict[str, tuple[onnx.ModelProto, float]] = {"fp32": (model, 0.0)}
    for mode in ("static", "dynamic"):
        d = work / f"{name}-{mode}"
        d.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        art = OnnxRuntimeBackend().lower(LoweringContext(prepared, plan, d, data.calibration,
                                                        {"ort_mode": mode}, fp32_reference=model))
        variants[f"deployer {mode}"] = (onnx.load(str(art.path)), time.perf_counter() - t)
    variants.update(ort_defaults(model, data.calibration, work))
    held = list(data.heldout)
    rows = {}
    ref = None
    for label, (m, secs) in variants.items():
        sess = session(m, 2)
        names = [o.name for o in sess.get_outputs()]
        outs = [[np.asarray(v, np.float32) for v in sess.run(names, s)] for s in held]
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
    for s in BENCHMARK_GRID:
        qps = measure_pair([variants[k][0] for k in labels], held, s, args.repeats, args.min_seconds, batcher)
        row = {"batch": s.batch, "threads": s.threads, **{k: round(q, 2) for k, q in zip(labels, qps)}}
        grid.append(row)
        print(name, row, flush=True)
    return {"model": name, "split": data.split, "fidelity": rows, "throughput_qps": grid,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="efficientnet-lite0,minilm")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--out", default="benchmarks/results/onnxruntime.json")
    p.add_argument("--work", default="/tmp/ort-bench")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"cpu": cpu_features(), "load_average_start": open("/proc/loadavg").read().split()[:3], "models": []}
    for name in a.models.split(","):
        res["models"].append(run_model(name, a, work / name))
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    res["load_average_end"] = open("/proc/loadavg").read().split()[:3]
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
