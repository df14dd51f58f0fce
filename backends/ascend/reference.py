"""A NumPy reference interpreter of the Ascend deploy form's integer arithmetic.

ONNX Runtime cannot run AscendQuant/AscendDequant, so this interprets the deploy form the way the
Ascend cube computes it: (int8 activation - AscendQuant offset) x int8 weight accumulated in int32
(zero padding in the de-offset domain), plus the int32 bias, then ``acc * deq_scale``. It covers the ops of small test models (Conv with groups,
Gemm, MatMul, Add, Relu, Sigmoid, Flatten, GlobalAveragePool); anything else raises
``NotImplementedError``. It is a test oracle, not a runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from backends.ascend.deploy_form import unpack_deq_scale


def _attrs(n: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _conv(x: np.ndarray, w: np.ndarray, a: dict[str, Any], pad_value: float = 0.0) -> np.ndarray:
    """2-D convolution, NCHW, in the dtype of ``x`` (int64 for integer inputs)."""
    group = int(a.get("group", 1))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    strides = list(a.get("strides", [1, 1]))
    dil = list(a.get("dilations", [1, 1]))
    if dil != [1, 1]:
        raise NotImplementedError("dilated Conv")
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=pad_value)
    n, c, _, _ = xp.shape
    oc, icg, kh, kw = w.shape
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    out = []
    ocg = oc // group
    for gi in range(group):
        xs = win[:, gi * icg:(gi + 1) * icg]  # n, icg, oh, ow, kh, kw
        ws = w[gi * ocg:(gi + 1) * ocg]  # ocg, icg, kh, kw
        out.append(np.einsum("ncxykl,ockl->noxy", xs, ws))
    return np.concatenate(out, axis=1)


def run_deploy_form(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the deploy form on one sample; returns the graph outputs (float32)."""
    env: dict[str, Any] = {k: np.asarray(v) for k, v in feeds.items()}
    offsets: dict[str, float] = {}  # int8 tensor -> the AscendQuant offset it carries
    for i in model.graph.initializer:
        env[i.name] = numpy_helper.to_array(i)
    for n in model.graph.node:
        a = _attrs(n)
        x: list[Any] = [env[i] if i else None for i in n.input]
        op = n.op_type
        if op == "AscendQuant":
            q = np.rint(x[0].astype(np.float64) * float(a["scale"]) + float(a["offset"]))
            y = np.clip(q, -128, 127).astype(np.int8)
            offsets[n.output[0]] = float(a["offset"])
        elif op == "AscendAntiQuant":
            y = ((x[0].astype(np.float64) + float(a["offset"])) * float(a["scale"])).astype(np.float32)
        elif op == "AscendDequant":
            scale, _ = unpack_deq_scale(x[1])
            acc = x[0].astype(np.float64)
            shape = [1] * acc.ndim
            if scale.size > 1:
                shape[1 if acc.ndim == 4 else -1] = -1
            y = (acc * scale.astype(np.float64).reshape(shape)).astype(np.float32)
        elif op == "Conv":
            integer = x[0].dtype == np.int8
            xx = x[0].astype(np.int64) - int(offsets.get(n.input[0], 0)) if integer else x[0].astype(np.float64)
            ww = x[1].astype(np.int64) if integer else x[1].astype(np.float64)
            y = _conv(xx, ww, a)
            if len(x) > 2 and x[2] is not None:
                y = y + x[2].reshape(1, -1, 1, 1)
            y = y.astype(np.int32) if integer else y.astype(np.float32)
        elif op in ("Gemm", "MatMul"):
            integer = x[0].dtype == np.int8
            dt = np.int64 if integer else np.float64
            aa, bb = x[0].astype(dt), x[1].astype(dt)
            if integer:
                aa = aa - int(offsets.get(n.input[0], 0))
            if op == "Gemm":
                if a.get("transA", 0):
                    aa = aa.T
                if a.get("transB", 0):
                    bb = bb.T
                if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                    raise NotImplementedError("Gemm alpha/beta != 1")
            y = aa @ bb
            if op == "Gemm" and len(x) > 2 and x[2] is not None:
                y = y + x[2]
            y = y.astype(np.int32) if integer else y.astype(np.float32)
        elif op == "Add":
            y = x[0] + x[1]
        elif op == "Relu":
            y = np.maximum(x[0], 0)
        elif op == "Sigmoid":
            y = (1.0 / (1.0 + np.exp(-x[0].astype(np.float64)))).astype(np.float32)
        elif op == "Flatten":
            y = x[0].reshape(x[0].shape[0], -1)
        elif op == "GlobalAveragePool":
            y = x[0].mean(axis=(2, 3), keepdims=True).astype(np.float32)
        else:
            raise NotImplementedError(f"reference interpreter: {op}")
        env[n.output[0]] = y
    return [np.asarray(env[o.name], dtype=np.float32) for o in model.graph.output]
