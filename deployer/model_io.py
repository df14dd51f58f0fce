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
import re
from collections.abc import Callable, Sequence
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
    try:
        bad_text = _has_bad_text(model)
    except UnicodeDecodeError:
        bad_text = True
    if bad_text:
        raise BadInputError(f"model {p} is corrupt: a name or string in it is not valid UTF-8; re-export it")
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
    _check_initializers(model, p)
    return model


def _has_bad_text(msg: Any) -> bool:
    """True if a string field is not valid UTF-8. ONNX is proto2: protobuf does not check UTF-8 when
    parsing and hands such a field back as ``bytes``, which fails wherever it is written again."""
    for fd, value in msg.ListFields():
        single = hasattr(value, "ListFields") or isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
        items = [value] if single else value
        if fd.type == fd.TYPE_STRING and any(isinstance(v, bytes) for v in items):
            return True
        if fd.type == fd.TYPE_MESSAGE and any(_has_bad_text(v) for v in items):
            return True
    return False


def _check_initializers(model: onnx.ModelProto, p: Path) -> None:
    """Every initializer's payload must match its dims and type (``onnx.checker`` does not look)."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        try:
            numpy_helper.to_array(t)
        except Exception as e:
            msg = " ".join(str(e).split())[:200] or type(e).__name__
            raise BadInputError(f"model {p}: initializer {t.name!r} is corrupt ({msg}); re-export the model") from None


def check_runnable(model: onnx.ModelProto, source: str) -> None:
    """Load ``model`` in ONNX Runtime, so a model that ONNX accepts but ONNX Runtime cannot load (type
    or shape errors, attributes out of range, ops without a kernel) is reported as bad input before
    calibration starts. Nothing is run (cached statistics never run the model).

    Raises:
        UnsupportedModelError: ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # the error is reported once, as our message
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise UnsupportedModelError(f"model {source}: ONNX Runtime cannot load it: {msg}; fix or re-export the model") from None


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


def load_torch_checkpoint(path: str | Path, module_factory: Callable[[], Any]) -> Any:
    """Build a module with ``module_factory()`` and load the weights of a ``torch.save`` checkpoint.

    The file is read only with ``torch.load(weights_only=True)``: tensors and plain containers are
    accepted; a checkpoint holding any other pickled object (a class instance, a function, a
    ``__reduce__`` payload) is refused before anything in it runs. A checkpoint is a state dict or a
    dict holding one under ``"state_dict"``.

    Raises:
        BadInputError: missing/unreadable file, not a PyTorch checkpoint, pickled objects, or weights
            that do not match the module.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"checkpoint {p} does not exist or is not a file; check the path")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise BadInputError(
                f"checkpoint {p} holds pickled objects{what}, which deployer never loads; save only the "
                f"weights: torch.save(module.state_dict(), path)"
            ) from None
        raise BadInputError(f"checkpoint {p} is not a PyTorch checkpoint; save it with torch.save") from None
    except OSError as e:
        raise BadInputError(f"checkpoint {p} cannot be read ({e.strerror or e}); check its permissions") from None
    except Exception:  # zip reader errors, truncated files
        raise BadInputError(f"checkpoint {p} is not a readable PyTorch checkpoint (corrupt or truncated); "
                            f"save it again with torch.save") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"checkpoint {p} is not a state dict of tensors; save module.state_dict()")
    module = module_factory()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise BadInputError(f"checkpoint {p} does not fit the module: {first}") from None
    return module


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
    """Constant-fold with onnxslim, drop dead nodes, give every node a unique name, then run the
    preparation passes of :mod:`deployer.prepare` (Constant nodes to initializers, BatchNorm folding)."""
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
    from deployer.prepare import prepare

    return prepare(out)


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
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError(f"model input {vi.name!r} has element type {tt.elem_type}, which has no "
                                        f"numpy equivalent; give the input a numeric type") from None
        specs.append(InputSpec(vi.name, shape, dtype))
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
