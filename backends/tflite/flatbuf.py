"""Reading and small rewrites of ``.tflite`` flatbuffers (LiteRT's schema, no TensorFlow).

Tensor types and op codes follow LiteRT's ``schema.fbs`` (``ai_edge_litert.schema_py_generated``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT_TYPES = (0, 1, 16)  # FLOAT32, FLOAT16, BFLOAT16 (schema TensorType)
INT_ACT_TYPES = (9, 7, 3)  # INT8, INT16, UINT8


def opnames() -> dict[int, str]:
    """Builtin operator code -> name (``CONV_2D`` ...)."""
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def load(data: bytes) -> Any:
    """The flatbuffer as a mutable object tree (``ModelT``); buffers stored at offsets after the
    flatbuffer (ai-edge-quantizer's output) are read in, every buffer as a uint8 array."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    for b in model.buffers or []:
        if b.data is not None and not isinstance(b.data, np.ndarray):
            b.data = np.frombuffer(bytes(b.data), np.uint8)
    return model


def dump(model: Any) -> bytes:
    """Serialize, storing each distinct numeric vector once.

    LiteRT requires one int64 zero point per scale, so a per-channel weight and its int32 bias each
    carry C zeros (about 0.35 MB in EfficientNet-Lite0). Flatbuffers let tables share a vector, as
    ``CreateSharedString`` shares strings: identical vectors are written once and referenced by offset;
    what any reader sees is unchanged.
    """
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):  # type: ignore[misc]
        __slots__ = ("seen",)

        def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 (flatbuffers' name)
            arr = np.asarray(x)
            key = (arr.dtype.str, arr.size, arr.tobytes())
            if key not in self.seen:
                self.seen[key] = super().CreateNumpyVector(arr)
            return int(self.seen[key])

    builder = SharingBuilder(1024)
    builder.seen = {}
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def compact(data: bytes) -> bytes:
    """The model re-serialized by :func:`dump` (shared vectors, buffers inline)."""
    return dump(load(data))


def name(t: Any) -> str:
    raw = t.name
    return raw.decode() if isinstance(raw, bytes) else str(raw or "")


def op_code(model: Any, op: Any, names: dict[int, str]) -> str:
    oc = model.operatorCodes[op.opcodeIndex]
    return names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM")


def ops(model: Any) -> list[tuple[str, Any]]:
    """(op name, operator) of the main subgraph in execution order."""
    names = opnames()
    return [(op_code(model, op, names), op) for op in model.subgraphs[0].operators]


def is_constant(model: Any, t: Any) -> bool:
    """A tensor with data in the flatbuffer (weights, shapes, pad values)."""
    buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
    return buf is not None and ((buf.data is not None and len(buf.data) > 0) or bool(getattr(buf, "size", 0)))


def scalar_pad_values(data: bytes) -> tuple[bytes, int]:
    """PADV2's pad value as a scalar: onnx2tf writes it as shape [1], which ai-edge-quantizer 0.10
    cannot quantize (it crashes, issue 17); LiteRT accepts either. Returns (model, count changed)."""
    model = load(data)
    changed = 0
    for code, op in ops(model):
        if code == "PADV2" and len(op.inputs) > 2:
            t = model.subgraphs[0].tensors[int(op.inputs[2])]
            if t.shape is not None and list(t.shape) == [1]:
                t.shape = np.array([], np.int32)
                t.shapeSignature = None
                changed += 1
    return (dump(model) if changed else data), changed


def float_ops(data: bytes, reasons: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Ops that compute in float in the (nominally integer) model: ``{op, tensor, reason}``.

    QUANTIZE/DEQUANTIZE and ops whose outputs are all integer are not listed; ``reasons`` maps an
    output tensor name to why it stayed float (default: no integer kernel in the quantizer).
    """
    model = load(data)
    sg = model.subgraphs[0]
    found = []
    for code, op in ops(model):
        if code in ("QUANTIZE", "DEQUANTIZE"):
            continue
        outs = [sg.tensors[int(o)] for o in op.outputs if o >= 0]
        if any(t.type in FLOAT_TYPES for t in outs):
            tensor = name(outs[0])
            found.append({"op": code, "tensor": tensor, "reason": (reasons or {}).get(
                tensor, "ai-edge-quantizer 0.10 has no integer kernel for this op; it runs in float between "
                        "DEQUANTIZE and QUANTIZE")})
    return found


def io_quantization(data: bytes) -> dict[str, list[dict[str, Any]]]:
    """Model inputs/outputs with dtype, shape, scale and zero point (what an app feeds and reads)."""
    model = load(data)
    sg = model.subgraphs[0]
    from ai_edge_litert import schema_py_generated as schema

    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def describe(i: int) -> dict[str, Any]:
        t = sg.tensors[int(i)]
        q = t.quantization
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 0.0
        zp = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
        dt = {"float32": "float32", "int8": "int8", "uint8": "uint8", "int16": "int16", "int32": "int32",
              "int64": "int64", "bool": "bool"}.get(types.get(t.type, "?"), types.get(t.type, "?"))
        return {"name": name(t), "dtype": dt, "shape": [int(x) for x in t.shape],
                "scale": scale, "zero_point": zp}

    return {"inputs": [describe(i) for i in sg.inputs], "outputs": [describe(o) for o in sg.outputs]}


def strip_tensor_names(data: bytes) -> bytes:
    """Empty every tensor name except model inputs/outputs (smaller file; names serve no runtime purpose)."""
    model = load(data)
    for sg in model.subgraphs:
        keep = {int(i) for i in sg.inputs} | {int(o) for o in sg.outputs}
        for i, t in enumerate(sg.tensors):
            if i not in keep:
                t.name = b""
    return dump(model)
