"""Float ``.tflite`` -> full-integer ``.tflite`` with ai-edge-quantizer 0.10, honouring the plan's ranges.

The plan's activation ranges are given to the quantizer as its calibration values
(``{tflite_tensor: {"min", "max"}}``), so every mapped activation gets ``scale = (max - min) / 255``
and the TFLite zero point (int8, asymmetric) or ``max(|min|, |max|) / 32767`` (16x8) from the same
range the QDQ targets use. Weights: int8 symmetric per output channel (TFLite spec; per-tensor with
``tflite_per_tensor``). Fixes for the quantizer's failures measured in issue 17:

- BATCH_MATMUL with a constant operand got per-channel weights along the wrong axis (garbage): it
  gets per-tensor weights;
- mask paths (tensors with ``|value| >= MASK_MAGNITUDE``, or on the plan's mask paths) got ~1e36
  scales and aborted the interpreter: every op touching one stays float (``float_nodes``);
- int8 DIV failed to run: DIV stays float;
- a weight so small that ``bias / (input_scale * weight_scale)`` leaves int32 overflowed the bias:
  the channel's weight scale is raised (:func:`fit_biases`, reported); an op still overflowing stays float;
- rank-1 PADV2 pad values crashed it: made scalars first (:func:`backends.tflite.flatbuf.scalar_pad_values`).

Runs in the worker child.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends.tflite import flatbuf
from deployer.patterns import MASK_MAGNITUDE

BIAS_OPS = {"CONV_2D": (1, 2, 0), "DEPTHWISE_CONV_2D": (1, 2, 3), "FULLY_CONNECTED": (1, 2, 0),
            "TRANSPOSE_CONV": (1, 3, 0)}  # weight input, bias input, output-channel axis of the weight
FIXED_OUTPUT = {"SOFTMAX": "fixed output parameters (scale 1/256, zero point -128; TFLite spec)",
                "LOGISTIC": "fixed output parameters (scale 1/256, zero point -128; TFLite spec)",
                "TANH": "fixed output parameters (scale 1/128, zero point 0; TFLite spec)"}
INT32_MAX = 2**31 - 1


@dataclass
class Quantized:
    """What :func:`quantize` made: the model and, per tensor, where its parameters came from
    (``plan_tensors``: TFLite tensor -> the ONNX tensor whose plan range it carries)."""

    data: bytes
    float_reasons: dict[str, str] = field(default_factory=dict)
    deviations: list[dict[str, Any]] = field(default_factory=list)
    from_plan: int = 0
    without_plan_range: list[str] = field(default_factory=list)
    plan_tensors: dict[str, str] = field(default_factory=dict)
    fitted_biases: list[dict[str, Any]] = field(default_factory=list)


def absurd(lo: float, hi: float) -> bool:
    """A range no activation scale can carry: non-finite or beyond MASK_MAGNITUDE (deployer.patterns)."""
    return not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) >= MASK_MAGNITUDE


def act_params(lo: float, hi: float, int16: bool) -> tuple[float, int]:
    """(scale, zero point) of a range under the TFLite spec: int8 asymmetric, int16 symmetric."""
    from deployer.quant import asymmetric_params

    if int16:
        return max(abs(lo), abs(hi), 1e-8) / 32767.0, 0
    return asymmetric_params(lo, hi)


def _const(fb: Any, t: Any) -> np.ndarray | None:
    if not flatbuf.is_constant(fb, t):
        return None
    raw = np.asarray(fb.buffers[t.buffer].data, np.uint8).tobytes()
    dt = {0: np.float32, 2: np.int32, 4: np.int64, 9: np.int8}.get(t.type)
    if dt is None:
        return None
    return np.frombuffer(raw, dt).reshape([int(x) for x in t.shape]) if t.shape is not None else np.frombuffer(raw, dt)


def fit_biases(data: bytes, qsv: dict[str, tuple[float, float]], int16: bool, per_tensor: bool
               ) -> tuple[bytes, list[dict[str, Any]]]:
    """Raise the weight scale of channels whose int32 bias would overflow.

    A (nearly) dead channel, e.g. a BatchNorm-folded one with weights ~1e-9 and a bias of several
    units (EfficientNet-Lite0 has one in most blocks), gets ``weight_scale = max|w| / 127`` so small
    that ``bias / (input_scale x weight_scale)`` leaves int32 (TFLite spec: bias scale = input scale x
    weight scale). Its largest weight is set to ``127 x`` the smallest weight scale that keeps the bias
    within 2^30 (a 2x margin): its other weights round to 0, so the channel computes its bias plus
    that one weight (magnitude ``|bias| / (input_scale x 2^30) x 127``, ~1e-5 here), as TFLite's own
    converter does when it raises such scales. Returns (model, ``{node, channels, max_weight}`` per op).
    """
    fb = flatbuf.load(data)
    sg = fb.subgraphs[0]
    changed = []
    for code, op in flatbuf.ops(fb):
        if code not in BIAS_OPS or len(op.inputs) <= BIAS_OPS[code][1] or op.inputs[BIAS_OPS[code][1]] < 0:
            continue
        wi, bi, axis = BIAS_OPS[code]
        wt, bt = sg.tensors[int(op.inputs[wi])], sg.tensors[int(op.inputs[bi])]
        w, b = _const(fb, wt), _const(fb, bt)
        x = flatbuf.name(sg.tensors[int(op.inputs[0] if code != "TRANSPOSE_CONV" else op.inputs[2])])
        if w is None or b is None or x not in qsv or w.dtype != np.float32 or absurd(*qsv[x]):
            continue
        s_in = act_params(*qsv[x], int16)[0]
        need = np.abs(b.astype(np.float64)) / (s_in * 2.0**30)  # smallest weight scale per channel
        w = np.array(w, copy=True)
        wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        if per_tensor:
            have = np.full(len(wc), np.max(np.abs(wc)) / 127.0)
            bad = np.flatnonzero(have < need)
            if len(bad):
                k = int(np.argmax(np.abs(wc).max(axis=1)))
                j = int(np.argmax(np.abs(wc[k])))
                wc[k, j] = np.sign(wc[k, j] or 1.0) * 127.0 * float(np.max(need))
        else:
            have = np.max(np.abs(wc), axis=1) / 127.0
            bad = np.flatnonzero(have < need)
            for c in bad:
                j = int(np.argmax(np.abs(wc[c])))
                wc[c, j] = np.sign(wc[c, j] or 1.0) * 127.0 * float(need[c])
        if len(bad):
            w = np.moveaxis(wc.reshape(np.moveaxis(w, axis, 0).shape), 0, axis).astype(np.float32)
            fb.buffers[wt.buffer].data = np.frombuffer(w.tobytes(), np.uint8).copy()
            changed.append({"node": flatbuf.name(sg.tensors[int(op.outputs[0])]), "op": code,
                            "channels": [int(c) for c in bad], "max_weight": float(np.max(np.abs(wc[bad])))})
    return (flatbuf.dump(fb) if changed else data), changed


DIVISOR_OPS = {"SQRT", "RSQRT", "ADD", "SUB", "MUL", "MEAN", "SUM", "SQUARE", "SQUARED_DIFFERENCE", "ABS", "MAXIMUM",
               "RELU", "EXP", "RESHAPE", "TRANSPOSE"}


def _divisor_chain(fb: Any, tensor: int, depth: int = 8) -> list[str]:
    """Scopes of the ops computing a divisor: back from ``tensor`` through :data:`DIVISOR_OPS` whose
    other operands are constants or the same tensor (x * x), and into both operands of a SUB or
    SQUARED_DIFFERENCE (``E[x^2] - E[x]^2`` cancels: int8 operands lose the small difference), up to
    ``depth`` ops deep."""
    sg = fb.subgraphs[0]
    producer = {int(o): (code, op) for code, op in flatbuf.ops(fb) for o in op.outputs if o >= 0}
    out: list[str] = []
    todo, seen = [(tensor, 0)], set()
    while todo:
        t, d = todo.pop()
        if t in seen or d >= depth or t not in producer:
            continue
        seen.add(t)
        code, op = producer[t]
        acts = sorted({int(i) for i in op.inputs if i >= 0 and not flatbuf.is_constant(fb, sg.tensors[int(i)])})
        if code not in DIVISOR_OPS or (len(acts) > 1 and code not in ("SUB", "SQUARED_DIFFERENCE")):
            continue
        out.append("".join(flatbuf.name(sg.tensors[int(o)]) + ";" for o in op.outputs if o >= 0))
        todo += [(i, d + 1) for i in acts]
    return out


def keep_float(data: bytes, qsv: dict[str, tuple[float, float]], masks: set[str], int16: bool,
               per_tensor: bool) -> dict[str, str]:
    """Ops (by output scope, ``a;b;``) that must stay float, with the reason."""
    fb = flatbuf.load(data)
    sg = fb.subgraphs[0]
    keep: dict[str, str] = {}
    for code, op in flatbuf.ops(fb):
        outs = [sg.tensors[int(o)] for o in op.outputs if o >= 0]
        scope = "".join(flatbuf.name(t) + ";" for t in outs)
        ins = [sg.tensors[int(i)] for i in op.inputs if i >= 0]
        touched = [flatbuf.name(t) for t in ins + outs if t.type in flatbuf.FLOAT_TYPES]
        huge = [n for n in touched if n in qsv and absurd(*qsv[n])]
        if huge:
            what = "attention-mask path" if any(n in masks for n in huge) else "sentinel values"
            keep[scope] = (f"{what}: {huge[0]} holds |value| >= 1e4 or non-finite values, which no integer scale "
                           f"can carry (kept float instead of a ~1e36 scale)")
            continue
        consts = [c for c in (_const(fb, t) for t in ins if t.type == 0) if c is not None and c.size]
        if any(float(np.max(np.abs(c))) >= MASK_MAGNITUDE for c in consts):
            keep[scope] = "a constant operand holds sentinel values (|value| >= 1e4)"
            continue
        if code == "DIV":
            keep[scope] = "int8 DIV fails to run in LiteRT (issue 17); kept float"
            if len(op.inputs) > 1:
                for s_ in _divisor_chain(fb, int(op.inputs[1])):
                    keep.setdefault(s_, "computes the divisor of a float DIV (e.g. LayerNorm's sqrt(var + eps)): "
                                        "int8 rounds small divisors to 0 and 1/x blows up; kept float")
            continue
        if code in BIAS_OPS and len(op.inputs) > BIAS_OPS[code][1] and op.inputs[BIAS_OPS[code][1]] >= 0:
            wi, bi, axis = BIAS_OPS[code]
            w, b = _const(fb, sg.tensors[int(op.inputs[wi])]), _const(fb, sg.tensors[int(op.inputs[bi])])
            x = flatbuf.name(sg.tensors[int(op.inputs[0] if code != "TRANSPOSE_CONV" else op.inputs[2])])
            if w is None or b is None or x not in qsv:
                continue
            s_in = act_params(*qsv[x], int16)[0]
            red = tuple(a for a in range(w.ndim) if a != axis)
            s_w = (np.max(np.abs(w)) if per_tensor else np.max(np.abs(w), axis=red)) / 127.0
            s_b = np.maximum(s_in * s_w, 1e-30)
            if np.any(np.abs(b.astype(np.float64)) / s_b > INT32_MAX):
                keep[scope] = ("int32 bias overflow: the weights are too small for their bias "
                               "(bias / (input_scale x weight_scale) > 2^31); kept float")
    return keep


def recipe(mode: str, per_tensor: bool, io: str, keep: dict[str, str]) -> list[dict[str, Any]]:
    """The ai-edge-quantizer recipe: static int8 (or 16x8), later rules win."""
    from ai_edge_quantizer import recipe as aeq_recipe

    rules = aeq_recipe.static_wi8_ai16() if mode == "16x8" else aeq_recipe.static_wi8_ai8()
    base = rules[0]
    if per_tensor:
        base["op_config"]["weight_tensor_config"]["granularity"] = "TENSORWISE"
    bmm = copy.deepcopy(base)
    bmm["operation"] = "BATCH_MATMUL"
    bmm["op_config"]["weight_tensor_config"]["granularity"] = "TENSORWISE"
    rules.append(bmm)
    if io != "int8":  # float boundary (uint8 is made from it by modify_model_interface)
        rules += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]
    if keep:
        rules.append({"regex": "^(?:" + "|".join(re.escape(s) + "$" for s in keep) + ")", "operation": "*",
                      "algorithm_key": "no_quantize"})
    return rules


TIED = {"PAD", "PADV2", "MIRROR_PAD", "RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "SLICE", "STRIDED_SLICE",
         "GATHER", "MAX_POOL_2D", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE"}
"""Ops whose int8 output carries its input's scale and zero point (TFLite spec)."""


def _inherit_tied(data: bytes, qsv: dict[str, tuple[float, float]], src: dict[str, str]) -> None:
    """Give the output of a :data:`TIED` op without an ONNX counterpart (e.g. the explicit PAD onnx2tf
    writes before a stride-2 convolution) its input's plan range, in graph order."""
    fb = flatbuf.load(data)
    sg = fb.subgraphs[0]
    for code, op in flatbuf.ops(fb):
        if code not in TIED or not len(op.inputs) or not len(op.outputs):
            continue
        x, y = flatbuf.name(sg.tensors[int(op.inputs[0])]), flatbuf.name(sg.tensors[int(op.outputs[0])])
        if y not in src and x in src and y in qsv:
            lo, hi = qsv[x]
            if code == "PADV2" and len(op.inputs) > 2:  # the pad value must lie in the range
                v = _const(fb, sg.tensors[int(op.inputs[2])])
                if v is not None and v.size:
                    lo, hi = min(lo, float(np.min(v))), max(hi, float(np.max(v)))
            qsv[y], src[y] = (lo, hi), src[x]


def plan_islands(data: bytes, onnx_of: dict[str, list[str]], float_tensors: set[str]) -> dict[str, str]:
    """Ops (by output scope) whose output carries a tensor the plan computes in higher precision: the
    plan's FP16/FP32 decisions (a recipe rule, the fidelity floor's escalation) become float islands."""
    fb = flatbuf.load(data)
    sg = fb.subgraphs[0]
    keep: dict[str, str] = {}
    for _, op in flatbuf.ops(fb):
        names = [flatbuf.name(sg.tensors[int(o)]) for o in op.outputs if o >= 0]
        hit = next((o for n in names for o in onnx_of.get(n, []) if o in float_tensors), None)
        if hit is not None:
            keep["".join(n + ";" for n in names)] = (f"the plan keeps the node producing {hit} in higher precision "
                                                     f"(float island)")
    return keep


def quantize(data: bytes, minmax: dict[str, tuple[float, float]], onnx_of: dict[str, list[str]],
             plan_ranges: dict[str, tuple[float, float]], masks: set[str], mode: str, per_tensor: bool,
             io: str, float_tensors: set[str] | None = None) -> Quantized:
    """Quantize the float model with the plan's ranges; see the module docstring.

    Args:
        data: float ``.tflite``.
        minmax: observed (min, max) of every float activation (TFLite names).
        onnx_of: TFLite tensor -> value-verified ONNX tensors (best first).
        plan_ranges: the plan's ONNX ranges.
        masks: ONNX tensors on mask paths (named in the reason when their values are sentinels).
        mode: ``int8`` | ``16x8``; per_tensor: one weight scale per tensor; io: int8 | uint8 | float.
        float_tensors: ONNX tensors the plan computes in FP16/FP32: their producing ops stay float.
    """
    from ai_edge_quantizer import quantizer

    data, _ = flatbuf.scalar_pad_values(data)
    int16 = mode == "16x8"
    qsv: dict[str, tuple[float, float]] = {}
    src: dict[str, str] = {}
    for t, (lo, hi) in minmax.items():
        onnx_names = onnx_of.get(t, [])
        hit = next((o for o in onnx_names if o in plan_ranges), None)
        if hit is not None:
            qsv[t], src[t] = plan_ranges[hit], hit
        else:
            qsv[t] = (lo, hi)
    _inherit_tied(data, qsv, src)
    tfl_masks = {t for t, names in onnx_of.items() if any(o in masks for o in names)}
    data, fitted = fit_biases(data, qsv, int16, per_tensor)
    keep = keep_float(data, qsv, tfl_masks, int16, per_tensor)
    if float_tensors:
        keep = {**plan_islands(data, onnx_of, float_tensors), **keep}
    q = quantizer.Quantizer(bytearray(data), recipe(mode, per_tensor, io, keep))
    cal = {t: {"min": np.float32(lo), "max": np.float32(hi)} for t, (lo, hi) in qsv.items() if not absurd(lo, hi)}
    cal.update({t: {"min": np.float32(-1.0), "max": np.float32(1.0)} for t, r in qsv.items() if absurd(*r)})
    out = bytes(q.quantize(cal, enable_progress_report=False).quantized_model)
    if io == "uint8":
        out = _io_uint8(out)
    res = Quantized(out, fitted_biases=fitted)
    fb = flatbuf.load(out)
    sg = fb.subgraphs[0]
    for code, op in flatbuf.ops(fb):
        for o in op.outputs:
            t = sg.tensors[int(o)]
            nm = flatbuf.name(t)
            if t.type in flatbuf.FLOAT_TYPES:
                scope = "".join(flatbuf.name(sg.tensors[int(x)]) + ";" for x in op.outputs if x >= 0)
                if scope in keep:
                    res.float_reasons[nm] = keep[scope]
                continue
            if t.type not in flatbuf.INT_ACT_TYPES or t.quantization is None or t.quantization.scale is None:
                continue
            base = nm[: -len("_quantized")] if nm.endswith("_quantized") else nm
            if base in src:
                res.from_plan += 1
                res.plan_tensors[nm] = src[base]
                want = act_params(*qsv[base], int16)
                got = (float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0]))
                if t.type == 3:  # uint8 boundary: zero point shifted by 128
                    got = (got[0], got[1] - 128)
                if abs(got[0] - want[0]) > 1e-6 * want[0] or abs(got[1] - want[1]) > 1:  # a tie rounds either way
                    res.deviations.append({"op": code, "tensor": nm, "onnx_tensor": src[base],
                                           "plan": [float(qsv[base][0]), float(qsv[base][1])],
                                           "scale": got[0], "zero_point": got[1],
                                           "reason": FIXED_OUTPUT.get(code, "inputs and output share one scale and "
                                                                            "zero point (TFLite spec / quantizer "
                                                                            "constraint)")})
            elif base in qsv:
                res.without_plan_range.append(nm)
    return res


def _io_uint8(data: bytes) -> bytes:
    """Float boundary -> uint8 model inputs/outputs (LiteRT's modify_model_interface tool)."""
    from ai_edge_litert import _pywrap_modify_model_interface as mmi

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.tflite", Path(d) / "out.tflite"
        src.write_bytes(data)
        rc = mmi.modify_model_interface(str(src), str(dst), 3, 3)  # TensorType UINT8
        if rc != 0:
            raise RuntimeError(f"modify_model_interface returned {rc}")
        return dst.read_bytes()
