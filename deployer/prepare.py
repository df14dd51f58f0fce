"""Graph preparation passes applied to the FP32 reference before calibration.

Each pass is small, returns a new model and keeps the function of the graph:

- :func:`constants_to_initializers`: ``Constant`` nodes become initializers (some exporters keep every
  weight that way; quantizers look for weights among initializers).
- :func:`fold_batchnorm`: ``BatchNormalization`` following a Conv / ConvTranspose / Gemm (its only
  consumer) is folded into the weights and bias: ``w' = w * g / sqrt(v + eps)`` along the output-channel
  axis (Conv axis 0; ConvTranspose axis 1, per group; Gemm the output column) and
  ``b' = (b - m) * g / sqrt(v + eps) + beta``, creating a bias when there is none (Jacob et al. 2018,
  "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
  section 3.2).

Constant folding and dead-code removal are done by onnxslim (:func:`deployer.model_io.canonicalize`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from deployer.graph import GraphView


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every tensor-valued ``Constant`` node into ``graph.initializer`` (same tensor name)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.type == onnx.AttributeProto.TENSOR:
            t = onnx.TensorProto()
            t.CopyFrom(value.t)
            t.name = node.output[0]
            out.graph.initializer.append(t)
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference-mode BatchNormalization into the preceding Conv/ConvTranspose/Gemm."""
    out = constants_to_initializers(model)
    view = GraphView(out)
    inits = {i.name: i for i in out.graph.initializer}
    graph_outputs = {o.name for o in out.graph.output}
    removed: set[str] = set()
    rename: dict[str, str] = {}
    for bn in list(out.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 and any(bn.output[1:]):
            continue
        prod = view.producer.get(bn.input[0])
        if prod is None or prod.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        if len(view.consumers.get(prod.output[0], [])) != 1 or prod.output[0] in graph_outputs:
            continue
        if not all(i in inits for i in bn.input[1:5]) or prod.input[1] not in inits:
            continue
        if prod.op_type == "Gemm" and any(a.name == "transA" and a.i for a in prod.attribute):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[prod.input[1]]).astype(np.float64)
        if prod.op_type == "Conv":
            w = w * factor.reshape(-1, *([1] * (w.ndim - 1)))
        elif prod.op_type == "ConvTranspose":
            group = next((a.i for a in prod.attribute if a.name == "group"), 1)
            cin, cout_g = w.shape[0], w.shape[1]
            wg = w.reshape(group, cin // group, cout_g, *w.shape[2:])
            wg = wg * factor.reshape(group, 1, cout_g, *([1] * (w.ndim - 2)))
            w = wg.reshape(w.shape)
        else:
            trans_b = any(a.name == "transB" and a.i for a in prod.attribute)
            w = w * (factor[:, None] if trans_b else factor[None, :])
        has_bias = len(prod.input) > 2 and prod.input[2] and prod.input[2] in inits
        b = numpy_helper.to_array(inits[prod.input[2]]).astype(np.float64) if has_bias else np.zeros_like(mean)
        b = (b - mean) * factor + beta
        w_name, b_name = f"{prod.name}.weight_bnfolded", f"{prod.name}.bias_bnfolded"
        out.graph.initializer.extend([numpy_helper.from_array(w.astype(np.float32), w_name),
                                      numpy_helper.from_array(b.astype(np.float32), b_name)])
        prod.input[1] = w_name
        if len(prod.input) > 2:
            prod.input[2] = b_name
        else:
            prod.input.append(b_name)
        rename[bn.output[0]] = prod.output[0]
        removed.add(bn.name)
    if not removed:
        return out
    nodes = [n for n in out.graph.node if n.name not in removed]
    for n in nodes:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    for o in out.graph.output:
        if o.name in rename:  # keep the graph output's name: rename the producer's output instead
            src = rename[o.name]
            for n in nodes:
                for i, t in enumerate(n.output):
                    if t == src:
                        n.output[i] = o.name
                for i, t in enumerate(n.input):
                    if t == src:
                        n.input[i] = o.name
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """All preparation passes in order."""
    return fold_batchnorm(constants_to_initializers(model))
