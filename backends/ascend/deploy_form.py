"""The Ascend *deploy form* of a QDQ graph: what ATC compiles (it does not compile raw Q/DQ).

Encoding (DESIGN.md section 3; Huawei AMCT/msModelSlim deploy models; CANN Ascend IR operator specs):

- ``AscendQuant(x) -> int8``: ``y = round(x * scale + offset)`` with FLOAT attributes ``scale =
  1 / x_scale`` and ``offset = x_zero_point`` (CANN's ONNX parser reads a FLOAT ``offset``; msModelSlim's
  label-free path writes an INT, which the parser ignores), ``dst_type = 2`` (DT_INT8),
  ``sqrt_mode = 0``, ``round_mode = "Round"``.
- The Conv/ConvTranspose/Gemm/MatMul itself keeps its ONNX op type with an int8 weight initializer
  (Gemm weights pre-transposed to ``(K, N)`` with ``transB = 0``) and an int32 bias
  ``round(b / (x_scale * w_scale))``. The activation offset is *not* folded into the bias: ATC
  handles it from AscendQuant's ``offset`` (msModelSlim writes the same bias with offsets of -128;
  benchmarks/ascend_msmodelslim_crosscheck.py checks this on its output).
- ``AscendDequant(acc, deq_scale) -> float``: ``deq_scale`` uint64 per output channel (one value for a
  per-tensor weight), low 32 bits the float32 bits of ``x_scale * w_scale``, bits 40-47 the weight
  offset (0: symmetric weights). Attributes ``sqrt_mode = 0``, ``relu_flag = 0``, ``dtype = 0``.
- Activations quantized for an op without an int8 kernel here (Add, AveragePool inputs) become
  ``AscendAntiQuant(AscendQuant(x))`` (``y = (q + offset) * scale`` with ``offset = -x_zero_point``,
  ``scale = x_scale``): the same rounding as the Q/DQ pair.

Custom ops are in the default domain, as CANN's ONNX parser expects; ONNX Runtime cannot run the deploy
form, so :mod:`backends.ascend.reference` interprets its integer arithmetic in NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deployer.errors import UnsupportedModelError

DT_FLOAT, DT_INT8 = 0, 2  # ge::DataType values (CANN graph/types.h)
INT8_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def pack_deq_scale(deq_scale: np.ndarray | float, weight_offset: np.ndarray | int = 0) -> np.ndarray:
    """Pack AscendDequant's ``deq_scale``: float32 bits in bits 0-31, weight offset (int8) in bits 40-47.

    Args:
        deq_scale: ``x_scale * w_scale`` per output channel (float, shape ``(C,)`` or scalar).
        weight_offset: weight zero point(s), int8 (0 for symmetric weights).

    Returns:
        uint64 array of shape ``(C,)`` (``(1,)`` for a scalar).
    """
    s = np.atleast_1d(np.asarray(deq_scale, dtype=np.float32))
    low = s.view(np.uint32).astype(np.uint64)
    off = np.broadcast_to(np.asarray(weight_offset, dtype=np.int64), s.shape).astype(np.uint8).astype(np.uint64)
    return low | (off << np.uint64(40))


def unpack_deq_scale(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_deq_scale`: (float32 scales, int8 weight offsets)."""
    p = np.asarray(packed, dtype=np.uint64)
    scale = (p & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    off = ((p >> np.uint64(40)) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
    return scale, off


@dataclass
class DeployRecord:
    """Per-layer scale/offset record of the deploy form (``quant_params.json``)."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    fake_quant: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"int8_layers": self.layers, "quantized_activations": self.fake_quant}


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_deploy_form(qdq: onnx.ModelProto) -> tuple[onnx.ModelProto, DeployRecord]:
    """Convert an Ascend-legal QDQ model (tied Q/DQ pairs, weights as Q/DQ on float initializers) into
    the deploy form.

    Raises:
        UnsupportedModelError: a Q/DQ layout the checker would reject (untied pair, per-channel
            activation, asymmetric weight).
    """
    g = qdq.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def pair_of(t: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
        dq = producer.get(t)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            raise UnsupportedModelError(f"{dq.name}: DequantizeLinear without its QuantizeLinear; Ascend needs "
                                        f"tied Q/DQ pairs (run `deploy check --target ascend`)")
        return q, dq

    def qparams(q: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        s = inits[q.input[1]].astype(np.float32)
        z = inits[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros_like(s, dtype=np.int8)
        return s, z.astype(np.int32)

    rec = DeployRecord()
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    quant_out: dict[str, str] = {}  # float tensor -> its AscendQuant int8 output
    anti_out: dict[str, str] = {}  # float tensor -> AscendAntiQuant output
    emitted_before: dict[str, list[onnx.NodeProto]] = {}

    def ascend_quant(x: str, q: onnx.NodeProto, before: str) -> str:
        if x not in quant_out:
            s, z = qparams(q)
            if s.size != 1:
                raise UnsupportedModelError(f"{q.name}: per-channel activation quantization; Ascend quantizes "
                                            f"activations per tensor")
            out = f"{x}_ascend_quant"
            emitted_before.setdefault(before, []).append(helper.make_node(
                "AscendQuant", [x], [out], name=f"{x}_AscendQuant", scale=float(1.0 / float(s.reshape(-1)[0])),
                offset=float(z.reshape(-1)[0]), quant_bit=8, sqrt_mode=0, round_mode="Round", dst_type=DT_INT8))
            quant_out[x] = out
            rec.fake_quant.setdefault(x, {"scale": float(s.reshape(-1)[0]), "offset": int(z.reshape(-1)[0])})
        return quant_out[x]

    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        act = pair_of(n.input[0]) if n.input else None
        wpair = pair_of(n.input[1]) if n.op_type in INT8_COMPUTE_OPS and len(n.input) > 1 else None
        if n.op_type in INT8_COMPUTE_OPS and act is not None and wpair is not None:
            _int8_layer(n, n2, act, wpair, inits, qparams, ascend_quant, new_nodes, new_inits, rec, emitted_before)
            continue
        for i, t in enumerate(n.input):
            p = pair_of(t) if t else None
            if p is None:
                continue
            q, dq = p
            x = q.input[0]
            if x in inits:
                raise UnsupportedModelError(f"{n.name}: quantized constant input {x!r} outside Conv/ConvTranspose/"
                                            f"Gemm/MatMul; Ascend cannot lower it")
            if x not in anti_out:
                qi = ascend_quant(x, q, n.name)
                s, z = qparams(q)
                out = f"{x}_ascend_antiquant"
                emitted_before.setdefault(n.name, []).append(helper.make_node(
                    "AscendAntiQuant", [qi], [out], name=f"{x}_AscendAntiQuant", scale=float(s.reshape(-1)[0]),
                    offset=float(-z.reshape(-1)[0]), sqrt_mode=0, dtype=DT_FLOAT))
                anti_out[x] = out
            n2.input[i] = anti_out[x]
        new_nodes.extend(emitted_before.pop(n.name, []))
        new_nodes.append(n2)

    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    used = {i for nd in new_nodes for i in nd.input}
    keep = [i for i in qdq.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep + new_inits)
    del out.graph.value_info[:]
    return out, rec


def _int8_layer(n: onnx.NodeProto, n2: onnx.NodeProto, act: tuple[onnx.NodeProto, onnx.NodeProto],
                wpair: tuple[onnx.NodeProto, onnx.NodeProto], inits: dict[str, np.ndarray], qparams: Any,
                ascend_quant: Any, new_nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
                rec: DeployRecord, emitted_before: dict[str, list[onnx.NodeProto]]) -> None:
    q_act, _ = act
    q_w, dq_w = wpair
    xs, xz = qparams(q_act)
    x_scale, x_off = float(xs.reshape(-1)[0]), int(xz.reshape(-1)[0])
    w = inits[q_w.input[0]].astype(np.float32)
    ws, wz = qparams(q_w)
    if np.any(wz != 0):
        raise UnsupportedModelError(f"{n.name}: asymmetric weight (zero point != 0); Ascend weights are symmetric")
    axis = _attr(dq_w, "axis", 1) if ws.size > 1 else None
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    wq = np.clip(np.rint(w / ws.reshape(shape)), -127, 127).astype(np.int8)
    # output channel axis and per-channel weight scale broadcast to every output channel
    if n.op_type == "Conv":
        oc_axis, red = 0, tuple(range(1, w.ndim))
    elif n.op_type == "ConvTranspose":
        oc_axis, red = 1, (0,) + tuple(range(2, w.ndim))
    elif n.op_type == "Gemm":
        if _attr(n, "transA", 0):
            raise UnsupportedModelError(f"{n.name}: Gemm with transA=1 is not quantizable on Ascend")
        if _attr(n, "transB", 0):
            wq = wq.T.copy()
            w = w.T
            for a in list(n2.attribute):
                if a.name == "transB":
                    n2.attribute.remove(a)
            n2.attribute.append(helper.make_attribute("transB", 0))
        oc_axis, red = 1, (0,)
    else:  # MatMul (K, N)
        if w.ndim != 2:
            raise UnsupportedModelError(f"{n.name}: MatMul weight must be 2-D for Ascend quantization")
        oc_axis, red = 1, (0,)
    n_out = wq.shape[oc_axis]
    # ConvTranspose weights are (C_in, C_out / group, kH, kW): output channel g * (C_out / group) + j
    # uses per-channel weight scale j (ONNX ConvTranspose; the scale has C_out / group entries)
    group = int(_attr(n, "group", 1)) if n.op_type == "ConvTranspose" else 1
    n_out *= group
    w_scale = np.tile(ws.reshape(-1), group) if ws.size > 1 else np.full((n_out,), float(ws.reshape(-1)[0]))
    w_scale = w_scale.astype(np.float32)
    bias_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
    b = _bias_vector(n, inits[bias_name], n_out) if bias_name else np.zeros(n_out)
    # A dead channel (all-zero weight, scale clamped to ~1e-8) cannot hold its bias in int32 at
    # x_scale * w_scale: raise that channel's weight scale until the bias fits (2^30 leaves headroom) and requantize it; its weights are ~0, so the QDQ numerics are unchanged.
    need = (np.abs(b) / 2.0 ** 30 / x_scale).astype(np.float32)
    rescaled = np.nonzero(w_scale < need)[0]
    if rescaled.size:
        if ws.size > 1 and n.op_type in ("Conv", "ConvTranspose"):
            # one weight scale per kernel channel j, shared by the groups: the largest need among them
            per_j = np.maximum(w_scale, need).reshape(group, -1).max(axis=0)
            w_scale = np.tile(per_j, group)
            wq = np.clip(np.rint(w / per_j.reshape(shape)), -127, 127).astype(np.int8)
        else:
            w_scale = np.full_like(w_scale, float(need.max()))
            wq = np.clip(np.rint(w / float(need.max())), -127, 127).astype(np.int8)
    deq = (np.float32(x_scale) * w_scale).astype(np.float32)
    bias_q = np.rint(b / deq.astype(np.float64)).astype(np.int64)
    if np.any(np.abs(bias_q) >= 2 ** 31):
        raise UnsupportedModelError(f"{n.name}: int32 bias overflows (bias too large for x_scale * w_scale)")
    base = n.name or n.output[0]
    wi = numpy_helper.from_array(wq, f"{base}.weight_int8")
    new_inits.append(wi)
    xin = ascend_quant(q_act.input[0], q_act, n.name)
    new_nodes.extend(emitted_before.pop(n.name, []))
    acc = f"{n.output[0]}_int32"
    del n2.input[:]
    if n.op_type == "MatMul":
        n2.input.extend([xin, wi.name])
    else:
        bi = numpy_helper.from_array(bias_q.astype(np.int32), f"{base}.bias_int32")
        new_inits.append(bi)
        n2.input.extend([xin, wi.name, bi.name])
    y = n.output[0]
    n2.output[0] = acc
    new_nodes.append(n2)
    packed = pack_deq_scale(deq if ws.size > 1 else deq[:1], 0)  # one value for a per-tensor weight
    di = numpy_helper.from_array(packed, f"{base}.deq_scale")
    di.data_type = TensorProto.UINT64
    new_inits.append(di)
    new_nodes.append(helper.make_node("AscendDequant", [acc, di.name], [y], name=f"{base}_AscendDequant",
                                      sqrt_mode=0, relu_flag=0, dtype=DT_FLOAT))
    rec.layers[n.name] = {
        "op_type": n.op_type, "input": q_act.input[0], "x_scale": x_scale, "x_offset": x_off,
        "w_granularity": "per_channel" if ws.size > 1 else "per_tensor",
        "w_scale": [float(v) for v in w_scale] if ws.size > 1 else float(w_scale[0]),
        "deq_scale": [float(v) for v in deq], "deq_scale_uint64": [int(v) for v in packed],
        "bias_int32": [int(v) for v in bias_q] if bias_name else None,
        "rescaled_dead_channels": [int(c) for c in rescaled],
    }


def _bias_vector(n: onnx.NodeProto, bias: np.ndarray, n_out: int) -> np.ndarray:
    """The bias of a Conv/ConvTranspose/Gemm as one float64 value per output channel, shape ``(n_out,)``.

    ONNX Gemm's C is unidirectionally broadcast to ``(M, N)``: shapes ``[N]``, ``[1, N]``, ``[1]`` and a
    scalar are one value per output channel (a scalar repeats); Conv biases are ``[C_out]``.

    Raises:
        UnsupportedModelError: a bias that differs per row (``[M, N]``, ``[M, 1]`` with M > 1), which
            an int32 per-channel bias cannot hold.
    """
    b = np.asarray(bias, dtype=np.float64)
    if b.ndim >= 2 and any(d != 1 for d in b.shape[:-1]):
        raise UnsupportedModelError(f"{n.name}: bias of shape {list(b.shape)} differs per row; Ascend's int32 bias "
                                    f"holds one value per output channel (give a bias of shape [N] or [1, N])")
    flat = b.reshape(-1)
    if flat.size not in (1, n_out):
        raise UnsupportedModelError(f"{n.name}: bias of shape {list(b.shape)} does not match {n_out} output "
                                    f"channels; give one value per output channel")
    return np.broadcast_to(flat, (n_out,)).astype(np.float64)
