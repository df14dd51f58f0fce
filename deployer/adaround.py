"""AdaRound: learned rounding of per-channel INT8 weights (Nagel et al. 2020).

Nagel, Amjad, van Baalen, Louizos, Blankevoort, "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020. Rounding every weight to nearest is not what minimizes a layer's output
error. AdaRound keeps each weight's scale and chooses, per weight, ``floor`` or ``floor + 1`` on the
integer grid. It minimizes, layer by layer on calibration inputs ``X``,

    || W X - W~ X ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta),     W~ = s * clip(floor(W / s) + h(V))

with ``h`` the rectified sigmoid (``zeta = 1.1``, ``gamma = -0.1``, paper eq. 23), ``lambda = 0.01``,
``beta`` annealed from 20 to 2 after a warm-up of 20% of the iterations without the regularizer
(paper section 5). At the end ``h`` is rounded to 0/1.

What this implementation does, and where it departs from the paper:

- Inputs ``X`` are the FP32 model's layer inputs (the paper's "FP32 input" variant, Table 5). The
  asymmetric variant, which feeds the already-quantized network's inputs, needs a quantized
  simulator of every backend; not done.
- Only per-channel symmetric INT8 weights (``scale = max|W_c| / 127``, every target's default) are
  rounded. The largest weight of each channel keeps its nearest rounding (``+-127``), so a backend
  that recomputes ``max|W~_c| / 127`` from the rounded weights gets the same scale and, rounding to
  nearest, exactly the learned integers. The rounded weights therefore travel as an ordinary FP32
  model: every backend lowers them without knowing about AdaRound.
- Bounded in time: ``iterations`` per layer (the paper uses 10,000; default here 500 at a larger
  learning rate) and a total ``time_budget_s``. Layers not reached keep rounding to nearest and are
  listed in the summary. With ``time_budget_s = inf`` (``--adaround-iters N``) only the iterations
  bound the work, and the bits are reproducible on any machine, sequential or on Ray.
- Each layer draws its minibatches from its own generator, ``default_rng((seed, layer index))``, so
  layers are independent tasks (:func:`round_layer`).
- The plan stores one bit per weight (``floor`` or ``floor + 1``), packed and base64-encoded
  (:func:`encode_bits`), so a plan stays complete and reproducible without the calibration data.

Torch is used for the optimization only (CPU; Adam, as in the paper).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from calibration.dataset import Sample
from deployer.errors import PlanError
from deployer.graph import GraphView, weight_channel_axis
from deployer.plan import Granularity, Precision, QuantPlan
from deployer.quant import per_channel_scales

ZETA, GAMMA = 1.1, -0.1
"""Rectified sigmoid stretch (paper eq. 23)."""
QMAX = 127
ROUNDED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class AdaRoundConfig:
    """Settings of :func:`compute_rounding`.

    Attributes:
        samples: calibration samples whose layer inputs are used (the first ``samples`` of the set).
        iterations: Adam steps per layer.
        batch: samples per step (convolutions; token rows for MatMul/Gemm are ``batch`` samples' rows).
        learning_rate: Adam learning rate (the paper: 1e-3 over 10,000 steps; 1e-2 over 500 here).
        reg: ``lambda``, the weight of the rounding regularizer (paper: 0.01).
        beta: (start, end) of the annealed regularizer exponent (paper: 20 -> 2).
        warmup: fraction of steps without the regularizer (paper: 0.2).
        time_budget_s: wall-clock budget for all layers, seconds.
        seed: minibatch order.
        crop: convolutions train on random windows of this many output pixels per side (full maps
            when smaller); the loss on windows is an unbiased estimate of the full-map loss.
        eval_samples: samples (full maps) on which nearest and learned rounding are compared at the end.
    """

    samples: int = 32
    iterations: int = 500
    batch: int = 4
    learning_rate: float = 1e-2
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    time_budget_s: float = 600.0
    seed: int = 0
    crop: int = 16
    eval_samples: int = 8


@dataclass
class RoundingResult:
    """Per-node rounding bits (node -> bool array shaped like its weight: True = ``floor + 1``) and a
    summary for the report (layers rounded, skipped with reasons, flipped fraction, seconds)."""

    bits: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def check_budget(value: object, where: str = "--adaround") -> float | None:
    """A validated AdaRound time budget in seconds: None or False = off, True = the default budget,
    else a finite number > 0.

    Raises:
        BadInputError: anything else (text, 0, negative, inf, nan).
    """
    from deployer.errors import BadInputError

    if value is None or value is False:
        return None
    if value is True:
        return AdaRoundConfig().time_budget_s
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadInputError(f"{where} {value!r}: give a time budget in seconds (a finite number > 0), "
                            f"true for the default {AdaRoundConfig().time_budget_s:g} s, or false")
    return float(value)


# -- the plan's storage ------------------------------------------------------------------------------

def encode_bits(bits: np.ndarray) -> str:
    """Pack a boolean array (C order) to base64 text: 1 bit per weight."""
    return base64.b64encode(np.packbits(bits.astype(bool).ravel()).tobytes()).decode("ascii")


def decode_bits(text: str, shape: Sequence[int], node: str = "?") -> np.ndarray:
    """Inverse of :func:`encode_bits` for a weight of ``shape``.

    Raises:
        PlanError: the text is not base64 or holds a different number of bits than the weight.
    """
    try:
        raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=np.uint8)
    except (ValueError, UnicodeEncodeError):
        raise PlanError(f"plan: rounding of node {node!r} is not base64 text; regenerate the plan") from None
    n = int(np.prod(shape))
    if raw.size != (n + 7) // 8:
        raise PlanError(f"plan: rounding of node {node!r} holds {raw.size * 8} bits for a weight of {n} values "
                        f"(shape {list(shape)}); the plan was made for another model, regenerate it")
    return np.unpackbits(raw)[:n].astype(bool).reshape(tuple(shape))


# -- the integer grid ------------------------------------------------------------------------------

def grid(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, floor(w / scale), w / scale)`` with the scale broadcast along ``axis`` (float64)."""
    s = per_channel_scales(w, axis, QMAX).astype(np.float64)
    shape = [1] * w.ndim
    shape[axis] = -1
    s = s.reshape(shape)
    x = w.astype(np.float64) / s
    return s, np.floor(x), x


def rounded_weight(w: np.ndarray, axis: int, bits: np.ndarray) -> np.ndarray:
    """The weight on its INT8 grid with ``bits`` deciding up (True) or down: ``s * clip(floor(w/s) + bits)``.

    The largest |w| of each channel keeps its nearest rounding so that ``max|result_c| / 127`` is the
    channel's scale again (see the module docstring). An exact zero stays zero whatever its bit (``floor(0)
    + 1`` would move it to one step): pruned weights, e.g. a 2:4 sparsity pattern, survive the rounding.
    Returns float32 of ``w``'s shape.
    """
    s, fl, x = grid(w, axis)
    q = np.clip(fl + bits.astype(np.float64), -QMAX, QMAX)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(x), axis=red, keepdims=True)
    at_max = np.abs(x) >= amax
    q = np.where(at_max, np.clip(np.rint(x), -QMAX, QMAX), q)
    q = np.where(x == 0, 0.0, q)
    return (q * s).astype(np.float32)


def nearest_bits(w: np.ndarray, axis: int) -> np.ndarray:
    """The bits that reproduce round-to-nearest (half up; ties are measure-zero for real weights)."""
    _, fl, x = grid(w, axis)
    return (x - fl) >= 0.5


# -- which nodes ---------------------------------------------------------------------------------

def rounding_targets(model: onnx.ModelProto, plan: QuantPlan) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """INT8 Conv/Gemm/MatMul nodes with a constant per-channel 8-bit weight, and the skipped ones with
    the reason (node -> reason)."""
    view = GraphView(model)
    out, skipped = [], {}
    for node in model.graph.node:
        if node.op_type not in ROUNDED_OPS:
            continue
        dec = plan.nodes.get(node.name)
        if dec is None or dec.precision != Precision.INT8 or dec.weight is None:
            continue
        w = view.weight_of(node)
        if w is None:
            continue
        if dec.weight.bits != 8 or dec.weight.granularity != Granularity.PER_CHANNEL:
            skipped[node.name] = "not a per-channel 8-bit weight"
        elif node.input[0] in plan.smoothing:
            skipped[node.name] = "SmoothQuant rescales this weight"
        elif node.op_type == "MatMul" and w.ndim != 2:
            skipped[node.name] = f"{w.ndim}-D MatMul weight"
        elif node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            skipped[node.name] = "Gemm with transA"
        elif node.op_type == "Conv" and (w.ndim != 4 or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET")
                                                          for a in node.attribute)):
            skipped[node.name] = "Conv that is not 2-D with explicit pads"
        else:
            out.append(node)
    return out, skipped


def _layer_inputs(model: onnx.ModelProto, samples: Sequence[Sample], tensors: list[str]) -> dict[str, list[np.ndarray]]:
    """FP32 values of ``tensors`` for each sample (:func:`deployer.recovery.tensor_values`)."""
    from deployer.recovery import tensor_values

    out: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for values in tensor_values(model, samples, tensors):
        for t in tensors:
            out[t].append(np.asarray(values[t], dtype=np.float32))
    return out


# -- one layer -------------------------------------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def _conv_params(node: onnx.NodeProto) -> tuple[list[int], list[int], int, list[int]]:
    """(strides, dilations, group, pads [top, left, bottom, right]) of a 2-D Conv."""
    return (_attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1]), _attr(node, "group", 1),
            _attr(node, "pads", [0, 0, 0, 0]))


def _layer_fn(node: onnx.NodeProto) -> Callable[[Any, Any], Any]:
    """``f(x, w)`` computing the node's output without bias (torch); a Conv takes its input already
    padded (:func:`_rows`)."""
    import torch
    import torch.nn.functional as F

    if node.op_type == "Conv":
        strides, dil, group, _ = _conv_params(node)
        return lambda x, w: F.conv2d(x, w, stride=strides, dilation=dil, groups=group)
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return lambda x, w: torch.matmul(x, w.t())
    return lambda x, w: torch.matmul(x, w)


def _rows(node: onnx.NodeProto, xs: list[np.ndarray]) -> list[np.ndarray]:
    """MatMul/Gemm inputs as 2-D row blocks (tokens x K); Conv inputs zero-padded by the node's pads."""
    if node.op_type == "Conv":
        top, left, bottom, right = _conv_params(node)[3]
        return [np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) for x in xs]
    return [x.reshape(-1, x.shape[-1]) for x in xs]


def _crop(x: Any, kernel: tuple[int, int], node: onnx.NodeProto, out: int, rng: np.random.Generator) -> Any:
    """A random window of a padded conv input whose output is ``out`` x ``out`` pixels (the whole map
    when it is smaller): the reconstruction loss on windows is an unbiased estimate of the full one at
    a fraction of the cost on large feature maps."""
    strides, dil, _, _ = _conv_params(node)
    sl = []
    for ax in (0, 1):
        size = x.shape[2 + ax]
        span = (kernel[ax] - 1) * dil[ax] + 1
        n_out = (size - span) // strides[ax] + 1
        if n_out <= out:
            sl.append(slice(0, size))
            continue
        o = int(rng.integers(0, n_out - out + 1))
        sl.append(slice(o * strides[ax], o * strides[ax] + (out - 1) * strides[ax] + span))
    return x[:, :, sl[0], sl[1]]


def learn_rounding(node: onnx.NodeProto, w: np.ndarray, xs: list[np.ndarray], cfg: AdaRoundConfig,
                   rng: np.random.Generator, deadline: float) -> tuple[np.ndarray, dict[str, float]]:
    """AdaRound for one layer: bits (True = ``floor + 1``) and ``{"mse_nearest", "mse_adaround",
    "steps"}`` (output MSE on the layer's inputs, before and after)."""
    import torch

    axis = weight_channel_axis(node)
    s, fl, x = grid(w, axis)
    rest = np.clip(x - fl, 1e-4, 1 - 1e-4)
    # h(V) = rest at the start: sigmoid(V) = (rest - gamma) / (zeta - gamma)
    v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    f = _layer_fn(node)
    wt = torch.from_numpy(w.astype(np.float32))
    st, flt = torch.from_numpy(s.astype(np.float32)), torch.from_numpy(fl.astype(np.float32))
    nonzero = torch.from_numpy((w != 0).astype(np.float32))
    v = torch.nn.Parameter(torch.from_numpy(v0.astype(np.float32)))
    opt = torch.optim.Adam([v], lr=cfg.learning_rate)
    blocks = [torch.from_numpy(b) for b in _rows(node, xs)]
    conv_axis_sum = 1 if node.op_type == "Conv" else -1  # sum over output channels, mean over the rest
    kernel = (int(w.shape[2]), int(w.shape[3])) if node.op_type == "Conv" else (1, 1)

    def batch() -> Any:
        idx = rng.choice(len(blocks), size=min(cfg.batch, len(blocks)), replace=False)
        if node.op_type != "Conv":
            return torch.cat([blocks[i] for i in idx])
        crops = [_crop(blocks[i], kernel, node, cfg.crop, rng) for i in idx]
        if len({tuple(c.shape) for c in crops}) == 1:
            return torch.cat(crops)
        return crops[0]  # maps of different sizes smaller than a window (dynamic shapes)

    def h() -> Any:
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def recon(xb: Any, wq: Any) -> Any:
        with torch.no_grad():
            ref = f(xb, wt)
        return ((f(xb, wq) - ref) ** 2).sum(dim=conv_axis_sum).mean()

    def evaluate(bits: np.ndarray) -> float:
        wq = torch.from_numpy(rounded_weight(w, axis, bits))
        few = blocks[: cfg.eval_samples]
        with torch.no_grad():
            return float(sum(float(recon(b, wq)) for b in few) / len(few))

    warm = int(cfg.warmup * cfg.iterations)
    steps = 0
    for it in range(cfg.iterations):
        if time.perf_counter() > deadline:
            break
        xb = batch()
        wq = st * torch.clamp(flt + h(), -QMAX, QMAX) * nonzero  # exact zeros stay zero (rounded_weight)
        loss = recon(xb, wq)
        if it >= warm:
            t = (it - warm) / max(cfg.iterations - warm, 1)
            beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * t))
            loss = loss + cfg.reg * (1 - (2 * h() - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    with torch.no_grad():
        learned = (h() >= 0.5).numpy()
    near = nearest_bits(w, axis)
    before, after = evaluate(near), evaluate(learned)
    if after > before:  # never worse than nearest on the layer's own inputs
        learned = near
    return learned, {"mse_nearest": before, "mse_adaround": min(after, before), "steps": steps}


def compute_rounding(model: onnx.ModelProto, plan: QuantPlan, samples: Sequence[Sample],
                     config: AdaRoundConfig | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     cluster: str | None = None) -> RoundingResult:
    """Learned rounding for every eligible INT8 weight of ``model`` (see :func:`rounding_targets`).

    Layers are visited in graph order; their FP32 inputs come from ``config.samples`` calibration
    samples, collected one layer group at a time to bound memory. Each layer is an independent task
    (:func:`round_layer`, its minibatches drawn from ``default_rng((seed, layer index))``), mapped
    with :func:`deployer.distributed.task_map`: in this process, or as Ray tasks on ``cluster``.
    With an iteration budget (``time_budget_s`` infinite, ``--adaround-iters``) the bits are the same
    on every run, sequential or on Ray; a wall-clock budget stops where the clock says.

    Returns:
        :class:`RoundingResult`; ``summary`` has ``layers``, ``skipped`` (node -> reason),
        ``not_reached`` (time budget), ``flipped_fraction`` (weights rounded away from nearest),
        ``output_mse_ratio`` (median over layers of AdaRound / nearest output MSE) and ``seconds``.
    """
    import torch

    cfg = config or AdaRoundConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-layer problems: more threads only contend (measured 3-10x slower on 2 cores)
    try:
        return _compute_rounding(model, plan, samples, cfg, progress, cluster)
    finally:
        torch.set_num_threads(threads)


def round_layer(node: onnx.NodeProto, w: np.ndarray, xs: list[np.ndarray], cfg: AdaRoundConfig, index: int,
                deadline_epoch: float) -> tuple[np.ndarray, dict[str, float]]:
    """One layer's AdaRound task: :func:`learn_rounding` with the layer's own seeded generator
    (``default_rng((cfg.seed, index))``), stopping at ``deadline_epoch`` (``time.time()`` seconds; inf:
    the iterations only). Past the deadline: nearest bits and ``steps`` 0 (not reached)."""
    import torch

    left = deadline_epoch - time.time()
    if left <= 0:
        return nearest_bits(w, weight_channel_axis(node)), {"mse_nearest": 0.0, "mse_adaround": 0.0, "steps": 0}
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed + index)
    return learn_rounding(node, w, xs, cfg, np.random.default_rng((cfg.seed, index)), time.perf_counter() + left)


def _compute_rounding(model: onnx.ModelProto, plan: QuantPlan, samples: Sequence[Sample], cfg: AdaRoundConfig,
                      progress: Callable[[int, int], None] | None, cluster: str | None) -> RoundingResult:
    from deployer.distributed import task_map

    t0 = time.perf_counter()
    deadline = t0 + cfg.time_budget_s
    targets, skipped = rounding_targets(model, plan)
    view = GraphView(model)
    subset = [samples[i] for i in range(min(cfg.samples, len(samples)))]
    result = RoundingResult()
    ratios: list[float] = []
    flipped = total = 0
    not_reached: list[str] = []
    group = 8  # layers whose inputs are held at once
    for start in range(0, len(targets), group):
        chunk = targets[start:start + group]
        if time.perf_counter() > deadline:
            not_reached += [n.name for n in chunk]
            continue
        inputs = _layer_inputs(model, subset, sorted({n.input[0] for n in chunk}))
        weights = [view.weight_of(node) for node in chunk]
        until = time.time() + (deadline - time.perf_counter())  # wall-clock, comparable across processes
        outs = task_map(round_layer, [(node, w, inputs[node.input[0]], cfg, start + k, until)
                                      for k, (node, w) in enumerate(zip(chunk, weights))], cluster)
        for k, (node, w, (bits, info)) in enumerate(zip(chunk, weights, outs)):
            assert w is not None
            if info["steps"] == 0 and cfg.iterations > 0:  # the clock ran out before this layer began
                not_reached.append(node.name)
                continue
            result.bits[node.name] = bits
            near = nearest_bits(w, weight_channel_axis(node))
            flipped += int(np.sum(bits != near))
            total += int(bits.size)
            if info["mse_nearest"] > 0:
                ratios.append(info["mse_adaround"] / info["mse_nearest"])
            if progress:
                progress(start + k + 1, len(targets))
        del inputs
    result.summary = {
        "layers": len(result.bits), "skipped": skipped, "not_reached": not_reached,
        "flipped_fraction": round(flipped / total, 4) if total else 0.0,
        "output_mse_ratio": round(float(np.median(ratios)), 4) if ratios else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "config": {"samples": cfg.samples, "iterations": cfg.iterations, "learning_rate": cfg.learning_rate,
                   "time_budget_s": cfg.time_budget_s if math.isfinite(cfg.time_budget_s) else None},
    }
    return result


# -- applying a plan's rounding ----------------------------------------------------------------------

def apply_rounding(model: onnx.ModelProto, rounding: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` whose rounded nodes' weights are replaced by their AdaRound grid values.

    Shared weight initializers are copied so that only the rounded node changes.

    Raises:
        PlanError: a rounding entry does not fit its node's weight.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not rounding:
        return out
    view = GraphView(out)
    from deployer.graph import WEIGHTED_OPS

    for node in out.graph.node:
        text = rounding.get(node.name)
        if text is None:
            continue
        w = view.weight_of(node)
        if w is None:
            raise PlanError(f"plan: rounding names node {node.name!r}, which has no constant weight in this model")
        bits = decode_bits(text, w.shape, node.name)
        idx = WEIGHTED_OPS[node.op_type]
        name = f"{node.input[idx]}__adaround_{node.name}"
        out.graph.initializer.append(numpy_helper.from_array(rounded_weight(w, weight_channel_axis(node), bits), name))
        node.input[idx] = name
    used = {i for n in out.graph.node for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out
