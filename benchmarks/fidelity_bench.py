"""Accuracy-recovery ablation on the two real models: each method's contribution, tool time, peak memory.

Usage: python benchmarks/fidelity_bench.py [--rows NAME ...] [--out benchmarks/results/fidelity.md]

Every row is one ``deploy`` command in a fresh subprocess (the user statistics cache is shared, so
rows after the first reuse one calibration pass; the wall time is the whole command). Peak RSS is the
child's ``ru_maxrss``. Fidelity is measured by the tool itself on the held-out split (EfficientNet-Lite0:
300 crops of photos never used for calibration or the search; MiniLM: >= 1,000 fortunes texts).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = [sys.executable, "-m", "deployer.cli"]

ROWS: dict[str, tuple[str, list[str]]] = {
    # name: (what it shows, deploy arguments)
    "eff-tflite-nobc": ("EfficientNet tflite, min/max, no bias correction", ["--target", "tflite", "--no-bias-correction"]),
    "eff-tflite": ("EfficientNet tflite, default (min/max + bias correction)", ["--target", "tflite"]),
    "eff-tflite-cle": ("EfficientNet tflite, default + cross-layer equalization", ["--target", "tflite", "--equalize"]),
    "eff-trt-nobc": ("EfficientNet tensorrt, min/max, no bias correction", ["--target", "tensorrt", "--no-bias-correction"]),
    "eff-trt": ("EfficientNet tensorrt, default", ["--target", "tensorrt"]),
    "eff-trt-cle": ("EfficientNet tensorrt, default + cross-layer equalization", ["--target", "tensorrt", "--equalize"]),
    "eff-trt-search": ("EfficientNet tensorrt, default + search (target 0.99)", ["--target", "tensorrt", "--fidelity-target"]),
    "eff-ascend-search": ("EfficientNet ascend, default + search (target 0.99)", ["--target", "ascend", "--fidelity-target"]),
    "minilm-trt-int8": ("MiniLM tensorrt, int8 (all static)", ["--model", "minilm", "--target", "tensorrt"]),
    "minilm-trt-int8-sq": ("MiniLM tensorrt, int8 (all static) + SmoothQuant 0.8",
                           ["--model", "minilm", "--target", "tensorrt", "--smoothquant", "0.8"]),
    "minilm-trt-mixed-nosq": ("MiniLM tensorrt, mixed without SmoothQuant",
                              ["--model", "minilm", "--target", "tensorrt", "--recipe", "mixed", "--no-smoothquant"]),
    "minilm-trt-mixed-sq05": ("MiniLM tensorrt, mixed with SmoothQuant 0.5 (the paper's default)",
                              ["--model", "minilm", "--target", "tensorrt", "--recipe", "mixed", "--smoothquant", "0.5"]),
    "minilm-trt-mixed": ("MiniLM tensorrt, mixed (SmoothQuant 0.8 on)",
                         ["--model", "minilm", "--target", "tensorrt", "--recipe", "mixed"]),
    "minilm-trt-search": ("MiniLM tensorrt, mixed + search (target 0.99)",
                          ["--model", "minilm", "--target", "tensorrt", "--recipe", "mixed", "--fidelity-target"]),
    "minilm-ort-int4": ("MiniLM onnxruntime, weight-only INT4 (MatMulNBits, block 32)",
                        ["--model", "minilm", "--target", "onnxruntime", "--recipe", "int4"]),
    "minilm-trt-int8-sq-search": ("MiniLM tensorrt, int8 + SmoothQuant 0.8 + search (target 0.99)",
                                  ["--model", "minilm", "--target", "tensorrt", "--smoothquant", "0.8",
                                   "--fidelity-target"]),
    "eff-all-default": ("EfficientNet, every target, default deploy",
                        ["--target", "tflite,tensorrt,ascend,onnxruntime"]),
    "eff-trt-auto": ("EfficientNet tensorrt, default + observer auto (per tensor)",
                     ["--target", "tensorrt", "--observer", "auto"]),
    "eff-tflite-auto": ("EfficientNet tflite, default + observer auto (per tensor)",
                        ["--target", "tflite", "--observer", "auto"]),
    "eff-adaround": ("EfficientNet tensorrt + tflite, default + AdaRound (budget 1500 s)",
                     ["--target", "tensorrt,tflite", "--adaround", "1500"]),
    "minilm-trt-mixed-auto": ("MiniLM tensorrt, mixed + observer auto (per tensor)",
                              ["--model", "minilm", "--target", "tensorrt", "--recipe", "mixed", "--observer", "auto"]),
    "minilm-trt-nosq-adaround": ("MiniLM tensorrt, mixed without SmoothQuant + AdaRound (budget 1500 s)",
                                 ["--model", "minilm", "--target", "tensorrt", "--recipe", "mixed", "--no-smoothquant",
                                  "--adaround", "1500"]),
    "minilm-ascend-mixed": ("MiniLM ascend, mixed", ["--model", "minilm", "--target", "ascend", "--recipe", "mixed"]),
    "minilm-ascend-search": ("MiniLM ascend, mixed + search (target 0.99)",
                             ["--model", "minilm", "--target", "ascend", "--recipe", "mixed", "--fidelity-target"]),
}


def run_row(args: list[str], out: Path) -> tuple[dict, float, float, str]:
    """(report, wall s, peak RSS MB, error) of one deploy command."""
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen([*DEPLOY, *args, "--out", str(out), "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=log, text=True)
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rss = usage.ru_maxrss / 1024
    if os.waitstatus_to_exitcode(status) not in (0, 1, 2) or not (out / "report.json").exists():
        return {}, wall, rss, f"exit {os.waitstatus_to_exitcode(status)}: {stdout[-200:]}"
    return json.loads((out / "report.json").read_text()), wall, rss, ""


def summarize(report: dict) -> tuple[str, str]:
    """(fidelity cell, mixed-precision cell)."""
    cells = []
    for t, r in sorted(report.get("targets", {}).items()):
        f = r.get("fidelity", {})
        parts = [f"top-1 {f['top1_agreement']:.3f}"] if "top1_agreement" in f else []
        if "cosine_mean" in f:
            parts.append(f"cosine {f['cosine_mean']:.4f}")
        if "task_accuracy_relative" in f:
            parts.append(f"task acc rel {f['task_accuracy_relative']:.3f}")
        cells.append(f"{t}: " + ", ".join(parts))
    mp = report.get("mixed_precision")
    mixed = "-"
    if mp:
        mixed = (f"{len(mp['kept_high_precision'])} layers kept, INT8 MACs {mp['int8_mac_fraction']:.1%}, "
                 f"stopped on {mp['stopped_on']} ({mp['evaluations']} evals)")
    return "; ".join(cells), mixed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fidelity.md"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fidelity-bench-"))
    lines = ["| row | what | fidelity vs FP32 (held-out) | mixed precision | wall s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for name in a.rows:
        what, args = ROWS[name]
        report, wall, rss, err = run_row(args, work / name)
        fid, mixed = summarize(report) if report else (f"failed: {err}", "-")
        lines.append(f"| {name} | {what} | {fid} | {mixed} | {wall:.0f} | {rss:.0f} |")
        print(lines[-1], flush=True)
        shutil.rmtree(work / name, ignore_errors=True)
    Path(a.out + ".rows").write_text("\n".join(lines) + "\n")
    print(f"rows written to {a.out}.rows (paste into {a.out} with the context)")


if __name__ == "__main__":
    main()
