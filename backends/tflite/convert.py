"""ONNX -> float ``.tflite`` with onnx2tf 2.6.9's TensorFlow-free "flatbuffer_direct" backend.

The route and its pitfalls were measured in issue 17: onnx2tf rewrites its input ``.onnx`` in place
(it gets a copy), calls ``sys.exit`` on some errors and shells out to ``onnxsim`` (it runs as a child
process with this interpreter's ``bin/`` on PATH, :mod:`backends.tflite.child`), keeps ONNX tensor
names (sanitized) and writes ``<stem>_tensor_correspondence_report.json``. float16/bfloat16 models are
up-cast to float32 first (its float16 path gave a traceback). onnx2tf 2.6.9 downloads nothing on the
float path (checked: no download code in the package), so no calibration image file is needed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from backends.tflite.child import run_child

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def upcast_half(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every float16/bfloat16 tensor, Cast target and constant in float32.

    Returns:
        (model, number of changed items); the model is unchanged (a copy) when the count is 0.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = 0

    def fix_tensor(t: onnx.TensorProto) -> None:
        nonlocal changed
        if t.data_type in HALF:
            a = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            changed += 1

    def fix_graph(g: onnx.GraphProto) -> None:
        nonlocal changed
        for t in g.initializer:
            fix_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type in HALF:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
                changed += 1
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i in HALF:
                    a.i = TensorProto.FLOAT
                    changed += 1
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(out.graph)
    return out, changed


@dataclass
class FloatModel:
    """A converted float ``.tflite``: its bytes, onnx2tf's ONNX -> TFLite tensor names and the shape
    mode (``dynamic``: symbolic dims kept; ``fixed``: pinned with ``-ois``, shapes given)."""

    data: bytes
    correspondence: dict[str, str] = field(default_factory=dict)
    fixed_shapes: dict[str, list[int]] = field(default_factory=dict)


def onnx2tf_argv(src: Path, out: Path, keep_nchw: list[str], fixed: dict[str, list[int]],
                 simplify: bool = False) -> list[str]:
    """The onnx2tf command line (float output, flatbuffer_direct, quiet; onnxsim only with ``simplify``)."""
    argv = [sys.executable, "-m", "onnx2tf", "-i", str(src), "-o", str(out), "-tb", "flatbuffer_direct", "-n"]
    if not simplify:
        argv.append("-nuo")
    if keep_nchw:
        argv += ["-kat", *keep_nchw]
    if fixed:
        argv += ["-ois", *[f"{k}:{','.join(str(int(d)) for d in v)}" for k, v in fixed.items()]]
    return argv


def convert(model: onnx.ModelProto, work: Path, keep_nchw: list[str] | None = None,
            fixed: dict[str, list[int]] | None = None, simplify: bool = False) -> FloatModel:
    """Convert ``model`` (float32 ONNX) to a float ``.tflite`` in a child process under ``work``.

    Args:
        model: float32 ONNX (see :func:`upcast_half`); never modified.
        work: an empty scratch directory (inside the deploy's temporary output directory).
        keep_nchw: input names whose layout stays as in ONNX (``--tflite-layout nchw``).
        fixed: input name -> static shape (symbolic dims pinned).
        simplify: let onnx2tf run onnxsim first (10-30 s here; the reference is already folded by
            onnxslim in canonicalization, so the backend tries without it first).

    Raises:
        ExternalToolError: the converter failed or crashed (one line).
    """
    work.mkdir(parents=True, exist_ok=True)
    src = work / "model.onnx"
    onnx.save(model, str(src))  # onnx2tf rewrites this copy in place
    out = work / "onnx2tf"
    run_child(onnx2tf_argv(src, out, keep_nchw or [], fixed or {}, simplify), "onnx2tf conversion (ONNX -> float .tflite)",
              work, "the graph has an op or pattern onnx2tf 2.6.9 cannot convert; `deploy check --target tflite "
              "MODEL` lists what converts, or use --target onnxruntime")
    found = sorted(out.glob("*_float32.tflite"))
    if not found:
        from deployer.errors import ExternalToolError

        raise ExternalToolError("tflite: onnx2tf wrote no float32 .tflite; run it by hand to see why: "
                                + " ".join(onnx2tf_argv(src, out, keep_nchw or [], fixed or {})))
    corr: dict[str, str] = {}
    reports = sorted(out.glob("*_tensor_correspondence_report.json"))
    if reports:
        for r in json.loads(reports[0].read_text()).get("records", []):
            if r.get("exists_in_final_model") and r.get("resolved_tflite_tensor_name") and r.get("onnx_output_name"):
                corr[str(r["onnx_output_name"])] = str(r["resolved_tflite_tensor_name"])
    return FloatModel(found[0].read_bytes(), corr, dict(fixed or {}))
