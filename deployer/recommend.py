"""``deploy recommend``: the seed's selection rules (DESIGN.md section 2) as a small decision table.

- latency-sensitive GPU serving -> TensorRT, ``mixed`` recipe (attention in FP16, the rest INT8);
- CPU servers -> ONNX Runtime dynamic quantization (INT8 weights, activations quantized at run time);
- edge devices -> distillation, then TFLite full-integer INT8;
- offline batch jobs -> distillation + pruning: ``deploy --prune 0.3`` prunes 30% of the channels of a
  built-in example's torch model (Torch-Pruning), recovers it by distillation from the unpruned model and
  deploys it as INT8 for a CPU server in one run; a user model goes through ``deploy prune`` first.

The ``priority`` (latency or cost) is carried into the reason; the table keys on hardware as the
seed's rules do.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from deployer.errors import BadInputError

PRIORITIES = ("latency", "cost")
HARDWARE = ("gpu", "cpu", "edge", "batch")


@dataclass(frozen=True)
class Recommendation:
    """What to run, why, and the command line."""

    target: str
    recipe: str
    technique: str
    reason: str
    argv: list[str]
    steps_outside: list[str]

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "recipe": self.recipe, "technique": self.technique, "reason": self.reason,
                "command": self.command, "steps_outside_deployer": self.steps_outside}


def recommend(priority: str, hardware: str, model: str | None = None) -> Recommendation:
    """The seed's rule for ``hardware`` (and ``priority``), as a ``deploy`` command for ``model``.

    Raises:
        BadInputError: unknown priority or hardware.
    """
    if priority not in PRIORITIES:
        raise BadInputError(f"--priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    if hardware not in HARDWARE:
        raise BadInputError(f"--hardware {hardware!r}: use one of {', '.join(HARDWARE)}")
    from deployer.examples import EXAMPLES

    base = ["deploy"] + (["--model", model] if model else [])
    if model and model not in EXAMPLES:
        base += ["--calib", "CALIB_DIR"]  # a user model needs its calibration folder (placeholder)
    why = "lowest latency" if priority == "latency" else "lowest cost per query"
    if hardware == "gpu":
        return Recommendation("tensorrt", "mixed", "mixed precision (attention FP16, rest INT8)",
                              f"GPU, {why}: the seed's rule for latency-sensitive GPU serving is mixed precision; "
                              f"TensorRT runs INT8 and FP16 kernels in one strongly typed engine",
                              base + ["--target", "tensorrt", "--recipe", "mixed"], [])
    if hardware == "cpu":
        return Recommendation("onnxruntime", "int8", "dynamic quantization",
                              f"CPU, {why}: the seed's rule for CPU is dynamic quantization (INT8 weights, "
                              f"activations quantized at run time: no activation ranges to get wrong)",
                              base + ["--target", "onnxruntime", "--ort-mode", "dynamic"], [])
    if hardware == "edge":
        return Recommendation("tflite", "int8", "distillation + full-integer INT8",
                              f"edge, {why}: the seed's rule for edge is distillation then INT8; TFLite full "
                              f"integer runs on phones and MCUs",
                              base + ["--target", "tflite"],
                              ["distil the model first (`deploy distill`, or `deploy --distill` to chain it: "
                               "KL(student/T || teacher/T)*T^2, T in [3, 10]); then deploy the student"])
    from deployer.distill.data import example_name

    reason = (f"batch, {why}: the seed's rule for batch jobs is distillation + pruning: 30% of the channels "
              f"pruned (L1), recovered by distillation from the unpruned model (KL with temperature), then INT8 "
              f"on a CPU server")
    if model is None or example_name(model) is not None:  # a built-in torch example: one run does it all
        return Recommendation("onnxruntime", "int8", "distillation + pruning", reason,
                              base + ["--prune", "0.3", "--target", "onnxruntime"], [])
    if model.endswith(".onnx"):  # pruning needs the torch model
        return Recommendation("onnxruntime", "int8", "distillation + pruning", reason,
                              ["deploy", "--model", "pruned/pruned.onnx", "--calib", "CALIB_DIR", "--target", "onnxruntime"],
                              ["prune the torch model behind " + model + ": `deploy prune --model pkg.module:factory "
                               "--ratio 0.3 --data DATA_DIR --out pruned` (writes pruned/pruned.onnx)"])
    return Recommendation("onnxruntime", "int8", "distillation + pruning", reason,
                          ["deploy", "--model", "pruned/pruned.onnx", "--calib", "CALIB_DIR", "--target", "onnxruntime"],
                          [f"deploy prune --model {model} --ratio 0.3 --data DATA_DIR --out pruned"])


def cmd_recommend(argv: list[str]) -> int:
    """``deploy recommend --priority latency|cost --hardware gpu|cpu|edge|batch [--model M] [--json]``."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="deploy recommend", description="The seed's selection rule as a deploy command.")
    p.add_argument("--priority", required=True, choices=PRIORITIES)
    p.add_argument("--hardware", required=True, choices=HARDWARE)
    p.add_argument("--model", help="model to put into the command (ONNX file or example name)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    a = p.parse_args(argv)
    r = recommend(a.priority, a.hardware, a.model)
    if a.json:
        print(json.dumps(r.to_dict(), indent=1))
    else:
        print(f"{r.technique} -> {r.target}: {r.reason}")
        for s in r.steps_outside:
            print(f"  before: {s}")
        print(r.command)
    return 0
