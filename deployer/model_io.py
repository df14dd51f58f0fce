"""Load, validate, export and canonicalize models into the FP32 reference ONNX.

- ONNX files are checked (``onnx.checker``), external data must stay inside the model's folder.
- ``torch.nn.Module`` inputs are exported with ``torch.onnx.export(dynamo=False)`` at
  :data:`EXPORT_OPSET` (one self-contained file).
- Canonicalization: onnxslim constant folding and dead-code removal, then every node gets a unique
  name (plans address nodes by name).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.dataset import InputSpec
from deployer.errors import BadInputError, UnsupportedModelError

EXPORT_OPSET = 17


def model_sha256(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model (deterministic serialization)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file.

    Raises:
        BadInputError: missing/unreadable file, not ONNX, invalid graph, external data outside the
            model's folder or missing.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"model {p} does not exist; check the --model path")
    if not p.is_file():
        raise BadInputError(f"model {p} is not a file; pass the path of a .onnx file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise BadInputError(f"model {p} cannot be read ({e.strerror}); check its permissions") from None
    try:
        model = onnx.load_model_from_string(raw)
    except Exception:
        raise BadInputError(f"model {p} is not a valid ONNX file (protobuf parse failed); re-export it") from None
    if not model.graph.node:
        raise BadInputError(f"model {p} is not a valid ONNX model (empty graph); re-export it")
    _check_external_data(model, p.parent)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise BadInputError(f"model {p}: its external data cannot be loaded ({e}); keep the data files beside it") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise BadInputError(f"model {p} fails the ONNX checker: {msg[:300]}; fix or re-export the model") from None
    return model


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (base / loc).resolve()
        if base != target and base not in target.parents:
            raise BadInputError(
                f"model external data {loc!r} of tensor {t.name!r} points outside the model's folder; "
                f"refusing (path traversal); move the data beside the model"
            )
        if not target.is_file():
            raise BadInputError(f"model external data file {loc!r} of tensor {t.name!r} is missing; put it beside the model")


def export_torch(module: Any, example_inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> onnx.ModelProto:
    """Export a ``torch.nn.Module`` to ONNX (opset :data:`EXPORT_OPSET`, TorchScript exporter).

    Args:
        module: the module (put in eval mode here).
        example_inputs: input name -> example array (shapes become the model's static shapes).
    """
    import torch

    module.eval()
    args = tuple(torch.from_numpy(np.asarray(v)) for v in example_inputs.values())
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=EXPORT_OPSET,
                          input_names=list(example_inputs), output_names=output_names, do_constant_folding=True)
    return onnx.load_model_from_string(buf.getvalue())


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold with onnxslim, drop dead nodes and give every node a unique name."""
    import onnxslim

    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # onnxslim failing is not fatal: keep the original graph
        slim = model
        _ = e
    out = onnx.ModelProto()
    out.CopyFrom(slim)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return out


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs (initializers excluded) as :class:`InputSpec`.

    Raises:
        UnsupportedModelError: the model has no inputs.
    """
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    if not specs:
        raise UnsupportedModelError("model has no inputs; deployer needs a model that takes at least one input")
    return specs


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def with_static_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Fix dynamic input dims to ``shapes`` and re-run shape inference."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[vi.name]):
                d.ClearField("dim_param")
                d.dim_value = int(n)
    for vi in out.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.ClearField("dim_param")
    try:
        out = onnx.shape_inference.infer_shapes(out)
    except Exception:
        pass
    return out
