"""Import an already quantized QDQ ONNX (ONNX Runtime ``quantize_static``, ModelOpt, a PT2E export) as
an FP32 reference plus a plan that keeps its scales.

- Weights stored as an integer initializer + DequantizeLinear become float initializers again
  (dequantized exactly); their scheme (per-channel when the scale is a vector) goes into the plan.
- A QuantizeLinear -> DequantizeLinear pair on an activation is removed; its (scale, zero point)
  becomes the plan range that reproduces the same scale under the same scheme: zero point 0 (symmetric,
  TensorRT/ModelOpt) -> ``[-qmax*s, qmax*s]``; otherwise -> ``[(qmin - z)*s, (qmax - z)*s]`` (asymmetric,
  uint8 or int8).
- Nodes that consumed a dequantized tensor are INT8 in the plan, the others FP32.

So an imported model can be lowered to the other targets, checked against their rules and verified.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from deployer.graph import GraphView
from deployer.plan import Granularity, NodeDecision, Precision, TensorRange, WeightScheme

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
           np.dtype(np.uint16): (0, 65535)}


def is_qdq_model(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def _range_from(scale: float, zp: int, dtype: np.dtype) -> tuple[float, float]:
    qmin, qmax = _QRANGE.get(np.dtype(dtype), (-128, 127))
    if zp == 0 and qmin < 0:
        return -(qmax * scale), qmax * scale
    return (qmin - zp) * scale, (qmax - zp) * scale


def import_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, NodeDecision], dict[str, TensorRange],
                                                 dict[str, Any]]:
    """Strip Q/DQ from ``model``.

    Returns:
        (FP32 model, node decisions, activation ranges, summary for the report).
    """
    view = GraphView(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = dict(view.constants)
    rename: dict[str, str] = {}
    ranges: dict[str, TensorRange] = {}
    weight_schemes: dict[str, WeightScheme] = {}  # dequantized tensor -> scheme
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    int8_consumers_of: set[str] = set()
    for node in g.node:
        if node.op_type != "DequantizeLinear":
            continue
        x, s = node.input[0], node.input[1]
        z = node.input[2] if len(node.input) > 2 and node.input[2] else None
        scale = consts.get(s)
        if scale is None:
            continue
        zero = consts.get(z) if z else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if x in consts:  # weight: integer initializer + DQ
            q = consts[x].astype(np.float64)
            zz = np.zeros_like(scale, dtype=np.float64) if zero is None else zero.astype(np.float64)
            if scale.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                w = (q - zz.reshape(shape)) * scale.astype(np.float64).reshape(shape)
            else:
                w = (q - float(zz.reshape(-1)[0])) * float(scale.reshape(-1)[0])
            name = f"{node.output[0]}__imported_fp32"
            new_inits.append(numpy_helper.from_array(w.astype(np.float32), name))
            rename[node.output[0]] = name
            weight_schemes[name] = WeightScheme(granularity=Granularity.PER_CHANNEL if scale.size > 1
                                                else Granularity.PER_TENSOR)
            drop.add(node.name)
            continue
        q_node = view.producer.get(x)
        if q_node is None or q_node.op_type != "QuantizeLinear":
            continue
        src = q_node.input[0]
        dtype = zero.dtype if zero is not None else np.dtype(np.uint8)
        zp = int(zero.reshape(-1)[0]) if zero is not None else 0
        if src in consts:  # a Q/DQ pair on a float weight
            weight_schemes[src] = WeightScheme(granularity=Granularity.PER_CHANNEL if scale.size > 1
                                               else Granularity.PER_TENSOR)
            rename[node.output[0]] = src
        else:
            lo, hi = _range_from(float(scale.reshape(-1)[0]), zp, dtype)
            ranges[src] = TensorRange(min(lo, 0.0), max(hi, 0.0))
            rename[node.output[0]] = src
            int8_consumers_of.add(src)
        drop.update({node.name, q_node.name})
    nodes = [n for n in g.node if n.name not in drop]
    decisions: dict[str, NodeDecision] = {}
    for n in nodes:
        quantized_input = False
        weight = None
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
                quantized_input = True
                if n.input[i] in weight_schemes:
                    weight = weight_schemes[n.input[i]]
        if quantized_input:
            decisions[n.name] = NodeDecision(n.op_type, Precision.INT8, weight, "imported from the QDQ model")
    for o in g.output:
        if o.name in rename:
            raise_name = rename[o.name]
            for n in nodes:
                for i, t in enumerate(n.output):
                    if t == raise_name:
                        n.output[i] = o.name
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    summary = {"imported_activation_ranges": len(ranges), "imported_weights": len(weight_schemes),
               "int8_nodes": len(decisions)}
    return out, decisions, ranges, summary
