"""Run the FP32 reference in ONNX Runtime over a calibration set and collect tensor statistics.

Every float activation produced by a node (and every float graph input) is observed, streaming: one
sample at a time, nothing kept but :class:`calibration.observers.TensorStats` (min/max, EMA, a
fixed-size histogram), so memory does not grow with the number of samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from calibration.dataset import Sample
from calibration.histogram import DEFAULT_BINS
from calibration.observers import DEFAULT_EMA_BATCH, DEFAULT_EMA_MOMENTUM, STATS_FORMAT, Statistics, TensorStats
from deployer.errors import BadInputError, UnsupportedModelError


class DegenerateRangeWarning(UserWarning):
    """A calibrated tensor never varied (its range is a single value)."""

DEFAULT_HIST_ELEMENTS = 4096
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
    bins: int = DEFAULT_BINS,
    hist_elements: int = DEFAULT_HIST_ELEMENTS,
) -> Statistics:
    """Observe every float activation of ``model`` over ``samples``.

    Args:
        model: FP32 reference model.
        samples: calibration samples (``dict[input_name, ndarray]``).
        skip: tensor names not to observe (e.g. attention-mask paths).
        ema_momentum: EMA momentum for the seed's observer.
        ema_batch: samples per EMA batch.
        progress: called with (done, total) after each batch.
        threads: ONNX Runtime intra-op threads (0: its default).
        bins: histogram bins per tensor (a power of two).
        hist_elements: the histogram bins at most this many elements of each tensor per sample, a
            fixed seeded subset that depends only on the tensor's size (so shards still merge
            exactly); 0 bins every element. Min/max and the EMA always see every element. Binning
            costs about 12 ns per element here, more than inference for a transformer.

    Returns:
        :class:`Statistics` keyed by tensor name.

    Raises:
        BadInputError: a calibration input holds NaN or Inf (the message names input and sample).

    Warns:
        DegenerateRangeWarning: a graph input never varies, or tensors have a zero range (their
            scale will be clamped to a tiny epsilon).
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
    observed = set(names)
    # per-channel means feed bias correction: inputs of Conv/ConvTranspose/Gemm/MatMul
    matmul_inputs = {nd.input[0] for nd in model.graph.node if nd.op_type in ("MatMul", "Gemm") and nd.input}
    channel_tensors = {nd.input[0] for nd in model.graph.node
                       if nd.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and nd.input}
    stats = Statistics(settings={"ema_momentum": ema_momentum, "ema_batch": ema_batch})
    tensors = {n: TensorStats() for n in names}
    total = len(samples)
    subsets: dict[int, np.ndarray] = {}
    for start in range(0, total, ema_batch):
        chunk = samples[start:start + ema_batch]
        bmin: dict[str, float] = {}
        bmax: dict[str, float] = {}
        for idx, s in enumerate(chunk, start):
            _check_finite(s, idx)
            try:
                outs = sess.run(out_names, s)
            except Exception as e:  # onnxruntime's errors: the model cannot run on this sample
                msg = " ".join(str(e).split())[:300] or type(e).__name__
                raise UnsupportedModelError(f"ONNX Runtime fails on calibration sample {idx}: {msg}; "
                                            f"fix the model or the data") from None
            pairs = [(n, np.asarray(v)) for n, v in zip(out_names, outs) if n in observed]
            pairs += [(n, np.asarray(s[n])) for n in input_names if n in observed]
            for n, v in pairs:
                if v.size == 0:
                    continue
                lo, hi = tensors[n].observe(v, bins, _subset(v, hist_elements, subsets))
                if n in channel_tensors:
                    tensors[n].observe_channels(v)
                if n in matmul_inputs:
                    tensors[n].observe_last_axis(v)
                bmin[n] = min(bmin.get(n, lo), lo)
                bmax[n] = max(bmax.get(n, hi), hi)
            del outs, pairs
        for n in bmin:
            tensors[n].ema_step(bmin[n], bmax[n], ema_momentum)
            tensors[n].samples += len(chunk)
        if progress:
            progress(min(start + ema_batch, total), total)
    stats.tensors = tensors
    _warn_degenerate(stats, input_names)
    return stats


def statistics_settings(ema_momentum: float = DEFAULT_EMA_MOMENTUM, ema_batch: int = DEFAULT_EMA_BATCH,
                        bins: int = DEFAULT_BINS, hist_elements: int = DEFAULT_HIST_ELEMENTS,
                        skip: set[str] | None = None) -> dict[str, object]:
    """Everything that shapes statistics (the cache key; the observer is not part of it)."""
    return {"ema_momentum": ema_momentum, "ema_batch": ema_batch, "bins": bins, "hist_elements": hist_elements,
            "skip": sorted(skip or ()), "format": STATS_FORMAT, "channel_means": "weighted-op inputs",
            "last_axis_absmax": "MatMul/Gemm inputs"}


def _subset(v: np.ndarray, cap: int, cache: dict[int, np.ndarray]) -> np.ndarray | None:
    """A fixed subset of ``cap`` elements of ``v`` (seeded by its size), or None for all of them."""
    if not cap or v.size <= cap:
        return None
    idx = cache.get(v.size)
    if idx is None:
        idx = np.sort(np.random.default_rng(v.size).choice(v.size, cap, replace=False))
        cache[v.size] = idx
    return v.reshape(-1)[idx]


def _check_finite(sample: Sample, idx: int) -> None:
    for name, a in sample.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise BadInputError(f"calibration sample {idx}: input {name!r} contains NaN or Inf; clean the data")


def _warn_degenerate(stats: Statistics, input_names: list[str]) -> None:
    flat = stats.degenerate()
    if not flat:
        return
    inputs = [n for n in flat if n in input_names]
    for n in inputs:
        warnings.warn(f"calibration input {n!r} never varies (always {stats.tensors[n].min:g}): degenerate range; "
                      f"check the calibration data", DegenerateRangeWarning, stacklevel=3)
    others = [n for n in flat if n not in input_names]
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        warnings.warn(f"{len(others)} tensor(s) have a zero range ({shown}); their scales are clamped to a tiny "
                      f"epsilon", DegenerateRangeWarning, stacklevel=3)
