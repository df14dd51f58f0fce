"""ONNX Runtime CPU sessions for timing, and the batch-axis helpers the speed record needs
(:mod:`backends.onnxruntime.speed` times them with :mod:`deployer.speed`): a symbolic batch axis
(:func:`with_dynamic_batch`) and the check that a model then gives per-sample results (:func:`batchable`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.dataset import Sample

Batcher = Callable[[Sequence[Sample]], dict[str, np.ndarray]]


def concat_batcher(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Concatenate samples of batch 1 along axis 0."""
    return {k: np.concatenate([np.asarray(s[k]) for s in samples]) for k in samples[0]}


def session(model: onnx.ModelProto | str | Path, threads: int, level: str = "all", quiet: bool = False) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (1 inter-op thread, sequential).

    ``level``: ``disable`` | ``basic`` | ``extended`` | ``all`` (see backends.onnxruntime.backend).
    ``quiet``: ONNX Runtime logs nothing below FATAL (for probes whose failure is an answer).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if quiet:
        so.log_severity_level = 4
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def with_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs/outputs declare a symbolic batch dimension ``batch`` (axis 0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in list(out.graph.input) + list(out.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del out.graph.value_info[:]
    return out


def batchable(model: onnx.ModelProto, samples: Sequence[Sample], batch: int = 2,
              batcher: Batcher = concat_batcher, exact: bool = True) -> bool:
    """Does ``model`` (from :func:`with_dynamic_batch`) give per-sample results at batch ``batch``?

    A model exported with static shapes may have the batch size folded into Reshape constants; then
    it fails or mixes samples, and only batch 1 can be measured. ``exact=False`` checks shapes only
    (dynamic quantization takes one activation scale per batch, so its values depend on the batch).
    """
    if len(samples) < batch:
        return False
    try:
        sess = session(model, 1, quiet=True)  # a static export fails here by design: no error line on stderr
        names = [o.name for o in sess.get_outputs()]
        joint = sess.run(names, batcher(samples[:batch]))
        single = [sess.run(names, batcher(samples[i:i + 1])) for i in range(batch)]
    except Exception:
        return False
    for k in range(len(names)):
        ref = np.concatenate([s[k] for s in single])
        if joint[k].shape != ref.shape or (exact and not np.allclose(joint[k], ref, rtol=1e-3, atol=1e-4)):
            return False
    return True
