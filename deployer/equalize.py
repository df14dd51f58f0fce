"""Cross-layer equalization (CLE) of consecutive convolutions, exact in FP32.

Source: Nagel, van Baalen, Blankevoort, Welling 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction" (ICCV), section 4.1. For a layer ``A`` whose output channel ``i``
feeds, through a positively homogeneous activation, input channel ``i`` of the next layer ``B``:
``r1_i = max|W_A[i]|``, ``r2_i = max|W_B[:, i]|`` (depthwise ``B``: ``max|W_B[i]|``),
``s_i = sqrt(r1_i / r2_i)``; ``W_A[i] /= s_i``, ``b_A[i] /= s_i``, ``W_B[:, i] *= s_i``. Both layers then
have the per-channel weight range ``sqrt(r1_i * r2_i)``, so per-tensor and per-channel weight grids
and the activation grid between them are used more evenly (the paper's fix for MobileNet-style
depthwise layers whose folded BatchNorm leaves channel ranges orders of magnitude apart).

Activations between the two layers: ``Relu`` (and no activation) commute with a positive per-channel
scale. ``Clip(0, m)`` (ReLU6) does not: the paper replaces ReLU6 by ReLU; here it becomes
``Relu`` followed by ``Min(x, m / s)`` with a per-channel bound, which keeps the model exact.

The pass repeats over all pairs (:data:`ITERATIONS`) so chains ``A -> B -> C`` converge, as in the
paper. Equalization changes tensor ranges, so it runs on the FP32 reference *before* calibration.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deployer.graph import GraphView

ITERATIONS = 8
SCALE_LIMITS = (0.25, 4.0)
"""Clamp of the cumulative ``s_i`` of a pair; channels with a zero weight range keep ``s_i = 1``."""


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _clip_bounds(node: onnx.NodeProto, view: GraphView) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip with constant bounds, None when a bound is not a constant."""
    vals: list[float | None] = []
    for k in (1, 2):
        if len(node.input) > k and node.input[k]:
            c = view.constants.get(node.input[k])
            if c is None:
                return None
            vals.append(float(np.asarray(c).reshape(-1)[0]))
        else:
            vals.append(None)
    return vals[0], vals[1]


def find_pairs(model: onnx.ModelProto) -> list[tuple[str, str | None, str]]:
    """Equalizable (A, activation or None, B) node-name triples.

    A: Conv (any group) with constant weight; its output read only by the activation (or by B).
    Activation: ``Relu`` or ``Clip`` with min 0 and a constant max, read only by B.
    B: Conv with constant weight, group 1 or depthwise (group = channels, one input channel per group).
    """
    view = GraphView(model)
    pairs = []
    for a in model.graph.node:
        if a.op_type != "Conv" or len(a.input) < 2 or a.input[1] not in view.constants:
            continue
        users = view.consumers.get(a.output[0], [])
        if len(users) != 1 or a.output[0] in {o.name for o in model.graph.output}:
            continue
        act: onnx.NodeProto | None = None
        nxt = users[0]
        if nxt.op_type in ("Relu", "Clip"):
            if nxt.op_type == "Clip":
                bounds = _clip_bounds(nxt, view)
                if bounds is None or bounds[0] != 0.0:
                    continue
            act = nxt
            after = view.consumers.get(nxt.output[0], [])
            if len(after) != 1 or nxt.output[0] in {o.name for o in model.graph.output}:
                continue
            nxt = after[0]
        if nxt.op_type != "Conv" or len(nxt.input) < 2 or nxt.input[1] not in view.constants:
            continue
        wa, wb = view.constants[a.input[1]], view.constants[nxt.input[1]]
        group_b = _attr(nxt, "group", 1)
        channels = wa.shape[0]
        if group_b == 1 and wb.shape[1] == channels or group_b == channels and wb.shape[1] == 1:
            pairs.append((a.name, act.name if act is not None else None, nxt.name))
    return pairs


def equalize(model: onnx.ModelProto, iterations: int = ITERATIONS) -> tuple[onnx.ModelProto, dict[str, float]]:
    """A copy of ``model`` with every :func:`find_pairs` pair equalized (FP32-exact up to rounding).

    Args:
        model: FP32 ONNX model, BatchNorm already folded (:func:`deployer.prepare.fold_batchnorm`).
        iterations: passes over all pairs.

    Returns:
        (equalized model, per pair ``"A->B"`` the ratio of the largest to the smallest per-channel
        weight range of ``B`` after equalization divided by the same before; < 1 means more even).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs = find_pairs(out)
    if not pairs:
        return out, {}
    view = GraphView(out)
    w = {n: np.asarray(view.constants[view.nodes[n].input[1]], np.float64).copy()
         for p in pairs for n in (p[0], p[2])}
    b = {p[0]: (np.asarray(view.constants[view.nodes[p[0]].input[2]], np.float64).copy()
                if len(view.nodes[p[0]].input) > 2 and view.nodes[p[0]].input[2] else None) for p in pairs}
    total = {p: np.ones(w[p[0]].shape[0]) for p in pairs}

    def spread(arr: np.ndarray, depthwise: bool) -> float:
        r = np.abs(arr).reshape(arr.shape[0], -1).max(1) if depthwise else np.abs(arr).max(axis=(0, *range(2, arr.ndim)))
        r = r[r > 0]
        return float(r.max() / r.min()) if r.size else 1.0

    before = {p: spread(w[p[2]], _attr(view.nodes[p[2]], "group", 1) > 1) for p in pairs}
    for _ in range(iterations):
        for p in pairs:
            wa, wb = w[p[0]], w[p[2]]
            dw = _attr(view.nodes[p[2]], "group", 1) > 1
            r1 = np.abs(wa).reshape(wa.shape[0], -1).max(1)
            r2 = np.abs(wb).reshape(wb.shape[0], -1).max(1) if dw else np.abs(wb).max(axis=(0, *range(2, wb.ndim)))
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            s = np.clip(s, SCALE_LIMITS[0] / total[p], SCALE_LIMITS[1] / total[p])  # bound the cumulative scale
            shape_a = (-1,) + (1,) * (wa.ndim - 1)
            w[p[0]] = wa / s.reshape(shape_a)
            if b[p[0]] is not None:
                b[p[0]] = b[p[0]] / s
            w[p[2]] = wb * (s.reshape(shape_a) if dw else s.reshape((1, -1) + (1,) * (wb.ndim - 2)))
            total[p] = total[p] * s
    inits = {i.name: i for i in out.graph.initializer}
    for node_name, arr in w.items():
        _set_const(out, view, view.nodes[node_name], 1, arr, inits)
    for node_name, bias in b.items():
        if bias is not None:
            _set_const(out, view, view.nodes[node_name], 2, bias, inits)
    for p in pairs:
        if p[1] is not None and view.nodes[p[1]].op_type == "Clip":
            _clip_to_relu_min(out, view.nodes[p[1]], view, total[p])
    used = {i for n in out.graph.node for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    after = {p: spread(w[p[2]], _attr(view.nodes[p[2]], "group", 1) > 1) for p in pairs}
    return out, {f"{p[0]}->{p[2]}": round(after[p] / before[p], 6) if before[p] else 1.0 for p in pairs}


def _set_const(model: onnx.ModelProto, view: GraphView, node: onnx.NodeProto, idx: int, arr: np.ndarray,
               inits: dict[str, onnx.TensorProto]) -> None:
    """Give ``node`` input ``idx`` a fresh initializer holding ``arr`` (other readers keep the old one)."""
    old = node.input[idx]
    dtype = np.asarray(view.constants[old]).dtype
    name = f"{old}__cle_{node.name}"
    if name in inits:
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(dtype), name))
    else:
        t = numpy_helper.from_array(arr.astype(dtype), name)
        model.graph.initializer.append(t)
        inits[name] = t
    for n in model.graph.node:
        if n.name == node.name:
            n.input[idx] = name


def _clip_to_relu_min(model: onnx.ModelProto, clip: onnx.NodeProto, view: GraphView, s: np.ndarray) -> None:
    """Replace ``Clip(x, 0, m)`` by ``Min(Relu(x), m / s)`` with ``m / s`` of shape (1, C, 1, 1)."""
    bounds = _clip_bounds(clip, view)
    assert bounds is not None and bounds[1] is not None
    bound = numpy_helper.from_array((bounds[1] / s).astype(np.float32).reshape(1, -1, 1, 1), f"{clip.name}__cle_max")
    model.graph.initializer.append(bound)
    mid = f"{clip.output[0]}__relu"
    relu = helper.make_node("Relu", [clip.input[0]], [mid], name=f"{clip.name}__relu")
    mn = helper.make_node("Min", [mid, bound.name], [clip.output[0]], name=clip.name)
    nodes = list(model.graph.node)
    pos = next(i for i, n in enumerate(nodes) if n.name == clip.name)
    nodes[pos:pos + 1] = [relu, mn]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
