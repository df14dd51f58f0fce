"""TensorRT target on EfficientNet-Lite0: fidelity of the strongly typed graph (run in ONNX Runtime, graph
optimizations off) for plan variants, chosen on calibration data only.

Usage: python benchmarks/tensorrt_bench.py [--sensitivity K]

Selection protocol (no held-out leakage): every variant is scored on a *selection* subset of the
calibration crops (top-1 agreement and logit SQNR vs FP32); the held-out score is printed for each but
never used to choose. ``--sensitivity K`` measures, on 32 calibration crops, the logit MSE vs FP32 when
each INT8 Conv alone is moved to FP16, and keeps the K most sensitive in FP16.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from backends.base import onnx_runner
from backends.tensorrt.backend import lower_strongly_typed
from backends.tensorrt.checker import check_model
from deployer.pipeline import DeployOptions, compute_statistics, load_inputs, make_plan
from deployer.plan import NodeDecision, Precision, QuantPlan
from deployer.recovery import prepare_for_lowering


def top1(ref, got) -> float:
    return float(np.mean([np.argmax(r[0]) == np.argmax(g[0]) for r, g in zip(ref, got)]))


def sqnr(ref, got) -> float:
    x = np.concatenate([r[0].ravel() for r in ref]).astype(np.float64)
    y = np.concatenate([g[0].ravel() for g in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2)))


def with_fp16(plan: QuantPlan, names: list[str], reason: str) -> QuantPlan:
    """The plan with ``names`` in FP16 (and no bias correction for them: it corrects INT8 error)."""
    nodes = dict(plan.nodes)
    for n in names:
        nodes[n] = NodeDecision(nodes[n].op_type, Precision.FP16, None, reason)
    bc = {k: v for k, v in plan.bias_correction.items() if k not in names}
    return plan.with_nodes(nodes).with_bias_correction(bc)


def cosine_mean(ref, got) -> float:
    return float(np.mean([float(r[0].ravel() @ g[0].ravel() / (np.linalg.norm(r[0]) * np.linalg.norm(g[0])))
                          for r, g in zip(ref, got)]))


MINILM_GROUPS = {"ffn_down": r"layer\.\d+/output/dense/", "ffn_up": r"/intermediate/dense/",
                 "attn_out": r"/attention/output/dense/", "qkv": r"/(query|key|value)/"}


def minilm(groups: list[str]) -> None:
    """MiniLM, ``mixed`` recipe: mean cosine of the embedding vs FP32 when MatMul groups are moved to FP16.

    Groups are scored on 48 calibration texts; the held-out cosine is printed for the base plan and for
    ``groups`` (chosen from the calibration scores)."""
    import re

    opts = DeployOptions(recipe="mixed")
    inputs = load_inputs("minilm", None, opts)
    plan = make_plan(inputs, compute_statistics(inputs, opts), opts)
    select = list(inputs.calibration)[:48]
    ref_run = onnx_runner(inputs.reference)
    ref_sel = ref_run(select)

    def run(p, data):
        model, _ = lower_strongly_typed(prepare_for_lowering(inputs.reference, p), p)
        return onnx_runner(model, optimize=False)(data)

    def group_nodes(names):
        return [n for n, d in plan.nodes.items() if d.op_type in ("MatMul", "Gemm") and d.precision == Precision.INT8
                and any(re.search(MINILM_GROUPS[g], n) for g in names)]

    print(f"minilm mixed base: select cosine {cosine_mean(ref_sel, run(plan, select)):.4f}", flush=True)
    for g in MINILM_GROUPS:
        p = with_fp16(plan, group_nodes([g]), f"tensorrt sensitivity: {g} fp16")
        print(f"minilm mixed + {g} ({len(group_nodes([g]))} MatMul) FP16: select cosine "
              f"{cosine_mean(ref_sel, run(p, select)):.4f}", flush=True)
    if groups:
        held = list(inputs.heldout)
        ref_held = ref_run(held)
        p = with_fp16(plan, group_nodes(groups), "tensorrt sensitivity: fp16")
        print(f"minilm mixed + {groups} FP16: held-out cosine {cosine_mean(ref_held, run(p, held)):.4f} "
              f"({len(held)} texts)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensitivity", type=int, default=0)
    ap.add_argument("--minilm", default=None, help="comma-separated MatMul groups to keep FP16 on MiniLM ('' = score only)")
    ap.add_argument("--observers", default="minmax,percentile,mse,entropy")
    a = ap.parse_args()
    if a.minilm is not None:
        minilm([g for g in a.minilm.split(",") if g])
        return
    opts = DeployOptions()
    inputs = load_inputs("efficientnet-lite0", None, opts)
    stats = compute_statistics(inputs, opts)
    calib = list(inputs.calibration)
    select = calib[::2][:128]
    held = list(inputs.heldout)
    ref_run = onnx_runner(inputs.reference)
    ref_sel, ref_held = ref_run(select), ref_run(held)

    def score(plan, label: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        model, rec = lower_strongly_typed(prepare_for_lowering(inputs.reference, plan), plan)
        errors = [f for f in check_model(model) if f.severity == "error"]
        run = onnx_runner(model, optimize=False)
        got_sel, got_held = run(select), run(held)
        s = (top1(ref_sel, got_sel), sqnr(ref_sel, got_sel))
        print(f"{label:<40} select top1 {s[0]:.4f} SQNR {s[1]:.2f} dB | held-out top1 {top1(ref_held, got_held):.4f} "
              f"SQNR {sqnr(ref_held, got_held):.2f} dB | checker errors {len(errors)} | "
              f"{len(rec.activations)} act / {len(rec.weights)} w / {len(rec.fp16_nodes)} fp16 | "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        return s

    plans = {}
    for obs in a.observers.split(","):
        plans[obs] = make_plan(inputs, stats, DeployOptions(observer=obs))
        score(plans[obs], f"int8 observer={obs}")
    base = plans[a.observers.split(",")[0]]
    first_input = [i.name for i in inputs.reference.graph.input][0]
    score(base.with_ranges({k: v for k, v in base.ranges.items() if k != first_input}),
          "int8, graph input not quantized")
    if a.sensitivity:
        sens_set = calib[1::8][:32]
        ref_s = ref_run(sens_set)
        convs = [n for n, d in base.nodes.items() if d.op_type == "Conv" and d.precision == Precision.INT8]
        mse = {}
        for n in convs:
            p = with_fp16(base, [n], "sensitivity probe")
            model, _ = lower_strongly_typed(prepare_for_lowering(inputs.reference, p), p)
            got = onnx_runner(model, optimize=False)(sens_set)
            mse[n] = float(np.mean([np.mean((r[0] - g[0]) ** 2) for r, g in zip(ref_s, got)]))
        ranked = sorted(mse, key=lambda n: mse[n])
        print("most sensitive (lowest logit MSE when kept FP16):", [(n, round(mse[n], 4)) for n in ranked[:5]])
        for k in range(1, a.sensitivity + 1):
            score(with_fp16(base, ranked[:k], "tensorrt sensitivity: fp16"), f"int8 + {k} most sensitive Conv in FP16")


if __name__ == "__main__":
    main()
