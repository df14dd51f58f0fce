"""Run the FP32 reference in ONNX Runtime over a calibration set and collect tensor statistics.

Every float activation produced by a node (and every float graph input) is observed, streaming: one
sample at a time, nothing kept but :class:`calibration.observers.TensorStats` (min/max, EMA, a
fixed-size histogram), so memory does not grow with the number of samples.

Every observed tensor comes back from one augmented session (all of them as outputs) and is reduced
with numpy right away: min/max (every element), a fixed subset of at most ``hist_elements`` values for
the histogram, per-channel sums (axis 1) for bias correction's means and per-last-axis max
``|x|`` for SmoothQuant. Then the outputs are dropped; the histogram values of an EMA batch (at most
``ema_batch x hist_elements`` per tensor) are binned once at the end of the batch. The reductions of sample ``k`` run in one worker
thread while ONNX Runtime runs sample ``k + 1`` (numpy releases the GIL), so at most two samples'
activations are alive. Doing these reductions inside the graph, as ONNX
Runtime's ``MinMaxCalibrater`` does with ``ReduceMin``/``ReduceMax``, was measured slower here
(EfficientNet-Lite0, one thread, per sample: plain inference 31 ms; every tensor returned 33 ms, plus
numpy min+max 5.6 ms; in-graph ReduceMin+ReduceMax 39.6 ms; in-graph Reshape+Gather of the subset
another 11 ms), so only the numpy path exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
from onnx import helper

from calibration.dataset import Sample
from calibration.histogram import DEFAULT_BINS
from calibration.observers import DEFAULT_EMA_BATCH, DEFAULT_EMA_MOMENTUM, STATS_FORMAT, Statistics, TensorStats
from calibration.partial import BatchRecord, Fold, Partial
from deployer.errors import BadInputError, UnsupportedModelError


class DegenerateRangeWarning(UserWarning):
    """A calibrated tensor never varied (its range is a single value)."""

DEFAULT_HIST_ELEMENTS = 4096
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _inferred(model: onnx.ModelProto | bytes) -> dict[str, int]:
    """Elem type of every tensor shape inference can type (``model`` as a proto or serialized)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.tensor_type.elem_type:  # an untyped output added for calibration does not hide its value_info
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Names of float tensors produced by nodes (needs shape inference) plus float graph inputs."""
    types = _inferred(model)
    return _float_names(model, types)


def _float_names(model: onnx.ModelProto, types: dict[str, int]) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits and types.get(i.name) in FLOAT_TYPES]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if o and types.get(o) in FLOAT_TYPES:
                names.append(o)
    return list(dict.fromkeys(names))


SHAPE_ONLY = ("Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
"""Ops whose output is a reshaped copy of their first input (same values, same range)."""


def reshape_chain(producer: dict[str, onnx.NodeProto], t: str) -> tuple[list[str], onnx.NodeProto | None]:
    """``t`` and the tensors it is a reshaped copy of (back through :data:`SHAPE_ONLY` producers), and
    the first other producer (None at a graph input)."""
    chain = [t]
    nd = producer.get(t)
    while nd is not None and nd.op_type in SHAPE_ONLY and nd.input:
        chain.append(nd.input[0])
        nd = producer.get(nd.input[0])
    return chain, nd


def unclipped_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors whose range the clipping (histogram) observers must not narrow: the graph outputs, and
    the inputs of a Softmax/LogSoftmax that produces a graph output (pre-softmax logits), followed back
    through a Reshape/Flatten/Identity/Transpose/Squeeze/Unsqueeze chain. The pipeline gives them
    their min/max range (see :mod:`calibration.observers`)."""
    producer = {o: nd for nd in model.graph.node for o in nd.output}
    keep: set[str] = set()
    for o in model.graph.output:
        chain, nd = reshape_chain(producer, o.name)
        keep.update(chain)
        if nd is not None and nd.op_type in ("Softmax", "LogSoftmax") and nd.input:
            keep.update(reshape_chain(producer, nd.input[0])[0])
    return keep


def subset_indices(size: int, cap: int) -> np.ndarray | slice:
    """The fixed histogram subset of a tensor of ``size > cap`` elements (flat positions), a function of
    ``size`` and ``cap`` only, so shards merge exactly.

    Returns ``cap`` positions: a strided slice (stride: the largest prime <= ``size // cap``, so it
    does not line up with the power-of-two and multiple-of-8 dims of feature maps; start drawn with
    ``default_rng(size)``) when ``size >= 2 * cap`` (a strided copy costs microseconds; a random
    gather of 4,096 values from each of EfficientNet-Lite0's 95 tensors cost 5 ms per sample), else
    ``cap`` sorted int64 positions drawn without replacement with ``default_rng(size)``.
    """
    rng = np.random.default_rng(size)
    if size < 2 * cap:
        return np.sort(rng.choice(size, cap, replace=False)).astype(np.int64)
    stride = _largest_prime_at_most(size // cap)
    start = int(rng.integers(0, size - stride * (cap - 1)))
    return slice(start, start + stride * (cap - 1) + 1, stride)


def _largest_prime_at_most(n: int) -> int:
    for k in range(max(n, 2), 1, -1):
        if all(k % d for d in range(2, int(k ** 0.5) + 1)):
            return k
    return 2


def collect_statistics(
    model: onnx.ModelProto,
    samples: Iterable[Sample],
    skip: set[str] | None = None,
    ema_momentum: float = DEFAULT_EMA_MOMENTUM,
    ema_batch: int = DEFAULT_EMA_BATCH,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 0,
    bins: int = DEFAULT_BINS,
    hist_elements: int = DEFAULT_HIST_ELEMENTS,
) -> Statistics:
    """Observe every float activation of ``model`` over ``samples``, streaming.

    Args:
        model: FP32 reference model.
        samples: calibration samples (``dict[input_name, ndarray]``), iterated once, in order; a lazy
            :class:`calibration.dataset.CalibrationSet` is never materialized (one sample at a time).
        skip: tensor names not to observe (e.g. attention-mask paths).
        ema_momentum: EMA momentum for the seed's observer.
        ema_batch: samples per EMA batch.
        progress: called with (done, total) after each batch (total: ``len(samples)``, or the count so
            far when ``samples`` has no length).
        threads: ONNX Runtime intra-op threads (0: its default).
        bins: histogram bins per tensor (a power of two).
        hist_elements: the histogram bins at most this many elements of each tensor per sample, a
            fixed seeded subset that depends only on the tensor's size (:func:`subset_indices`, so
            shards still merge exactly); 0 bins every element. Min/max and the EMA always see every
            element. Binning costs about 12 ns per element here, more than inference for a
            transformer.

    Returns:
        :class:`Statistics` keyed by tensor name: the one-shard case of :class:`calibration.partial.Fold`
        (a sharded run, :mod:`deployer.distributed`, folds the same batch records and is byte-identical).

    Raises:
        BadInputError: a calibration input holds NaN or Inf (the message names input and sample).
        UnsupportedModelError: ONNX Runtime fails on a sample.

    Warns:
        DegenerateRangeWarning: a graph input never varies, or tensors have a zero range (their
            scale will be clamped to a tiny epsilon).
    """
    fold = Fold(ema_momentum, ema_batch)
    part = collect_partial(model, samples, skip, ema_batch, progress, threads, bins, hist_elements,
                           on_batch=fold.add_batch)
    fold.add_exact(part)
    stats = fold.result()
    warn_degenerate(stats, part.input_names)
    return stats


def collect_partial(
    model: onnx.ModelProto,
    samples: Iterable[Sample],
    skip: set[str] | None = None,
    ema_batch: int = DEFAULT_EMA_BATCH,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 0,
    bins: int = DEFAULT_BINS,
    hist_elements: int = DEFAULT_HIST_ELEMENTS,
    on_batch: Callable[[BatchRecord], None] | None = None,
    first_index: int = 0,
) -> Partial:
    """The calibration pass of :func:`collect_statistics` over a run of samples, as a :class:`Partial`.

    Args:
        on_batch: called with each EMA batch's :class:`BatchRecord` as it completes (a one-process
            pass folds it at once); None keeps the records in ``Partial.batches`` (a shard returns
            them to the driver, which folds every shard's records in sample order).
        first_index: index of the first sample in the whole set (error messages name that index).
        Others: as :func:`collect_statistics`.

    Raises:
        As :func:`collect_statistics`.
    """
    import onnxruntime as ort

    inits = {x.name for x in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in inits]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # Every node output becomes a graph output, added to the caller's model for one serialization and
    # removed again (no copy of the weights beyond the serialized bytes); the same bytes feed shape
    # inference (the float tensors are the observed ones) and the session.
    n_out = len(model.graph.output)
    existing = {o.name for o in model.graph.output}
    try:
        for nd in model.graph.node:
            for o in nd.output:
                if o and o not in existing and o not in input_names:
                    model.graph.output.append(helper.make_empty_tensor_value_info(o))
                    existing.add(o)
        blob = model.SerializeToString()
    finally:
        while len(model.graph.output) > n_out:
            model.graph.output.pop()
    types = _inferred(blob)
    names = [n for n in _float_names(model, types) if not (skip and n in skip)]
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    del blob
    fetch = [n for n in names if n not in input_names]
    from_sample = [n for n in names if n in input_names]
    # per-channel means feed bias correction: inputs of Conv/ConvTranspose/Gemm/MatMul
    matmul_inputs = {nd.input[0] for nd in model.graph.node if nd.op_type in ("MatMul", "Gemm") and nd.input}
    channel_tensors = {nd.input[0] for nd in model.graph.node
                       if nd.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and nd.input}
    part = Partial(exact={n: TensorStats() for n in names}, input_names=input_names)
    tensors = part.exact
    shapes_seen = Statistics()
    subsets: dict[int, np.ndarray | slice] = {}
    total = len(samples) if hasattr(samples, "__len__") else 0  # type: ignore[arg-type]
    rec = BatchRecord()
    sink = on_batch if on_batch is not None else part.batches.append
    in_batch = 0
    done = 0

    # values to bin, per tensor, for the current EMA batch: binned once per batch (the histogram depends
    # only on the multiset of values and the range, so this equals binning every sample)
    to_bin: dict[str, list[np.ndarray]] = {}

    def bin_batch() -> None:
        for n, parts in to_bin.items():
            tensors[n].observe_reduced(rec.bmin[n], rec.bmax[n],
                                       parts[0] if len(parts) == 1 else np.concatenate(parts), bins)
        to_bin.clear()

    def end_batch() -> None:
        nonlocal rec
        bin_batch()  # a no-op when the worker binned the batch with its last sample
        rec.size = in_batch
        sink(rec)
        rec = BatchRecord()
        if progress:
            progress(done, max(total, done))

    def reduce(outs: list[np.ndarray], s: Sample, last_of_batch: bool) -> None:
        pairs = list(zip(fetch, outs)) + [(n, np.asarray(s[n])) for n in from_sample]
        for n, v in pairs:
            if v.size == 0:
                continue
            lo, hi = float(v.min()), float(v.max())
            sub = _subset(v, hist_elements, subsets)
            # a copy: a strided view would keep the whole activation alive until the batch ends
            to_bin.setdefault(n, []).append(np.array(v if sub is None else sub, copy=True).reshape(-1))
            if v.ndim >= 2 and n in channel_tensors:
                # float32 pairwise sums along the contiguous axis (a view when the batch is 1), float64 across
                # the samples of the batch, then across batches (calibration.partial.Fold)
                cs = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).sum(axis=1).astype(np.float64)
                _acc(rec.chan_sum, rec.chan_count, n, cs, v.size // v.shape[1])
            if v.ndim >= 2 and n in matmul_inputs:
                rows = np.abs(v.reshape(-1, v.shape[-1]))
                lm = rows.max(axis=0).astype(np.float64)
                la = rows.sum(axis=0).astype(np.float64)
                prev = rec.last_max.get(n)
                if prev is None:
                    rec.last_max[n] = lm
                elif prev.shape == lm.shape:
                    np.maximum(prev, lm, out=prev)
                _acc(rec.last_abs, rec.last_rows, n, la, rows.shape[0])
            rec.bmin[n] = min(rec.bmin.get(n, lo), lo)
            rec.bmax[n] = max(rec.bmax.get(n, hi), hi)
        if last_of_batch:
            bin_batch()

    # sample k's reductions (numpy, GIL released) overlap sample k+1's inference; at most one pending
    pending: Future[None] | None = None

    def finish() -> None:
        nonlocal pending, in_batch, done
        if pending is None:
            return
        pending.result()
        pending = None
        in_batch += 1
        done += 1
        if in_batch == ema_batch:
            end_batch()
            in_batch = 0

    with ThreadPoolExecutor(1, thread_name_prefix="calibration-reduce") as pool:
        try:
            for idx, s in enumerate(samples):
                _check_finite(s, first_index + idx)
                for name, arr in s.items():
                    shapes_seen.observe_input_shape(name, tuple(int(d) for d in np.shape(arr)))
                try:
                    outs = sess.run(fetch, s)
                except Exception as e:  # onnxruntime's errors: the model cannot run on this sample
                    msg = " ".join(str(e).split())[:300] or type(e).__name__
                    raise UnsupportedModelError(f"ONNX Runtime fails on calibration sample {first_index + idx}: "
                                                f"{msg}; fix the model or the data") from None
                finish()
                pending = pool.submit(reduce, outs, s, (idx + 1) % ema_batch == 0)
                del outs
            finish()
        finally:
            if pending is not None:
                pending.cancel()
    if in_batch:
        end_batch()
    part.input_shapes = shapes_seen.input_shapes
    part.samples = done
    return part


def _acc(total: dict[str, np.ndarray], counts: dict[str, int], n: str, part: np.ndarray, k: int) -> None:
    """``total[n] += part`` within one batch (the first sample's shape is kept, others dropped)."""
    prev = total.get(n)
    if prev is None:
        total[n], counts[n] = part, k
    elif prev.shape == part.shape:
        prev += part
        counts[n] += k


def statistics_settings(ema_momentum: float = DEFAULT_EMA_MOMENTUM, ema_batch: int = DEFAULT_EMA_BATCH,
                        bins: int = DEFAULT_BINS, hist_elements: int = DEFAULT_HIST_ELEMENTS,
                        skip: set[str] | None = None) -> dict[str, object]:
    """Everything that shapes statistics (the cache key; the observer is not part of it)."""
    return {"ema_momentum": ema_momentum, "ema_batch": ema_batch, "bins": bins, "hist_elements": hist_elements,
            "skip": sorted(skip or ()), "format": STATS_FORMAT, "channel_means": "weighted-op inputs, summed per EMA batch",
            "last_axis_absmax": "MatMul/Gemm inputs", "last_axis_abssum": "MatMul/Gemm inputs"}


def _subset(v: np.ndarray, cap: int, cache: dict[int, np.ndarray | slice]) -> np.ndarray | None:
    """The fixed subset (:func:`subset_indices`) of ``v``'s elements, or None for all of them."""
    if not cap or v.size <= cap:
        return None
    idx = cache.get(v.size)
    if idx is None:
        idx = cache[v.size] = subset_indices(v.size, cap)
    return v.reshape(-1)[idx]


def _check_finite(sample: Sample, idx: int) -> None:
    for name, a in sample.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise BadInputError(f"calibration sample {idx}: input {name!r} contains NaN or Inf; clean the data")


def warn_degenerate(stats: Statistics, input_names: list[str]) -> None:
    """Warn (:class:`DegenerateRangeWarning`) about inputs that never vary and zero-range tensors."""
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
