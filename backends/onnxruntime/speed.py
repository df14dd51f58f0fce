"""The ``speed`` record of the ``onnxruntime`` target: FP32 vs artifact in ONNX Runtime's CPU provider,
measured by :func:`deployer.speed.compare_speed` (alternating calls, medians; batch 1, 1 thread headline).

Batches: both models get a symbolic batch axis (:func:`with_dynamic_batch`); batch sizes above 1 are
measured only when the FP32 model gives per-sample results that way (a static export may fold the batch
into its Reshapes: :func:`backends.onnxruntime.throughput.batchable`). Sequence models (integer ``[1, L]``
inputs, e.g. ``input_ids`` / ``attention_mask``) also get a symbolic sequence axis; where the FP32 model
then gives the same outputs for a sample trimmed to its real length, every batch is trimmed to its longest
member and batches are built from length buckets (:func:`deployer.speed.bucketed_batches`): one query
alone runs at its own length, and a batch of 32 is not padded to the longest text of the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from backends.onnxruntime.throughput import batchable, session, with_dynamic_batch
from calibration.dataset import Sample
from deployer.speed import DEFAULT_GRID, HEADLINE, Point, Runner, bucketed_batches, compare_speed, sequence_inputs


def with_dynamic_sequence(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose named 2-D graph inputs declare a symbolic axis 1 (``sequence``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in names and len(dims) == 2:
            dims[1].Clear()
            dims[1].dim_param = "sequence"
    del out.graph.value_info[:]
    return out


def trims_exactly(model: onnx.ModelProto, samples: Sequence[Sample], names: Sequence[str], n: int = 2) -> bool:
    """Does ``model`` (with a symbolic sequence axis) give the same outputs (rtol 1e-3, atol 1e-4) for the
    first ``n`` samples trimmed to their real length as for the padded samples?"""
    from deployer.speed import sequence_length

    try:
        sess = session(model, 1, quiet=True)
        for s in list(samples)[:n]:
            full = sess.run(None, dict(s))
            width = sequence_length(s, names)
            cut = sess.run(None, {k: (np.asarray(v)[:, :width] if k in names else v) for k, v in s.items()})
            if any(a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(full, cut)):
                return False
    except Exception:  # a static export fails to run trimmed: no trimming
        return False
    return True


def _factory(model: onnx.ModelProto) -> Any:
    def make(threads: int) -> Runner:
        sess = session(model, threads)
        return lambda batch: sess.run(None, batch)

    return make


def measure_speed(fp32: onnx.ModelProto, artifact: onnx.ModelProto, samples: Sequence[Sample],
                  grid: Sequence[Point] = DEFAULT_GRID, seconds: float = 1.0, **fields: Any) -> dict[str, Any]:
    """The ``speed`` record (:func:`deployer.speed.compare_speed`) of ``artifact`` against ``fp32`` on
    held-out ``samples``; ``fields`` are copied into it (``same_cpu``, ``int8``).

    Raises:
        ValueError: no samples.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("no held-out samples to time")
    names = sequence_inputs(dict(samples[0]))
    fp32_b, art_b = with_dynamic_batch(fp32), with_dynamic_batch(artifact)
    trim = False
    if names:
        f_seq, a_seq = with_dynamic_sequence(fp32_b, names), with_dynamic_sequence(art_b, names)
        if trims_exactly(f_seq, samples, names):
            fp32_b, art_b, trim = f_seq, a_seq, True
    can_batch = batchable(fp32_b, samples) and batchable(art_b, samples, exact=False)

    def batches(batch: int) -> list[dict[str, np.ndarray]]:
        if batch > 1 and not can_batch:
            raise ValueError("the model's batch dimension is static")
        return bucketed_batches([dict(s) for s in samples], batch, trim=trim)

    rec = compare_speed(_factory(fp32_b), _factory(art_b), batches, HEADLINE, grid, seconds, **fields)
    rec["sequence"] = ({"inputs": list(names), "trimmed": trim, "batching": "length buckets" if trim else
                        "padded samples as given (the model's sequence axis is static)"} if names else None)
    return rec


__all__ = ["measure_speed", "trims_exactly", "with_dynamic_sequence"]
