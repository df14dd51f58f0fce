"""Run the FP32 reference in ONNX Runtime over a calibration set and collect tensor statistics.

Every float activation produced by a node (and every float graph input) is observed, streaming: one
batch of samples at a time, nothing kept but :class:`calibration.observers.TensorStats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from calibration.dataset import Sample
from calibration.observers import DEFAULT_EMA_BATCH, DEFAULT_EMA_MOMENTUM, Statistics, TensorStats

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Names of float tensors produced by nodes (needs shape inference) plus float graph inputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits and types.get(i.name) in FLOAT_TYPES]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if o and types.get(o) in FLOAT_TYPES:
                names.append(o)
    return list(dict.fromkeys(names))


def collect_statistics(
    model: onnx.ModelProto,
    samples: Sequence[Sample],
    skip: set[str] | None = None,
    ema_momentum: float = DEFAULT_EMA_MOMENTUM,
    ema_batch: int = DEFAULT_EMA_BATCH,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 0,
) -> Statistics:
    """Observe every float activation of ``model`` over ``samples``.

    Args:
        model: FP32 reference model.
        samples: calibration samples (``dict[input_name, ndarray]``).
        skip: tensor names not to observe (e.g. attention-mask paths).
        ema_momentum: EMA momentum for the seed's observer.
        ema_batch: samples per EMA batch.
        progress: called with (done, total) after each batch.

    Returns:
        :class:`Statistics` keyed by tensor name.
    """
    import onnxruntime as ort

    names = [n for n in float_activations(model) if not (skip and n in skip)]
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    existing = {o.name for o in aug.graph.output}
    input_names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    for n in names:
        if n not in existing and n not in input_names:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    stats = Statistics(settings={"ema_momentum": ema_momentum, "ema_batch": ema_batch})
    tensors = {n: TensorStats() for n in names}
    total = len(samples)
    for start in range(0, total, ema_batch):
        chunk = samples[start:start + ema_batch]
        batch_vals: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in chunk:
            outs = sess.run(out_names, s)
            for n, v in zip(out_names, outs):
                if n in batch_vals:
                    batch_vals[n].append(np.asarray(v))
            for n in input_names:
                if n in batch_vals:
                    batch_vals[n].append(s[n])
        for n, vals in batch_vals.items():
            if not vals:
                continue
            lo = min(float(np.min(v)) for v in vals)
            hi = max(float(np.max(v)) for v in vals)
            tensors[n].update(np.array([lo, hi]), ema_momentum)
            tensors[n].samples += len(chunk)
        if progress:
            progress(min(start + ema_batch, total), total)
    stats.tensors = tensors
    return stats
