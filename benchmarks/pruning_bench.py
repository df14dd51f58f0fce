"""Pruning benchmark (issue 24): channel pruning + recovery distillation + INT8, and 2:4 sparsity for TensorRT.

    nice -n 10 python benchmarks/pruning_bench.py                      # all three parts (~20 min on 2 cores)
    nice -n 10 python benchmarks/pruning_bench.py --parts mnist        # one part; results merge into the JSON

Parts (each through the product's own path, :func:`deployer.prune.run.deploy_with_prune`, beside an ordinary
:func:`deployer.pipeline.run_deploy` of the unpruned model on the same split):

- ``mnist``: the example's CNN, 30% of channels pruned (L1), 3 epochs of distillation, INT8 TFLite and ONNX
  Runtime; label accuracy vs the unpruned FP32 model on the example's 300 held-out digits; size and latency of
  unpruned FP32 / unpruned INT8 / pruned FP32 / pruned INT8 side by side.
- ``effnet``: EfficientNet-Lite0 (real ImageNet weights), 30% pruned (L1), recovery distillation on photo
  crops within a CPU budget (``--effnet-seconds``), INT8 TFLite; top-1 agreement with the unpruned FP32 model
  on 300 held-out crops of held-out photos, MACs, LiteRT latency vs the unpruned INT8 ``.tflite``.
- ``minilm``: all-MiniLM-L6-v2, 2:4 sparsity on every eligible Linear, recovery distillation (embedding
  cosine + hidden-state cosine + attention maps, the unpruned model the teacher) within a budget, the
  TensorRT strongly typed graph (``mixed`` recipe); the 2:4 pattern checked on every pruned weight there;
  cosine to the FP32 model on the held-out texts.

Latency: batch 1, 1 thread, median of ``--runs`` runs after warm-up, in 5 rounds that alternate the models
compared (median of the round medians), on a shared 2-core machine (load average recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def alternate(fns: dict[str, Any], rounds: int = 5) -> dict[str, dict[str, Any]]:
    """Median of per-round medians for each latency function, rounds alternating between them."""
    import numpy as np

    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(fn())
    return {k: {"median_ms": round(float(np.median(v)), 4), "rounds": [round(x, 4) for x in v]} for k, v in per.items()}


def _deploy_unpruned(model: str, out: Path, targets: str, **kw: Any) -> Any:
    from deployer.pipeline import DeployOptions, run_deploy

    return run_deploy(model, None, out, DeployOptions(targets=targets, overwrite=True, **kw))


def part_mnist(work: Path, runs: int) -> dict[str, Any]:
    from deployer.pipeline import DeployOptions
    from deployer.prune import measure
    from deployer.prune.options import PruneOptions
    from deployer.prune.run import deploy_with_prune

    t0 = time.perf_counter()
    base = _deploy_unpruned("mnist", work / "mnist-base", "tflite,onnxruntime")
    res = deploy_with_prune("mnist", work / "mnist-pruned", DeployOptions(targets="tflite,onnxruntime", overwrite=True),
                            PruneOptions(ratio=0.3, criterion="l1", epochs=3, threads=1), log=print)
    p = res.report["pruning"]
    b = base.report["targets"]
    pb, bb = work / "mnist-pruned", work / "mnist-base"
    lat = alternate({
        "unpruned_fp32_onnx": lambda: measure.onnx_latency_ms(bb / "onnxruntime" / "model_fp32.onnx", runs=runs),
        "pruned_fp32_onnx": lambda: measure.onnx_latency_ms(pb / "prune" / "pruned.onnx", runs=runs),
        "unpruned_int8_ort": lambda: measure.onnx_latency_ms(bb / b["onnxruntime"]["artifact"], runs=runs),
        "pruned_int8_ort": lambda: measure.onnx_latency_ms(pb / p["stages"]["quantized"]["onnxruntime"]["artifact"], runs=runs),
        "unpruned_fp32_tflite": lambda: measure.tflite_latency_ms(bb / "tflite" / "model_fp32.tflite", runs=runs),
        "pruned_fp32_tflite": lambda: measure.tflite_latency_ms(pb / "tflite" / "model_fp32.tflite", runs=runs),
        "unpruned_int8_tflite": lambda: measure.tflite_latency_ms(bb / b["tflite"]["artifact"], runs=runs),
        "pruned_int8_tflite": lambda: measure.tflite_latency_ms(pb / p["stages"]["quantized"]["tflite"]["artifact"], runs=runs),
    })
    return {"pruning": p, "unpruned_int8": {t: {"label_accuracy": b[t]["fidelity"].get("label_accuracy"),
                                                "label_accuracy_fp32": b[t]["fidelity"].get("label_accuracy_fp32"),
                                                "size_bytes": b[t]["size_bytes"]} for t in b},
            "latency": lat, "seconds": round(time.perf_counter() - t0, 1)}


def part_effnet(work: Path, runs: int, seconds: float) -> dict[str, Any]:
    from deployer.pipeline import DeployOptions
    from deployer.prune import measure
    from deployer.prune.options import PruneOptions
    from deployer.prune.run import deploy_with_prune

    t0 = time.perf_counter()
    kw = {"calib_samples": 128, "heldout_samples": 300}
    base = _deploy_unpruned("efficientnet-lite0", work / "eff-base", "tflite", **kw)
    res = deploy_with_prune("efficientnet-lite0", work / "eff-pruned", DeployOptions(targets="tflite", overwrite=True, **kw),
                            PruneOptions(ratio=0.3, criterion="l1", epochs=3, max_seconds=seconds, threads=2,
                                         batch_size=16, lr=1e-4), log=print)
    p = res.report["pruning"]
    b = base.report["targets"]["tflite"]
    pb, bb = work / "eff-pruned", work / "eff-base"
    lat = alternate({
        "unpruned_fp32_tflite": lambda: measure.tflite_latency_ms(bb / "tflite" / "model_fp32.tflite", runs=runs),
        "pruned_fp32_tflite": lambda: measure.tflite_latency_ms(pb / "tflite" / "model_fp32.tflite", runs=runs),
        "unpruned_int8_tflite": lambda: measure.tflite_latency_ms(bb / b["artifact"], runs=runs),
        "pruned_int8_tflite": lambda: measure.tflite_latency_ms(pb / p["stages"]["quantized"]["tflite"]["artifact"], runs=runs),
    })
    return {"pruning": p, "unpruned_int8": {"top1_agreement_vs_fp32": b["fidelity"].get("top1_agreement"),
                                            "size_bytes": b["size_bytes"]},
            "latency": lat, "seconds": round(time.perf_counter() - t0, 1)}


def part_minilm(work: Path, seconds: float) -> dict[str, Any]:
    from deployer.pipeline import DeployOptions
    from deployer.prune.options import PruneOptions
    from deployer.prune.run import deploy_with_prune

    t0 = time.perf_counter()
    res = deploy_with_prune("minilm", work / "minilm-24", DeployOptions(targets="tensorrt", recipe="mixed", overwrite=True,
                                                                       calib_samples=128, heldout_samples=300),
                            PruneOptions(sparsity="2:4", epochs=1, max_seconds=seconds, threads=2), log=print)
    sub = json.loads((work / "minilm-24" / "prune" / "pruning_report.json").read_text())
    trt = res.report["targets"]["tensorrt"]
    return {"pruning": res.report["pruning"], "sparsity": sub["sparsity"], "tensorrt_sparsity": trt["sparsity"],
            "tensorrt_fidelity": trt["fidelity"], "training": sub["training"],
            "build_command": trt.get("build_command"), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="mnist,effnet,minilm")
    ap.add_argument("--runs", type=int, default=30, help="runs per latency round")
    ap.add_argument("--effnet-seconds", type=float, default=240.0, help="recovery fine-tuning budget (EfficientNet)")
    ap.add_argument("--minilm-seconds", type=float, default=180.0, help="recovery fine-tuning budget (MiniLM)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    a = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from deployer.prune import measure

    out_json = RESULTS / "pruning.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    work = Path(a.work or tempfile.mkdtemp(prefix="pruning-bench-"))
    for part in a.parts.split(","):
        load0 = os.getloadavg()
        if part == "mnist":
            r = part_mnist(work, a.runs)
        elif part == "effnet":
            r = part_effnet(work, a.runs, a.effnet_seconds)
        elif part == "minilm":
            r = part_minilm(work, a.minilm_seconds)
        else:
            raise SystemExit(f"unknown part {part!r}")
        r["machine"] = {**measure.machine(), "load_average_start": [round(x, 2) for x in load0],
                        "load_average_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        results[part] = r
        out_json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{part}: done in {r['seconds']} s")
    from pruning_md import write_markdown  # type: ignore[import-not-found]

    write_markdown(results, RESULTS / "pruning.md")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
