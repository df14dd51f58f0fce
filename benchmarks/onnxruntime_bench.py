"""ONNX Runtime CPU target on real models: ours (static QDQ from the plan in the kernel flavour chosen for
this CPU, dynamic) vs ONNX Runtime's own ``quantize_static`` (U8S8, per-tensor and per-channel weights) and
``quantize_dynamic`` on the same model, same calibration and held-out data; fidelity and speed in one run.

    python benchmarks/onnxruntime_bench.py --models efficientnet-lite0,minilm --out benchmarks/results/onnxruntime.json

Speed: every variant and FP32 are called **in alternation, one call each in turn**, on the same batches
(:func:`deployer.speed.alternate`), 1 intra-op thread; samples/s from the median wall time per call.
Settings: ``--grid`` (default EfficientNet-Lite0 batch 1 and 16, MiniLM batch 1 and 32). Models are
re-exported with a dynamic batch (and, for MiniLM, sequence) axis; MiniLM batches come from length
buckets and are trimmed to their longest text (:func:`deployer.speed.bucketed_batches`); a batch-1 query
runs at its own length. The Markdown table is written beside ``--out`` (``.md``).
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
from backends.onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from backends.onnxruntime.throughput import concat_batcher, session  # noqa: E402
from deployer.cpu import choose_flavour, detect  # noqa: E402
from deployer.model_io import canonicalize  # noqa: E402
from deployer.plan import QuantPlan  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan  # noqa: E402
from deployer.recovery import prepare_for_lowering  # noqa: E402
from deployer.speed import alternate, bucketed_batches  # noqa: E402
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
# "auto" is what `deploy --target onnxruntime` builds on this CPU; "--cpu avx2" the AVX2 flavour of the same plan.
VARIANTS = {
    "efficientnet-lite0": [("deployer static (auto)", "int8", None, {"ort_mode": "static"}),
                           ("deployer static --cpu avx2", "int8", None, {"ort_mode": "static", "cpu": "avx2"})],
    "minilm": [("deployer static (auto)", "int8", None, {"ort_mode": "static"}),
               ("deployer static mixed (auto)", "mixed", None, {"ort_mode": "static"}),
               ("deployer dynamic (auto)", "int8", None, {"ort_mode": "dynamic"}),
               ("deployer dynamic --cpu avx2", "int8", None, {"ort_mode": "dynamic", "cpu": "avx2"})],
}
ORT_DEFAULTS = ("ort quantize_static U8S8 per-tensor (defaults)", "ort quantize_static U8S8 per-channel",
                "ort quantize_dynamic (defaults)")
GRIDS = {"efficientnet-lite0": (1, 16), "minilm": (1, 32)}
# Dynamic quantization of EfficientNet-Lite0 (ConvInteger, deployer's or ONNX Runtime's) ran at 0.08x FP32
# in a smoke run here (32 crops, top-1 0.59): left out of the timed table, it would take most of its time.
SKIP = {"efficientnet-lite0": {"ort quantize_dynamic (defaults)"}}


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
    """ONNX Runtime's quantize_static (QDQ, MinMax, uint8 activations, int8 weights; its defaults are
    per-tensor, plus the same with ``per_channel=True``) and quantize_dynamic with its default arguments."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(calib))

        def get_next(self):
            return next(self.it, None)

    src = work / "fp32.onnx"
    onnx.save(model, str(src))
    out = {}
    for label, per_channel in ((ORT_DEFAULTS[0], False), (ORT_DEFAULTS[1], True)):
        if wanted(label):
            t = time.perf_counter()
            dst = work / f"ort_static_{int(per_channel)}.onnx"
            quantize_static(str(src), str(dst), Reader(), per_channel=per_channel)
            out[label] = (onnx.load(str(dst)), time.perf_counter() - t)
    if wanted(ORT_DEFAULTS[2]):
        t = time.perf_counter()
        quantize_dynamic(str(src), str(work / "ort_dynamic.onnx"))
        out[ORT_DEFAULTS[2]] = (onnx.load(str(work / "ort_dynamic.onnx")), time.perf_counter() - t)
    return out


def run_model(name: str, args, work: Path) -> dict:
    t0 = time.perf_counter()
    data, model, batcher = load(name, args.calib, args.heldout)
    held = list(data.heldout)
    base = DeployOptions(calib_samples=args.calib, heldout_samples=args.heldout, no_cache=True)
    inputs = Inputs(model, data.calibration, data.heldout, data.task, f"example:{name}", data.split)
    stats = compute_statistics(inputs, base)
    variants: dict[str, tuple[onnx.ModelProto, float]] = {"fp32": (model, 0.0)}
    flavours: dict[str, str] = {}
    def wanted(label: str) -> bool:
        return label not in SKIP.get(name, set()) and (not args.only or label in args.only.split(","))

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
        flavours[label] = art.extra["kernel_flavour"]["name"]
        print(name, label, "lowered", flavours[label], flush=True)
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
    rows_speed = []
    labels = list(variants)
    batches_for = [int(b) for b in args.grid.split(",")] if args.grid else GRIDS[name]
    for batch in batches_for:
        before = loadavg()
        bs = bucketed_batches([dict(h) for h in held], batch, trim=name == "minilm", limit=args.batches)
        sessions = [session(variants[k][0], 1) for k in labels]
        runners = [(lambda b, s=s: s.run(None, b)) for s in sessions]
        times = alternate(runners, bs, seconds=args.seconds, min_rounds=args.min_rounds)
        med = [float(np.median(t)) for t in times]
        row = {"batch": batch, "threads": 1, "calls": len(times[0]),
               "qps": {k: round(batch / m, 2) for k, m in zip(labels, med)},
               "ratio": {k: round(med[0] / m, 3) for k, m in zip(labels, med)},
               "load_average_1min": [before[0], loadavg()[0]]}
        rows_speed.append(row)
        print(name, row, flush=True)
    return {"model": name, "split": data.split, "heldout": len(held), "calibration": args.calib,
            "seconds_per_setting": args.seconds, "fidelity": rows, "speed": rows_speed, "flavours": flavours,
            "seconds": round(time.perf_counter() - t0, 1)}


def write_markdown(res: dict, path: Path) -> None:
    """The results table (``benchmarks/results/onnxruntime.md``) from the JSON of one run."""
    cpu = res["cpu"]
    lines = ["# ONNX Runtime CPU target (`--target onnxruntime`): speed and fidelity per CPU", "",
             f"Run {res['started']} - {res['finished']} UTC, ONNX Runtime {res['onnxruntime']}, command:", "",
             f"```\n{res['command']}\n```", "",
             f"**CPU:** {cpu['model']} ({cpu['machine']}), {res['cores']} cores; int8 flags: "
             f"{', '.join(cpu['flags'])}; best int8 path: **{cpu['isa']}** "
             f"(chosen flavour, static: `{res['flavour_static']}`, dynamic: `{res['flavour_dynamic']}`).",
             f"1-minute load average (shared machine): {res['load_average_start'][0]} at the start, "
             f"{res['load_average_end'][0]} at the end; per setting below.", ""]
    for m in res["models"]:
        fid = m["fidelity"]
        metric = "top1_agreement" if "top1_agreement" in fid["fp32"] else "cosine"
        task = "task_accuracy" if "task_accuracy" in fid["fp32"] else None
        lines += [f"## {m['model']}", "", f"Held-out: {m['heldout']} samples ({m['split']}); calibration "
                  f"{m['calibration']} samples.", ""]
        head = ["variant", "flavour", metric] + ([task] if task else []) + ["size MB"]
        head += [f"batch {r['batch']} (x FP32)" for r in m["speed"]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, r in fid.items():
            cells = [label, m["flavours"].get(label, "-"), f"{r.get(metric, r.get('top1_agreement', 0)):.4f}"]
            if task:
                cells.append(f"{r.get(task, float('nan')):.3f}")
            cells.append(f"{r['size_mb']:.2f}")
            cells += [f"{s['qps'][label]:.1f} q/s ({s['ratio'][label]:.2f}x)" for s in m["speed"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- batch {s['batch']}: {s['calls']} calls per variant, load average "
                         f"{s['load_average_1min'][0]} -> {s['load_average_1min'][1]}" for s in m["speed"]] + [""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="efficientnet-lite0,minilm")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--seconds", type=float, default=20.0, help="alternation time per batch setting")
    p.add_argument("--min-rounds", type=int, default=7)
    p.add_argument("--batches", type=int, default=32, help="distinct batches cycled per setting")
    p.add_argument("--only", default="", help="comma-separated variant labels (FP32 always; default: all)")
    p.add_argument("--grid", default="", help="batch sizes, comma-separated (default per model)")
    p.add_argument("--plan-variant", action="append", default=[],
                   help="MODEL:LABEL=PLAN.json: also lower a plan written by deploy (e.g. with --fidelity-target)")
    p.add_argument("--out", default="benchmarks/results/onnxruntime.json")
    p.add_argument("--work", default="/tmp/ort-bench")
    a = p.parse_args()
    logging.getLogger().setLevel(logging.WARNING)  # ONNX Runtime's quantizer logs INFO lines per node
    import os

    import onnxruntime

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    info = detect()
    res: dict[str, Any] = {"cpu": info.to_dict(), "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                           "flavour_static": choose_flavour(info.isa).name,
                           "flavour_dynamic": choose_flavour(info.isa, "dynamic").name,
                           "command": "python " + " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                           "load_average_start": loadavg(), "models": []}
    for name in a.models.split(","):
        res["models"].append(run_model(name, a, work / name))
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    res["load_average_end"] = loadavg()
    res["finished"] = time.strftime("%H:%M", time.gmtime())
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, Path(a.out).with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
