"""Recognition of graph patterns that recipes address and calibration must treat specially.

- Additive attention masks: transformer exports turn an integer ``attention_mask`` into
  ``(1 - mask) * -inf`` (or the float minimum) and add it to the attention scores. Such tensors must
  never be quantized: a min/max observer yields an infinite scale (ONNX Runtime writes it silently)
  and histogram observers crash (DESIGN.md section 3). :func:`mask_paths` finds every tensor computed
  only from integer graph inputs (the mask, token ids' shapes) up to and including the additive mask,
  plus any float tensor whose calibrated magnitude is absurd (>= :data:`MASK_MAGNITUDE`).
- residual ``Add`` (two activation inputs) feeding a LayerNorm: the transformer residual stream,
  whose few outlier channels make per-tensor INT8 fail (Bondarenko et al. 2021, "Understanding and
  Overcoming the Challenges of Efficient Transformer Quantization").
- LayerNorm (ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div [-> Mul -> Add], or the
  fused ``LayerNormalization`` op), GELU (``Erf`` based: Div -> Erf -> Add -> Mul -> Mul, or ``Gelu``),
  and Softmax attention (MatMul -> [Div|Mul] -> [Add mask] -> Softmax -> MatMul) by :func:`find_patterns`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from deployer.graph import GraphView

MASK_MAGNITUDE = 1e4
INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL, onnx.TensorProto.INT8,
             onnx.TensorProto.UINT8}


def mask_paths(model: onnx.ModelProto) -> set[str]:
    """Tensors on the path from integer graph inputs (attention masks) to float additive masks.

    A tensor is on a mask path when it is computed only from integer graph inputs and constants
    (never from a float activation): e.g. ``Cast(mask) -> Sub(1, .) -> Mul(., -1e9)``. The float
    tensors among them feed the scores through ``Add`` and are never quantized.
    """
    view = GraphView(model)
    int_inputs = {i.name for i in model.graph.input if i.name in view.graph_inputs
                  and i.type.tensor_type.elem_type in INT_TYPES}
    derived: set[str] = set(int_inputs)
    for node in model.graph.node:  # graph order is topological
        ins = [i for i in node.input if i]
        if not ins:
            continue
        from_mask = [i for i in ins if i in derived]
        others_const = all(i in derived or view.is_constant(i) for i in ins)
        if from_mask and others_const and node.op_type not in ("Gather",):
            derived.update(o for o in node.output if o)
    return derived - int_inputs


def absurd_ranges(ranges: dict[str, tuple[float, float]]) -> set[str]:
    """Tensors whose calibrated range is non-finite or beyond :data:`MASK_MAGNITUDE` in magnitude."""
    out = set()
    for name, (lo, hi) in ranges.items():
        if not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) >= MASK_MAGNITUDE:
            out.add(name)
    return out


@dataclass
class Patterns:
    """Node names of recognised patterns (for recipes and the report)."""

    layernorm: list[list[str]] = field(default_factory=list)
    gelu: list[list[str]] = field(default_factory=list)
    attention: list[list[str]] = field(default_factory=list)
    mask_tensors: list[str] = field(default_factory=list)
    residual_add: list[str] = field(default_factory=list)


def _follow(view: GraphView, node: onnx.NodeProto, ops: list[str]) -> list[onnx.NodeProto] | None:
    """Follow single consumers through the given op types; None if the chain breaks."""
    chain = [node]
    cur = node
    for op in ops:
        nxt = [c for c in view.consumers.get(cur.output[0], []) if c.op_type == op]
        if not nxt:
            return None
        cur = nxt[0]
        chain.append(cur)
    return chain


def find_patterns(model: onnx.ModelProto) -> Patterns:
    """Find LayerNorm, GELU and Softmax-attention blocks and the additive-mask tensors."""
    view = GraphView(model)
    p = Patterns(mask_tensors=sorted(mask_paths(model)))
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            p.layernorm.append([node.name])
        elif node.op_type == "ReduceMean":
            chain = _follow(view, node, ["Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div"])
            if chain:
                p.layernorm.append([n.name for n in chain])
        elif node.op_type == "Gelu":
            p.gelu.append([node.name])
        elif node.op_type == "Erf":
            chain = _follow(view, node, ["Add", "Mul"])
            prod = view.producer.get(node.input[0])
            if chain and prod is not None and prod.op_type in ("Div", "Mul"):
                p.gelu.append([prod.name] + [n.name for n in chain])
        elif node.op_type == "Softmax":
            block = [node.name]
            src = view.producer.get(node.input[0])
            while src is not None and src.op_type in ("Add", "Div", "Mul", "Where"):
                block.insert(0, src.name)
                src = next((view.producer[i] for i in src.input if i in view.producer
                            and not view.is_constant(i) and i not in p.mask_tensors), None)
            if src is not None and src.op_type == "MatMul":
                block.insert(0, src.name)
            after = [c for c in view.consumers.get(node.output[0], []) if c.op_type == "MatMul"]
            block += [c.name for c in after]
            if len(block) > 1:
                p.attention.append(block)
    starts = {c[0] for c in p.layernorm}
    for node in model.graph.node:
        if node.op_type != "Add" or any(view.is_constant(i) for i in node.input[:2]):
            continue
        if any(c.name in starts for c in view.consumers.get(node.output[0], [])):
            p.residual_add.append(node.name)
    return p
