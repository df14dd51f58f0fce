"""Translate an FP32 ONNX graph into a TensorFlow function, the input of the TFLite converter.

Why our own translator: onnx2tf pins old TensorFlow/NumPy/protobuf, takes minutes, recalibrates on
its own and was measured producing chance-level output from QDQ graphs (DESIGN.md section 3). The
TFLite backend only needs the FP32 graph in TensorFlow form; quantization parameters come from the
plan and are applied after conversion (``backends.tflite.apply_plan``).

Layout: with ``layout="nhwc"`` every 4-D activation is carried NHWC (TFLite's native layout) and the
graph input is NHWC; ``layout="nchw"`` keeps the model's NCHW input and transposes internally.
Tensors that are not 4-D (token ids, masks, transformer activations) keep the ONNX layout.
Supported ONNX ops are listed in :data:`SUPPORTED_OPS`; anything else raises
:class:`deployer.errors.UnsupportedModelError` naming the node.

Transformer encoders: integer inputs (token ids, attention masks) keep their dtype; ``Gather`` casts
int64 indices to int32 (TFLite's index type); the exact-GELU chain ``x/sqrt(2) -> Erf -> +1 -> *x -> *0.5``
becomes one TFLite ``GELU`` (TFLite has no ``Erf`` builtin; a lone ``Erf`` is computed with the
Abramowitz-Stegun 7.1.26 polynomial, error below 1.5e-7); ``LayerNormalization`` is decomposed into
mean / variance / rsqrt ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from deployer.errors import UnsupportedModelError

SUPPORTED_OPS = (
    "Conv", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "GlobalAveragePool", "AveragePool", "MaxPool",
    "Reshape", "Flatten", "Gemm", "MatMul", "Softmax", "Sigmoid", "Tanh", "Concat", "Identity",
    "HardSigmoid", "HardSwish", "Transpose", "Min", "Max",
    # transformer encoders (BERT/MiniLM): embeddings, masks, LayerNorm, GELU, pooling
    "Gather", "Cast", "Unsqueeze", "Squeeze", "Expand", "Slice", "Where", "And", "Or", "Not", "Equal", "Greater",
    "Less", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "LayerNormalization", "Erf", "Sqrt",
    "Pow", "Neg", "Exp", "Log", "Abs", "Reciprocal",
)

_GELU_SQRT2 = float(np.sqrt(2.0))


@dataclass
class _T:
    """A translated tensor: the TF value and whether its 4-D layout is NHWC."""

    value: Any
    nhwc: bool = False


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _same_pads(in_hw: tuple[int, int], k: list[int], s: list[int], d: list[int]) -> list[int]:
    """TensorFlow SAME padding as ONNX [top, left, bottom, right]."""
    pads_begin, pads_end = [], []
    for size, kk, ss, dd in zip(in_hw, k, s, d):
        eff = (kk - 1) * dd + 1
        out = -(-size // ss)
        total = max((out - 1) * ss + eff - size, 0)
        pads_begin.append(total // 2)
        pads_end.append(total - total // 2)
    return pads_begin + pads_end


class OnnxToTf:
    """Builds a ``tf.function`` equivalent of an FP32 ONNX model.

    Args:
        model: FP32 ONNX model with static input shapes (batch included) and constant weights.
        layout: ``"nhwc"`` (TFLite convention, image inputs transposed) or ``"nchw"``.

    Raises:
        UnsupportedModelError: an op outside :data:`SUPPORTED_OPS` or a non-constant weight.
    """

    def __init__(self, model: onnx.ModelProto, layout: str = "nhwc", tag_tensors: bool = True) -> None:
        import tensorflow as tf  # heavy import, only inside the backend

        self.tf = tf
        self.model = model
        self.layout = layout
        self.consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        for node in model.graph.node:
            if node.op_type not in SUPPORTED_OPS and node.op_type != "Constant":
                raise UnsupportedModelError(
                    f"TFLite lowering does not support ONNX op {node.op_type} (node {node.name!r}); "
                    f"supported: {', '.join(SUPPORTED_OPS)}"
                )
        self.tag_tensors = tag_tensors
        self._name: str | None = None
        self.tensor_ids = {o: i for i, o in enumerate(o for n in model.graph.node for o in n.output)}
        init_names = set(self.consts)
        self.inputs = [i for i in model.graph.input if i.name not in init_names]
        self.gelu_end, self.gelu_skip = _gelu_chains(model, self.consts)

    def input_signature(self) -> list[Any]:
        """TensorSpecs of the graph inputs in the chosen layout."""
        tf = self.tf
        specs = []
        for vi in self.inputs:
            # symbolic dims stay dynamic (None): the .tflite's shape_signature has -1 there and the
            # interpreter resizes per sample
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in vi.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            if len(shape) == 4 and self.layout == "nhwc":
                shape = [shape[0], shape[2], shape[3], shape[1]]
            specs.append(tf.TensorSpec(shape, tf.as_dtype(dtype), name=_tf_name(vi.name)))
        return specs

    def function(self) -> Any:
        """A ``tf.function`` taking inputs in graph order and returning outputs in graph order."""
        tf = self.tf

        @tf.function(input_signature=self.input_signature())
        def fn(*args: Any) -> Any:
            env: dict[str, _T] = {}
            for vi, a in zip(self.inputs, args):
                env[vi.name] = _T(a, nhwc=len(a.shape) == 4 and self.layout == "nhwc")
            for node in self.model.graph.node:
                if node.op_type == "Constant" or node.output[0] in self.gelu_skip:
                    continue
                self._name = f"onnxt{self.tensor_ids[node.output[0]]}x" if self.tag_tensors else None
                outs = self._op(node, env)
                for name, val in zip(node.output, outs):
                    env[name] = val
            results = []
            for vo in self.model.graph.output:
                t = env[vo.name]
                v = t.value
                if t.nhwc and self.layout == "nchw":
                    v = tf.transpose(v, [0, 3, 1, 2])
                results.append(tf.identity(v, name=_tf_name(vo.name)))
            return results if len(results) > 1 else results[0]

        return fn

    # -- helpers -------------------------------------------------------------------------------
    def _get(self, env: dict[str, _T], name: str) -> _T:
        if name in env:
            return env[name]
        if name in self.consts:
            return _T(self.tf.constant(self.consts[name]), nhwc=False)
        raise UnsupportedModelError(f"tensor {name!r} has no producer")

    def _nchw(self, t: _T) -> Any:
        return self.tf.transpose(t.value, [0, 3, 1, 2]) if t.nhwc else t.value

    def _nhwc(self, t: _T) -> Any:
        return t.value if t.nhwc else self.tf.transpose(t.value, [0, 2, 3, 1])

    def _binary(self, node: onnx.NodeProto, env: dict[str, _T], fn: Callable[..., Any]) -> list[_T]:
        a = self._get(env, node.input[0])
        b = self._get(env, node.input[1])
        if a.nhwc or b.nhwc:
            # Broadcast constants given in NCHW (C,1,1) or (1,C,1,1) to NHWC.
            vals = []
            for t, name in ((a, node.input[0]), (b, node.input[1])):
                if t.nhwc:
                    vals.append(t.value)
                elif name in self.consts and self.consts[name].ndim >= 3:
                    c = self.consts[name]
                    c = c.reshape((1,) * (4 - c.ndim) + c.shape)
                    vals.append(self.tf.constant(np.transpose(c, (0, 2, 3, 1))))
                elif len(t.value.shape) == 4:
                    vals.append(self._nhwc(t))
                else:
                    vals.append(t.value)
            return [_T(fn(vals[0], vals[1], name=self._name), nhwc=True)]
        return [_T(fn(a.value, b.value, name=self._name))]

    def _op(self, node: onnx.NodeProto, env: dict[str, _T]) -> list[_T]:
        tf = self.tf
        op = node.op_type
        at = _attrs(node)
        if node.output[0] in self.gelu_end:
            x = self._get(env, self.gelu_end[node.output[0]])
            return [_T(tf.nn.gelu(x.value, approximate=False, name=self._name), x.nhwc)]
        if op in _TRANSFORMER_OPS:
            return [self._transformer_op(node, env, at)]
        if op == "Conv":
            return [self._conv(node, env, at)]
        if op == "Relu":
            x = self._get(env, node.input[0])
            return [_T(tf.nn.relu(x.value, name=self._name), x.nhwc)]
        if op == "Clip":
            x = self._get(env, node.input[0])
            lo = float(self.consts[node.input[1]]) if len(node.input) > 1 and node.input[1] else at.get("min", -np.inf)
            hi = float(self.consts[node.input[2]]) if len(node.input) > 2 and node.input[2] else at.get("max", np.inf)
            if lo == 0.0 and hi == 6.0:
                return [_T(tf.nn.relu6(x.value, name=self._name), x.nhwc)]
            if lo == 0.0 and np.isinf(hi):
                return [_T(tf.nn.relu(x.value, name=self._name), x.nhwc)]
            if np.isinf(hi):
                return [_T(tf.maximum(x.value, tf.constant(lo, x.value.dtype), name=self._name), x.nhwc)]
            if np.isinf(lo):
                return [_T(tf.minimum(x.value, tf.constant(hi, x.value.dtype), name=self._name), x.nhwc)]
            return [_T(tf.clip_by_value(x.value, lo, hi, name=self._name), x.nhwc)]
        if op in ("Sigmoid", "Tanh", "Identity"):
            x = self._get(env, node.input[0])
            f = {"Sigmoid": tf.math.sigmoid, "Tanh": tf.math.tanh, "Identity": tf.identity}[op]  # type: ignore[dict-item]
            return [_T(f(x.value, name=self._name), x.nhwc)]
        if op == "HardSigmoid":
            x = self._get(env, node.input[0])
            alpha, beta = at.get("alpha", 0.2), at.get("beta", 0.5)
            return [_T(tf.clip_by_value(x.value * alpha + beta, 0.0, 1.0, name=self._name), x.nhwc)]
        if op == "HardSwish":
            x = self._get(env, node.input[0])
            return [_T(tf.multiply(x.value, tf.nn.relu6(x.value + 3.0) / 6.0, name=self._name), x.nhwc)]
        if op == "Add":
            return self._binary(node, env, tf.add)
        if op == "Sub":
            return self._binary(node, env, tf.subtract)
        if op == "Mul":
            return self._binary(node, env, tf.multiply)
        if op == "Div":
            return self._binary(node, env, tf.divide)
        if op in ("Min", "Max") and len(node.input) == 2:
            return self._binary(node, env, tf.minimum if op == "Min" else tf.maximum)
        if op == "GlobalAveragePool":
            x = self._get(env, node.input[0])
            v = tf.reduce_mean(self._nhwc(x), axis=[1, 2], keepdims=True, name=self._name)
            return [_T(v, nhwc=True)]
        if op in ("AveragePool", "MaxPool"):
            x = self._get(env, node.input[0])
            xv = self._nhwc(x)
            k = list(at["kernel_shape"])
            s = list(at.get("strides", [1, 1]))
            pads = list(at.get("pads", [0, 0, 0, 0]))
            padding = self._padding(xv, k, s, [1, 1], pads, fill=-np.inf if op == "MaxPool" else 0.0,
                                    count_include_pad=bool(at.get("count_include_pad", 0)), op=op)
            xv, pad_mode = padding
            f = tf.nn.max_pool2d if op == "MaxPool" else tf.nn.avg_pool2d
            return [_T(f(xv, ksize=k, strides=s, padding=pad_mode, name=self._name), nhwc=True)]
        if op in ("Reshape", "Flatten"):
            x = self._get(env, node.input[0])
            xv = self._nchw(x) if len(x.value.shape) == 4 else x.value
            if op == "Flatten":
                axis = at.get("axis", 1)
                shape = xv.shape
                if any(d is None for d in shape[:axis]):  # symbolic leading dims: computed at run time
                    lead: Any = tf.reduce_prod(tf.shape(xv)[:axis])
                else:
                    lead = int(np.prod(shape[:axis])) if axis else 1
                return [_T(tf.reshape(xv, tf.stack([lead, -1]) if not isinstance(lead, int) else [lead, -1],
                                      name=self._name))]
            target = [int(v) for v in self.consts[node.input[1]]]
            target = [(xv.shape[i] if xv.shape[i] is not None else tf.shape(xv)[i])
                      if (v == 0 and not at.get("allowzero", 0)) else v for i, v in enumerate(target)]
            return [_T(tf.reshape(xv, target, name=self._name))]
        if op == "Transpose":
            x = self._get(env, node.input[0])
            xv = self._nchw(x) if x.nhwc else x.value
            return [_T(tf.transpose(xv, list(at["perm"]), name=self._name))]
        if op == "Gemm":
            a = self._get(env, node.input[0]).value
            if at.get("transA", 0):
                a = tf.transpose(a)
            w = self.consts.get(node.input[1])
            if w is None:
                raise UnsupportedModelError(f"Gemm {node.name!r} has a non-constant weight")
            w = w.T if at.get("transB", 0) else w
            has_bias = len(node.input) > 2 and bool(node.input[2])
            y = tf.matmul(a, tf.constant(w * at.get("alpha", 1.0)), name=None if has_bias else self._name)
            if has_bias:
                y = tf.add(y, tf.constant(self.consts[node.input[2]] * at.get("beta", 1.0)), name=self._name)
            return [_T(y)]
        if op == "MatMul":
            a = self._get(env, node.input[0])
            b = self._get(env, node.input[1])
            return [_T(tf.matmul(self._nchw(a) if a.nhwc else a.value, self._nchw(b) if b.nhwc else b.value,
                                 name=self._name))]
        if op == "Softmax":
            x = self._get(env, node.input[0])
            xv = self._nchw(x) if x.nhwc else x.value
            return [_T(tf.nn.softmax(xv, axis=at.get("axis", -1), name=self._name))]
        if op == "Concat":
            ts = [self._get(env, n) for n in node.input]
            axis = at["axis"]
            if any(t.nhwc for t in ts) and axis in (1, -3) and all(len(t.value.shape) == 4 for t in ts):
                return [_T(tf.concat([self._nhwc(t) for t in ts], axis=3, name=self._name), nhwc=True)]
            return [_T(tf.concat([self._nchw(t) if t.nhwc else t.value for t in ts], axis=axis, name=self._name))]
        raise UnsupportedModelError(f"TFLite lowering does not support ONNX op {op} (node {node.name!r})")

    # -- transformer encoder ops (tensors in the ONNX layout) ------------------------------------
    def _onnx(self, env: dict[str, _T], name: str) -> Any:
        """A tensor's value in the ONNX layout (NHWC activations transposed back)."""
        t = self._get(env, name)
        return self._nchw(t) if t.nhwc else t.value

    def _axes(self, node: onnx.NodeProto, at: dict[str, Any], rank: int) -> list[int] | None:
        """Axes from the attribute (old opsets) or the constant second input; None when absent."""
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.consts:
                raise UnsupportedModelError(f"{node.op_type} {node.name!r}: axes must be a constant")
            axes = [int(a) for a in np.ravel(self.consts[node.input[1]])]
        elif "axes" in at:
            axes = [int(a) for a in at["axes"]]
        else:
            return None
        return sorted(a % rank for a in axes)

    def _const_ints(self, node: onnx.NodeProto, i: int) -> list[int] | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        if node.input[i] not in self.consts:
            raise UnsupportedModelError(f"{node.op_type} {node.name!r}: input {i} must be a constant")
        return [int(v) for v in np.ravel(self.consts[node.input[i]])]

    def _transformer_op(self, node: onnx.NodeProto, env: dict[str, _T], at: dict[str, Any]) -> _T:
        tf = self.tf
        op = node.op_type
        name = self._name
        unary = {"Sqrt": tf.sqrt, "Neg": tf.negative, "Exp": tf.exp, "Log": tf.math.log, "Abs": tf.abs,
                 "Reciprocal": tf.math.reciprocal, "Not": tf.logical_not}
        if op in unary:  # elementwise: any layout
            x = self._get(env, node.input[0])
            return _T(unary[op](x.value, name=name), x.nhwc)
        if op == "Cast":
            x = self._get(env, node.input[0])
            dtype = tf.as_dtype(onnx.helper.tensor_dtype_to_np_dtype(at["to"]))
            return _T(tf.cast(x.value, dtype, name=name), x.nhwc)
        if op == "Erf":
            x = self._get(env, node.input[0])
            return _T(self._erf(x.value), x.nhwc)
        if op == "Pow":
            x = self._get(env, node.input[0])
            e = self.consts.get(node.input[1])
            if e is not None and e.size == 1 and float(e) == 2.0:
                return _T(tf.multiply(x.value, x.value, name=name), x.nhwc)
            if e is not None and e.size == 1 and float(e) == 0.5:
                return _T(tf.sqrt(x.value, name=name), x.nhwc)
            return _T(tf.pow(x.value, self._onnx(env, node.input[1]), name=name))
        xv = self._onnx(env, node.input[0])
        shape = [int(d) for d in xv.shape]
        rank = len(shape)
        if op == "Gather":
            axis = int(at.get("axis", 0)) % rank
            if node.input[1] in self.consts:
                idx = self.consts[node.input[1]].astype(np.int64)
                idx = np.where(idx < 0, idx + shape[axis], idx).astype(np.int32)
                return _T(tf.gather(xv, tf.constant(idx), axis=axis, name=name))
            ids = self._onnx(env, node.input[1])
            if ids.dtype != tf.int32:  # TFLite gathers with int32 indices; token ids fit
                ids = tf.cast(ids, tf.int32)
            return _T(tf.gather(xv, ids, axis=axis, name=name))
        if op in ("Unsqueeze", "Squeeze"):
            if op == "Unsqueeze":
                axes = self._axes(node, at, rank + len(self._const_ints(node, 1) or at.get("axes", [])))
                out = list(shape)
                for a in axes or []:
                    out.insert(a, 1)
            else:
                axes = self._axes(node, at, rank)
                out = [d for i, d in enumerate(shape) if (d != 1 if axes is None else i not in axes)]
            return _T(tf.reshape(xv, out, name=name))
        if op == "Expand":
            target = self._const_ints(node, 1) or []
            out = list(np.broadcast_shapes(tuple(shape), tuple(target)))
            if out == shape:
                return _T(tf.identity(xv, name=name))
            return _T(tf.broadcast_to(xv, out, name=name))
        if op == "Slice":
            return _T(self._slice(node, at, xv, shape))
        if op == "Where":
            return _T(tf.where(xv, self._onnx(env, node.input[1]), self._onnx(env, node.input[2]), name=name))
        if op in ("And", "Or", "Equal", "Greater", "Less"):
            f = {"And": tf.logical_and, "Or": tf.logical_or, "Equal": tf.equal, "Greater": tf.greater,
                 "Less": tf.less}[op]
            return _T(f(xv, self._onnx(env, node.input[1]), name=name))
        if op.startswith("Reduce"):
            axes = self._axes(node, at, rank)
            if axes is None and at.get("noop_with_empty_axes", 0):
                return _T(tf.identity(xv, name=name))
            axes = list(range(rank)) if axes is None else axes
            keep = bool(at.get("keepdims", 1))
            if op == "ReduceL2":
                return _T(tf.sqrt(tf.reduce_sum(tf.multiply(xv, xv), axis=axes, keepdims=keep), name=name))
            f = {"ReduceSum": tf.reduce_sum, "ReduceMean": tf.reduce_mean, "ReduceMax": tf.reduce_max,
                 "ReduceMin": tf.reduce_min}[op]
            return _T(f(xv, axis=axes, keepdims=keep, name=name))
        if op == "LayerNormalization":
            axes = list(range(int(at.get("axis", -1)) % rank, rank))
            eps = float(at.get("epsilon", 1e-5))
            d = tf.subtract(xv, tf.reduce_mean(xv, axis=axes, keepdims=True))
            var = tf.reduce_mean(tf.multiply(d, d), axis=axes, keepdims=True)
            y = tf.multiply(d, tf.math.rsqrt(tf.add(var, eps)))
            has_bias = len(node.input) > 2 and bool(node.input[2])
            y = tf.multiply(y, self._onnx(env, node.input[1]), name=None if has_bias else name)
            if has_bias:
                y = tf.add(y, self._onnx(env, node.input[2]), name=name)
            return _T(y)
        raise UnsupportedModelError(f"TFLite lowering does not support ONNX op {op} (node {node.name!r})")

    def _slice(self, node: onnx.NodeProto, at: dict[str, Any], xv: Any, shape: list[int]) -> Any:
        if "starts" in at:  # opset < 10
            starts, ends, axes, steps = list(at["starts"]), list(at["ends"]), at.get("axes"), None
        else:
            starts, ends = self._const_ints(node, 1) or [], self._const_ints(node, 2) or []
            axes, steps = self._const_ints(node, 3), self._const_ints(node, 4)
        axes = [a % len(shape) for a in (axes if axes is not None else range(len(starts)))]
        steps = steps or [1] * len(starts)
        begin, end, strides = [0] * len(shape), list(shape), [1] * len(shape)
        end_mask = 0
        for a, st, en, sp in zip(axes, starts, ends, steps):
            b, e, s = slice(st, en, sp).indices(shape[a])
            begin[a], end[a], strides[a] = b, e, s
            if e < 0:  # a negative step down to the first element
                end_mask |= 1 << a
        return self.tf.strided_slice(xv, begin, end, strides, end_mask=end_mask, name=self._name)

    def _erf(self, x: Any) -> Any:
        """erf from TFLite builtins (Abramowitz-Stegun 7.1.26, absolute error < 1.5e-7)."""
        tf = self.tf
        a1, a2, a3, a4, a5, p = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429, 0.3275911
        ax = tf.abs(x)
        t = tf.math.reciprocal(1.0 + p * ax)
        poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t
        return tf.multiply(tf.sign(x), 1.0 - poly * tf.exp(-ax * ax), name=self._name)

    def _padding(self, xv: Any, k: list[int], s: list[int], d: list[int], pads: list[int], fill: float,
                 count_include_pad: bool = True, op: str = "Conv") -> tuple[Any, str]:
        tf = self.tf
        if not any(pads):
            return xv, "VALID"
        dynamic = xv.shape[1] is None or xv.shape[2] is None  # symbolic H/W: explicit padding is always right
        if not dynamic and list(pads) == _same_pads((int(xv.shape[1]), int(xv.shape[2])), k, s, d) and (
                op != "AveragePool" or not count_include_pad):
            return xv, "SAME"
        top, left, bottom, right = pads
        if op == "AveragePool" and not count_include_pad:
            raise UnsupportedModelError("AveragePool with explicit pads and count_include_pad=0 is not supported")
        return tf.pad(xv, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=fill), "VALID"

    def _conv(self, node: onnx.NodeProto, env: dict[str, _T], at: dict[str, Any]) -> _T:
        tf = self.tf
        x = self._get(env, node.input[0])
        if node.input[1] not in self.consts:
            raise UnsupportedModelError(f"Conv {node.name!r} has a non-constant weight; fold constants first")
        w = self.consts[node.input[1]]  # (O, I/g, kH, kW)
        if w.ndim != 4:
            raise UnsupportedModelError(f"Conv {node.name!r}: only 2-D convolutions are supported")
        group = int(at.get("group", 1))
        k = list(w.shape[2:])
        s = list(at.get("strides", [1, 1]))
        d = list(at.get("dilations", [1, 1]))
        pads = list(at.get("pads", [0, 0, 0, 0]))
        if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedModelError(f"Conv {node.name!r}: auto_pad is not supported; export with explicit pads")
        xv = self._nhwc(x)
        xv, mode = self._padding(xv, k, s, d, pads, fill=0.0)
        cin = int(xv.shape[3])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        name = None if has_bias else self._name  # the op producing the ONNX tensor carries its name
        if group == 1:
            y = tf.nn.conv2d(xv, tf.constant(np.transpose(w, (2, 3, 1, 0))), strides=s, padding=mode, dilations=d,
                             name=name)
        elif group == cin and w.shape[1] == 1:
            mult = w.shape[0] // cin
            wk = np.transpose(w.reshape(cin, mult, k[0], k[1]), (2, 3, 0, 1))  # H, W, C, M
            y = tf.nn.depthwise_conv2d(xv, tf.constant(wk), strides=[1, *s, 1], padding=mode, dilations=d,
                                       name=name)
        else:
            raise UnsupportedModelError(f"Conv {node.name!r}: grouped convolution (group={group}) is not supported")
        if has_bias:
            y = tf.nn.bias_add(y, tf.constant(self.consts[node.input[2]]), name=self._name)
        return _T(y, nhwc=True)


_TRANSFORMER_OPS = frozenset(SUPPORTED_OPS[SUPPORTED_OPS.index("Gather"):])


def _gelu_chains(model: onnx.ModelProto, consts: dict[str, np.ndarray]) -> tuple[dict[str, str], set[str]]:
    """Exact-GELU chains ``Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)`` (or ``Mul(0.5)`` then
    ``Mul(x)``; ``Mul(x, 1/sqrt 2)`` instead of the Div), each intermediate used once.

    Returns:
        (last node's output -> x, outputs of the other nodes of the chain, which are not translated).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    graph_outs = {o.name for o in model.graph.output}

    def const(name: str, value: float) -> bool:
        c = consts.get(name)
        return c is not None and c.size == 1 and abs(float(c) - value) < 1e-4 * abs(value)

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        us = users.get(name, [])
        return us[0] if len(us) == 1 and us[0].op_type == op and name not in graph_outs else None

    def other(n: onnx.NodeProto, name: str) -> str:
        return n.input[1] if n.input[0] == name else n.input[0]

    ends: dict[str, str] = {}
    skip: set[str] = set()
    for erf in model.graph.node:
        if erf.op_type != "Erf":
            continue
        scale = producer.get(erf.input[0])
        if scale is None or only_user(erf.input[0], "Erf") is None:
            continue
        if scale.op_type == "Div" and const(scale.input[1], _GELU_SQRT2):
            x = scale.input[0]
        elif scale.op_type == "Mul" and (const(scale.input[1], 1 / _GELU_SQRT2) or const(scale.input[0], 1 / _GELU_SQRT2)):
            x = scale.input[0] if const(scale.input[1], 1 / _GELU_SQRT2) else scale.input[1]
        else:
            continue
        add = only_user(erf.output[0], "Add")
        if add is None or not const(other(add, erf.output[0]), 1.0):
            continue
        m1 = only_user(add.output[0], "Mul")
        if m1 is None:
            continue
        m2 = only_user(m1.output[0], "Mul")
        if m2 is None:
            continue
        first, second = other(m1, add.output[0]), other(m2, m1.output[0])
        if not ((first == x and const(second, 0.5)) or (const(first, 0.5) and second == x)):
            continue
        ends[m2.output[0]] = x
        skip.update(n.output[0] for n in (scale, erf, add, m1))
    return ends, skip


def _tf_name(name: str) -> str:
    """A TensorFlow-legal op name derived from an ONNX tensor name."""
    out = "".join(c if (c.isalnum() or c in "._-") else "_" for c in name)
    return out if out and out[0].isalnum() else f"t{out}"
