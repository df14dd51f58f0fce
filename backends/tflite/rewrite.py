"""ONNX rewrites before conversion that keep information int8 per-tensor activations would lose.

Concat of very different ranges feeding convolutions: TFLite's CONCATENATION shares one scale between
its inputs and its output (TFLite spec), so a [0, 1] input concatenated with a [-100, 100] one is
requantized to a 0.78 step and erased (issue 17). A convolution is linear in its input channels, so
``Conv(Concat(a, b), W) = Conv(a, W[:, :Ca]) + Conv(b, W[:, Ca:])`` exactly (zero padding included):
each input then reaches its own convolution at its own scale, and only the sums, already in the
output's range, are added. Applied where the inputs' plan ranges differ by at least :data:`RATIO`.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from deployer.plan import QuantPlan

RATIO = 8.0
"""Smallest ratio of the largest to the smallest input magnitude that splits a Concat's convolutions."""


def split_concat_convs(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` where each channel Concat whose inputs' ranges differ by ``RATIO`` or more and
    whose every consumer is a group-1 Conv with a constant weight is distributed over those Convs.

    Returns:
        (model, names of the Concat nodes split); the model is an unchanged copy when none is.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inferred = onnx.shape_inference.infer_shapes(out)
    ranks: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        ranks[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    split: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    drop: set[int] = set()
    for cat in g.node:
        if cat.op_type != "Concat" or cat.output[0] in outputs:
            continue
        axis = next((a.i for a in cat.attribute if a.name == "axis"), 0)
        shapes = [ranks.get(i) for i in cat.input]
        if any(s is None or len(s) < 3 for s in shapes) or axis not in (1, 1 - len(shapes[0] or [])):
            continue
        chans = [s[1] for s in shapes if s is not None]
        mags = [max(abs(plan.ranges[i].min), abs(plan.ranges[i].max)) if i in plan.ranges else None for i in cat.input]
        if any(c <= 0 for c in chans) or any(m is None for m in mags):
            continue
        present = [m for m in mags if m is not None]
        if max(present) < RATIO * max(min(present), 1e-12):
            continue
        convs = consumers.get(cat.output[0], [])
        if not convs or any(c.op_type != "Conv" or c.input[1] not in inits
                            or next((a.i for a in c.attribute if a.name == "group"), 1) != 1 for c in convs):
            continue
        for conv in convs:
            w = numpy_helper.to_array(inits[conv.input[1]])
            if w.shape[1] != sum(chans):
                break
        else:
            for conv in convs:
                w = numpy_helper.to_array(inits[conv.input[1]])
                parts, start = [], 0
                for k, (x, c) in enumerate(zip(cat.input, chans)):
                    wname = f"{conv.input[1]}__part{k}"
                    g.initializer.append(numpy_helper.from_array(w[:, start:start + c].copy(), wname))
                    start += c
                    ins = [x, wname] + ([conv.input[2]] if k == 0 and len(conv.input) > 2 and conv.input[2] else [])
                    y = f"{conv.output[0]}__part{k}"
                    new_nodes.append(helper.make_node("Conv", ins, [y], name=f"{conv.name}__part{k}",
                                                      **{a.name: helper.get_attribute_value(a) for a in conv.attribute}))
                    parts.append(y)
                acc = parts[0]
                for k, p in enumerate(parts[1:], 1):
                    nxt = conv.output[0] if k == len(parts) - 1 else f"{conv.output[0]}__sum{k}"
                    new_nodes.append(helper.make_node("Add", [acc, p], [nxt], name=f"{conv.name}__sum{k}"))
                    acc = nxt
                drop.add(id(conv))
            drop.add(id(cat))
            split.append(cat.name or cat.output[0])
    if not split:
        return out, []
    from deployer.qdq import _toposort

    kept = [n for n in g.node if id(n) not in drop] + new_nodes
    del g.node[:]
    g.node.extend(_toposort(kept, {i.name for i in g.input} | {t.name for t in g.initializer}))
    return out, split
