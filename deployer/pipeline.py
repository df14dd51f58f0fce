"""The deploy pipeline: model -> FP32 reference -> shared calibration -> plan -> lowering -> verify -> report.

Data flows left to right once: statistics are computed once per command and reused for every target.
All outputs are written into a temporary directory beside ``out_dir`` and renamed at the end, so an
error or an interrupt never leaves a half-written output directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Backend, discover, onnx_runner, resolve_targets
from calibration.adapters import load_calibration
from calibration.cache import cached_statistics
from calibration.collect import unclipped_tensors
from calibration.dataset import CalibrationSet, from_iterable, sha256_file
from calibration.observers import (DEFAULT_EMA_MOMENTUM, HISTOGRAM_OBSERVERS, OBSERVERS, Statistics, auto_observer,
                                   reduce_range)
from deployer import __version__
from deployer.errors import BackendUnavailableError, BadInputError, DeployerError, GateFailedError, UnsupportedModelError
from deployer.gates import failed_enforced, gate_verdict, parse_gates
from deployer.examples import DEFAULT_EXAMPLE, EXAMPLES, ExampleData, get_example
from deployer.model_io import canonicalize, check_runnable, export_torch, input_specs, load_onnx, model_sha256
from deployer.output_dir import atomic_output, check_output_dir, check_plan_output, write_manifest
from deployer.plan import QuantPlan, TensorRange, validate_against_model
from deployer.recipe import decide, load_gates, load_recovery, load_rules
from deployer.deliver import (FLOOR_GATE, Shared, TargetResult, deliver, failed_target,  # noqa: F401
                              labelled_metrics, target_plan)
from deployer.judge import FidelityFloor
from deployer.upcast import Upcast, upcast_samples, upcast_to_float32

DEFAULT_CALIB_SAMPLES = 256
DEFAULT_HELDOUT_SAMPLES = 300


@dataclass
class DeployOptions:
    """Options shared by the CLI and the Python API (names match the CLI flags).

    Attributes:
        targets: backend names (``["tflite", "tensorrt", "ascend"]``) or ``"all"``.
        observer: ``minmax``, ``ema`` (the seed's EMA of per-batch min/max), ``percentile``,
            ``entropy``, ``mse`` or ``auto`` (one of them per tensor,
            :func:`calibration.observers.auto_observer`); see :mod:`calibration.observers`.
        recipe: preset name (``int8``, ``mixed``, ``fp16``) or a rules file.
        calib_samples: number of calibration samples (built-in examples draw that many crops; user data: a
            seeded shuffle of its calibration part with ``seed``, then the first N).
        heldout_samples: number of held-out samples (built-in examples).
        seed: fixed seed of the example split and of the --calib-samples shuffle.
        bias_correction: add empirical bias correction (Nagel et al. 2019) to the plan.
        smoothquant: SmoothQuant migration strength alpha for INT8 MatMuls with constant weights
            (Xiao et al. 2023); None = the recipe's choice (``mixed``: 0.8, others off).
        no_smoothquant: no SmoothQuant even where the recipe asks for it.
        equalize: cross-layer equalization of Conv pairs before calibration (Nagel et al. 2019,
            :mod:`deployer.equalize`); off by default (it lowers EfficientNet-Lite0's fidelity, see
            ``benchmarks/results/fidelity.md``).
        adaround: learned rounding of the per-channel INT8 weights (Nagel et al. 2020,
            :mod:`deployer.adaround`) with this wall-clock budget in seconds; None = the recipe's
            choice (off in every preset).
        fidelity_target: run the mixed-precision search (:mod:`deployer.mixed`) for this fraction of
            FP32's primary metric (e.g. 0.99); None = no search.
        search_budget: evaluations the search may spend after its sensitivity pass.
        enforce_gates: a failed seed release gate (``speed-per-fidelity``, ``size-vs-recall``) raises
            :class:`GateFailedError` (exit 1) after writing.
        gates: gate thresholds ``{name: value}`` (:mod:`deployer.gates`), over a recipe file's ``gates``;
            each one given is enforced (a failure raises :class:`GateFailedError` after writing).
        eval_dir: labelled held-out data (``DIR/inputs/`` samples + ``DIR/labels.npy``) replacing
            the held-out set; enables labelled metrics (accuracy, macro recall) and the recall gate.
        metric: user task metric: per-sample outputs of the held-out set -> ``{name: value}``;
            reported for FP32 and each artifact with ``<name>_relative``.
        min_fidelity: the fidelity floor every output of every target must reach to ship
            (:class:`deployer.judge.FidelityFloor`: ``"cosine=0.99,sqnr_db=20"``, a dict, a number = cosine;
            None = the defaults). Below it a target is escalated, then marked "does not ship" (exit 1).
        heldout_dir: unlabelled held-out samples (a folder like ``--calib``) replacing the held-out set
            (``--eval`` is the labelled form; giving both is an error).
        cluster: run calibration shards and the search's evaluations on Ray (:mod:`deployer.distributed`):
            None (default: this process only), ``"local"`` or a cluster address (``--ray``, ``--ray-address``).
        adaround_iters: AdaRound iterations per layer (a budget that gives the same bits on every run and
            machine, unlike the wall-clock ``adaround``; ``--adaround-iters``); None = the time budget.
        ema_momentum: EMA momentum.
        overwrite: replace an existing output directory.
        no_cache: neither read nor write the user statistics cache (``--no-cache``).
        backend_options: per-backend options (``soc_version``, ``tflite_io``, ``tflite_layout`` ...).
    """

    targets: Sequence[str] | str = "all"
    observer: str = "minmax"
    recipe: str = "int8"
    calib_samples: int | None = None
    heldout_samples: int = DEFAULT_HELDOUT_SAMPLES
    seed: int = 0
    ema_momentum: float = DEFAULT_EMA_MOMENTUM
    overwrite: bool = False
    no_cache: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)
    bias_correction: bool = True
    smoothquant: float | None = None
    no_smoothquant: bool = False
    equalize: bool = False
    adaround: float | None = None
    fidelity_target: float | None = None
    search_budget: int = 24
    enforce_gates: bool = False
    gates: Mapping[str, float] | None = None
    eval_dir: str | Path | None = None
    metric: Callable[[list[list[np.ndarray]]], dict[str, float]] | None = None
    min_fidelity: FidelityFloor | str | float | dict[str, float] | None = None
    heldout_dir: str | Path | None = None
    cluster: str | None = None
    adaround_iters: int | None = None


@dataclass
class Inputs:
    """The FP32 reference and the data of one command."""

    reference: onnx.ModelProto
    calibration: CalibrationSet
    heldout: CalibrationSet
    task: str
    source: str
    split: str
    metric: Callable[[list[list[np.ndarray]]], dict[str, float]] | None = None
    labels: np.ndarray | None = None
    imported: dict[str, Any] | None = None
    validation: CalibrationSet | None = None
    upcast: Upcast = field(default_factory=Upcast)  # a float16/bfloat16 source model (deployer.upcast)


@dataclass
class DeployResult:
    """What :func:`deployer.deploy` returns.

    Attributes:
        out_dir: the final output directory.
        plan_path: ``out_dir / "plan.json"``.
        report_path: ``out_dir / "report.json"``.
        targets: target name -> :class:`TargetResult`.
        report: the full report dict.
    """

    out_dir: Path
    plan_path: Path
    report_path: Path
    targets: dict[str, TargetResult]
    report: dict[str, Any]


Progress = Callable[[str, int, int], None]


def _noop(_: str, __: int, ___: int) -> None:
    return None


def load_inputs(model: Any, calib: Any = None, options: DeployOptions | None = None) -> Inputs:
    """Resolve the model argument and calibration argument into an :class:`Inputs`.

    Args:
        model: None (the default example), an example name, an :class:`ExampleData` (model and
            splits prepared by the caller, e.g. ``deploy --distill``), a path to a ``.onnx`` file, an
            ``onnx.ModelProto`` or a ``torch.nn.Module`` (exported at opset 17 with the shapes of the
            first calibration sample).
        calib: None (the example's set), a folder of ``.npy``/``.npz`` files, or an iterable of samples.

    Raises:
        BadInputError: unknown example, unreadable model, calibration that does not match the model.
    """
    opts = options or DeployOptions()
    _check_values(opts)  # also here: load_inputs is public API, called without preflight
    if isinstance(model, ExampleData):  # prepared data, e.g. a distilled student with its example's splits
        ref = canonicalize(model.model)
        cal = model.calibration if calib is None else _user_calibration(calib, ref)
        return _with_eval(Inputs(ref, cal, model.heldout, model.task, f"prepared:{model.calibration.name}",
                                 model.split, opts.metric or model.metric), opts)
    if model is None or (isinstance(model, str) and model in EXAMPLES):
        name = model or DEFAULT_EXAMPLE
        ex = get_example(name)
        n_cal = DEFAULT_CALIB_SAMPLES if opts.calib_samples is None else opts.calib_samples
        data = ex.build(n_cal, opts.heldout_samples, opts.seed)
        ref = canonicalize(data.model)
        cal = data.calibration
        if calib is not None:
            cal = _user_calibration(calib, ref)
            if opts.calib_samples is not None:
                cal = cal.shuffled(opts.seed)[: opts.calib_samples]
        return _with_eval(Inputs(ref, cal, data.heldout, data.task, f"example:{name}", data.split,
                                 opts.metric or data.metric, validation=data.validation), opts)
    if isinstance(model, (str, Path)):
        p = Path(model)
        if p.suffix.lower() != ".onnx" and not p.exists():
            raise BadInputError(f"model {model!r} is neither a built-in example ({', '.join(EXAMPLES)}) nor an existing file")
        raw, up = upcast_to_float32(load_onnx(p))
        ref, imported = _import_if_quantized(raw)
        source = str(p)
    elif isinstance(model, onnx.ModelProto):
        raw, up = upcast_to_float32(model)
        ref = canonicalize(raw)
        source = "onnx.ModelProto"
    elif hasattr(model, "forward") and hasattr(model, "eval"):
        if calib is None:
            raise BadInputError("a torch.nn.Module needs calibration samples (their shapes fix the export)")
        first = _first_sample(Path(calib)) if isinstance(calib, (str, Path)) else next(iter(calib))
        example = first if isinstance(first, dict) else {"input": first}
        example = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in example.items()}
        ref = canonicalize(export_torch(model, example))
        source = f"torch:{type(model).__name__}"
        up = Upcast()
    else:
        raise BadInputError(f"model of type {type(model).__name__} is not supported; give a .onnx path, an example "
                            f"name or a torch.nn.Module")
    if calib is None:
        raise BadInputError("a user model needs calibration data; pass --calib DIR (.npy/.npz samples keyed by input name)")
    cal = _user_calibration(calib, ref, up)
    check_runnable(ref, source)
    n = len(cal)
    if opts.heldout_dir is not None:
        held = cal
        split = f"user calibration set: all {n} samples calibrate"
    elif n >= 5:
        k = max(1, n // 5)
        cal, held = cal.split(n - k)
        split = f"user calibration set: first {n - k} samples calibrate, last {k} are held out"
    else:
        held = cal
        split = f"user calibration set of {n} samples: too few to hold out, verification reuses them"
    if opts.calib_samples is not None:  # a seeded shuffle of the calibration part, then the first N
        cal = cal.shuffled(opts.seed)[: opts.calib_samples]
    task = "classification" if _looks_like_classifier(ref) else "generic"
    if not isinstance(model, (str, Path)):
        imported = None
    return _with_eval(Inputs(ref, cal, held, task, source, split, opts.metric, imported=imported,
                             upcast=up), opts)


def _import_if_quantized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """Canonicalize; a QDQ model is first split into its FP32 graph and its scales (:mod:`deployer.import_qdq`)."""
    from deployer.import_qdq import import_qdq, is_qdq_model

    if not is_qdq_model(model):
        return canonicalize(model), None
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for i, node in enumerate(named.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    fp32, decisions, ranges, summary = import_qdq(named)
    ref = canonicalize(fp32)
    nodes = {n.name: n.op_type for n in ref.graph.node}
    from deployer.graph import GraphView

    tensors = GraphView(ref).tensor_names()
    kept_nodes = {k: v for k, v in decisions.items() if nodes.get(k) == v.op_type}
    kept_ranges = {k: v for k, v in ranges.items() if k in tensors}
    summary["dropped_by_canonicalization"] = (len(decisions) - len(kept_nodes)) + (len(ranges) - len(kept_ranges))
    return ref, {"nodes": kept_nodes, "ranges": kept_ranges, "summary": summary}


def _with_eval(inputs: Inputs, opts: DeployOptions) -> Inputs:
    """Replace the held-out set by labelled ``--eval DIR`` data (``DIR/inputs/`` + ``DIR/labels.npy``).

    Raises:
        BadInputError: missing labels, or a label count that differs from the sample count.
    """
    if opts.heldout_dir is not None:
        if opts.eval_dir is not None:
            raise BadInputError("--heldout and --eval both replace the held-out set: give --eval DIR for labelled "
                                "data or --heldout DIR for unlabelled samples, not both")
        held = _user_calibration(opts.heldout_dir, inputs.reference)
        return dataclasses.replace(inputs, heldout=held,
                                   split=f"held-out samples {opts.heldout_dir} ({len(held)} samples, unlabelled); "
                                         f"calibration: {inputs.split}")
    if opts.eval_dir is None:
        return inputs
    root = Path(opts.eval_dir)
    labels_path = root / "labels.npy"
    if not (root / "inputs").is_dir() or not labels_path.is_file():
        raise BadInputError(f"--eval {root}: expected {root}/inputs/ (samples) and {root}/labels.npy (one label per "
                            f"sample)")
    held = _user_calibration(root / "inputs", inputs.reference)
    try:
        labels = np.load(labels_path, allow_pickle=False)
    except ValueError:
        raise BadInputError(f"--eval {labels_path} holds pickled objects or is not numpy; save integer labels with "
                            f"np.save") from None
    labels = labels.reshape(-1)
    if len(labels) != len(held):
        raise BadInputError(f"--eval: {len(labels)} labels for {len(held)} samples; give one label per sample")
    return dataclasses.replace(inputs, heldout=held, split=f"labelled evaluation data {root} ({len(held)} samples)",
                               labels=labels)


def equalized(inputs: Inputs, opts: DeployOptions) -> Inputs:
    """``inputs`` with the reference cross-layer equalized when ``opts.equalize`` (FP32-exact, so the
    equalized model is the FP32 reference from here on: calibration, plan and verification use it)."""
    if not (opts.equalize or load_recovery(opts.recipe).equalize) or inputs.imported is not None:
        return inputs
    from deployer.equalize import equalize

    model, _ = equalize(inputs.reference)
    return dataclasses.replace(inputs, reference=model, source=f"{inputs.source} (cross-layer equalized)")


def _user_calibration(calib: Any, ref: onnx.ModelProto, up: Upcast | None = None) -> CalibrationSet:
    """The user's samples checked against the model's inputs. Inputs of a float16 source model take
    float16 samples (bfloat16 ones float32: numpy has no bfloat16), up-cast to float32 as they are read."""
    specs = input_specs(ref)
    half = {n for n, d in (up.inputs if up else {}).items() if d == "float16"}
    if half:
        specs = [dataclasses.replace(s, dtype=np.dtype(np.float16)) if s.name in half else s for s in specs]
    if isinstance(calib, (str, Path)):
        cs = load_calibration(calib, specs)
    elif isinstance(calib, CalibrationSet):
        calib.validate(specs)
        cs = calib
    else:
        cs = from_iterable(calib, specs)
    if not half:
        return cs
    src = cs
    return CalibrationSet.lazy(len(src), lambda i: upcast_samples(src[i], {n: "float16" for n in half}),
                               name=src.name)


def _first_sample(folder: Path) -> dict[str, np.ndarray]:
    """The first sample of a calibration folder (``.npz`` keyed by input name, ``.npy`` of a single input,
    or ``<input>/*.npy`` subfolders): its shapes fix the export of a ``torch.nn.Module``.

    Raises:
        BadInputError: not a folder, or no ``.npy``/``.npz`` file in it.
    """
    from calibration.dataset import _load_array_file

    if not folder.is_dir():
        raise BadInputError(f"--calib {folder} is not a folder; give a folder of .npy/.npz samples")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
    if files:
        arrays = _load_array_file(files[0])
        return {("input" if k == "" else k): np.asarray(v) for k, v in arrays.items()}
    subs = sorted(d for d in folder.iterdir() if d.is_dir())
    sample = {}
    for d in subs:
        npy = sorted(d.glob("*.npy"))
        if npy:
            sample[d.name] = np.asarray(_load_array_file(npy[0])[""])
    if not sample:
        raise BadInputError(f"--calib {folder} holds no .npy/.npz samples; see README 'Calibration folder'")
    return sample


def _looks_like_classifier(model: onnx.ModelProto) -> bool:
    """One rank-2 ``[N, C]`` output with C >= 2: class scores. Several outputs (a detector's scores and
    boxes, a recurrent model's state) are judged output by output (:mod:`deployer.judge`)."""
    if len(model.graph.output) != 1:
        return False
    out = model.graph.output[0].type.tensor_type
    dims = [d.dim_value for d in out.shape.dim]
    return len(dims) == 2 and dims[1] > 1


def compute_statistics(inputs: Inputs, options: DeployOptions, progress: Progress = _noop) -> Statistics:
    """Run the FP32 reference over the calibration set once (streaming observers), or reuse the cache.

    Attention-mask paths (:func:`deployer.patterns.mask_paths`) are not observed.
    """
    from deployer.distributed import collector
    from deployer.patterns import mask_paths

    stats, hit = cached_statistics(inputs.reference, inputs.calibration, model_sha256(inputs.reference),
                                   use_cache=not options.no_cache, ema_momentum=options.ema_momentum,
                                   skip=mask_paths(inputs.reference) or None,
                                   progress=lambda d, t: progress("calibration", d, t),
                                   collector=collector(options.cluster))
    if hit and options.cluster is not None:
        from deployer.distributed import connect

        connect(options.cluster, announce="0 shards (statistics from the cache)")
    return stats


def make_plan(inputs: Inputs, stats: Statistics, options: DeployOptions) -> QuantPlan:
    """Reduce statistics with the chosen observer and apply the recipe.

    Under a clipping observer (percentile, entropy, mse) the network outputs and pre-softmax logits
    keep their min/max range (:func:`calibration.collect.unclipped_tensors`).

    Raises:
        BadInputError: unknown observer or recipe.
    """
    if options.observer not in OBSERVERS:
        raise BadInputError(f"unknown observer {options.observer!r}; choose one of {', '.join(OBSERVERS)}")
    recipe_name, rules = load_rules(options.recipe)
    rec = load_recovery(options.recipe)
    if rec.observer is not None and options.observer == "minmax":
        options = dataclasses.replace(options, observer=rec.observer)
    nodes = decide(inputs.reference, rules)
    if inputs.upcast.changed:  # float the recipe keeps stays in the source's half precision (FP16) where targets run it
        from deployer.plan import Precision

        nodes = {k: dataclasses.replace(v, precision=Precision.FP16,
                                        reason=f"{v.reason}; {inputs.upcast.source_precision} source model: kept in FP16")
                 if v.precision == Precision.FP32 else v for k, v in nodes.items()}
    from deployer.patterns import MASK_MAGNITUDE, mask_paths

    masks = mask_paths(inputs.reference)
    keep = unclipped_tensors(inputs.reference)  # outputs/logits: min/max under clipping observers
    ranges = {}
    producer = {o: nd.op_type for nd in inputs.reference.graph.node for o in nd.output}
    auto_keep = _auto_keep(inputs.reference, keep) if options.observer == "auto" else {}
    chosen: dict[str, int] = {}
    for name, st in stats.tensors.items():
        if name in masks:
            continue
        observer = options.observer
        if name in keep and observer in HISTOGRAM_OBSERVERS + ("auto",):
            observer = "minmax"
        elif observer == "auto":
            observer, _ = auto_observer(st, producer.get(name), auto_keep.get(name))
        if options.observer == "auto":
            chosen[observer] = chosen.get(observer, 0) + 1
        lo, hi = reduce_range(st, observer)
        if not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) >= MASK_MAGNITUDE:
            continue  # mask-like values (-inf, float min): never quantized (DESIGN.md section 3)
        ranges[name] = TensorRange(lo, hi)
    shared = []
    for node in inputs.reference.graph.node:
        if node.op_type == "Concat":
            group = [t for t in list(node.input) + list(node.output) if t in ranges]
            if len(group) > 1:
                shared.append(group)
    specs = input_specs(inputs.reference)
    plan = QuantPlan(
        model={"sha256": model_sha256(inputs.reference), "source": inputs.source,
               "inputs": [s.to_dict() for s in specs],
               "outputs": [o.name for o in inputs.reference.graph.output],
               "opset": max(i.version for i in inputs.reference.opset_import if i.domain in ("", "ai.onnx")),
               **({"source_precision": inputs.upcast.to_dict()} if inputs.upcast.changed else {})},
        calibration={"sha256": inputs.calibration.sha256(), "num_samples": len(inputs.calibration),
                     **({"input_shapes": stats.input_shapes} if _has_symbolic_dims(inputs.reference) else {}),
                     "name": inputs.calibration.name, "observer": options.observer,
                     "observer_params": {"ema_momentum": options.ema_momentum} if options.observer == "ema"
                     else {"chosen": dict(sorted(chosen.items()))} if chosen else {}},
        recipe={"name": recipe_name, "rules": [r.to_dict() for r in rules]},
        nodes=nodes, ranges=ranges, shared_scales=shared, provenance=provenance(),
    )
    recovery: list[str] = []
    alpha = None if options.no_smoothquant else (options.smoothquant if options.smoothquant is not None
                                                 else rec.smoothquant)
    if alpha is not None:
        # bias correction below is computed for the unsmoothed weights: exact for targets that do
        # not apply smoothing (per-tensor MatMul weights), an approximation for the smoothed MatMuls
        plan = _with_smoothing(plan, inputs, stats, alpha)
    budget = options.adaround if options.adaround is not None else rec.adaround
    if options.adaround_iters is not None:  # an iteration budget: reproducible bits (no clock)
        budget = math.inf
    if budget is not None:
        plan = _with_rounding(plan, inputs, budget, options.adaround_iters, options.cluster)
    if options.bias_correction and rec.bias_correction:
        from deployer.recovery import compute_bias_correction

        means = {n: m for n, st in stats.tensors.items() if (m := st.channel_mean()) is not None}
        plan = plan.with_bias_correction(compute_bias_correction(inputs.reference, plan, means))
        recovery.append("bias_correction")
    if alpha is not None:
        recovery.append(f"smoothquant(alpha={alpha})")
    if budget is not None and plan.rounding:
        recovery.append("adaround")
    if options.equalize or rec.equalize:
        recovery.insert(0, "cross_layer_equalization")
    if recovery:
        plan = plan.with_nodes(plan.nodes, {**plan.recipe, "recovery": recovery})
    return plan


def _has_symbolic_dims(model: onnx.ModelProto) -> bool:
    return any(any(s is None for s in spec.shape) for spec in input_specs(model))


def _auto_keep(model: onnx.ModelProto, unclipped: set[str]) -> dict[str, str]:
    """Tensors ``--observer auto`` keeps at min/max because of where they sit (tensor -> reason):
    inputs and outputs of LayerNorm patterns and outputs of residual Adds before them
    (:func:`deployer.patterns.find_patterns`), and the activation input of a weighted layer producing
    an unclipped tensor (network output, logits)."""
    from deployer.patterns import find_patterns

    pats = find_patterns(model)
    by_name = {n.name: n for n in model.graph.node}
    out: dict[str, str] = {}
    for chain in pats.layernorm:
        first, last = by_name.get(chain[0]), by_name.get(chain[-1])
        if first is not None and first.input:
            out[first.input[0]] = "residual stream"
        if last is not None:
            out.update({o: "residual stream" for o in last.output})
    for name in pats.residual_add:
        if name in by_name:
            out.update({o: "residual stream" for o in by_name[name].output})
    from calibration.collect import reshape_chain

    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul", "Conv") and node.input and any(o in unclipped for o in node.output):
            for t in reshape_chain(producer, node.input[0])[0]:  # the input and what it is a reshaped copy of
                out.setdefault(t, "classifier input")
    return out


def preflight(opts: DeployOptions, targets: Sequence[str] | None = None, with_plan: bool = False) -> DeployOptions:
    """Checks that need no model work, so that a bad request never costs calibration (or distillation):
    the recipe and the AdaRound budget, and INT4 recipes on targets that cannot lower them.

    Returns:
        the options with the AdaRound budget normalized.

    Raises:
        BadInputError: the first problem found.
    """
    opts = _checked_recovery(opts)
    _check_values(opts)
    opts = dataclasses.replace(opts, min_fidelity=FidelityFloor.parse(opts.min_fidelity),
                               gates={**load_gates(opts.recipe), **parse_gates(opts.gates, "gates")})
    if opts.heldout_dir is not None and opts.eval_dir is not None:
        raise BadInputError("--heldout and --eval both replace the held-out set: give --eval DIR for labelled "
                            "data or --heldout DIR for unlabelled samples, not both")
    if opts.backend_options.get("cpu") is not None:  # --cpu: a bad value is refused before model work
        from deployer.cpu import parse_cpu

        opts = dataclasses.replace(opts, backend_options={**opts.backend_options,
                                                          "cpu": parse_cpu(opts.backend_options["cpu"])})
    backends = discover()
    if targets is None:
        targets = resolve_targets(opts.targets, backends)
    for t in targets:  # each backend's own option values (SoC name, modes), where it declares a check
        check_options = getattr(backends.get(t), "check_options", None)
        if check_options is not None:
            check_options(dict(opts.backend_options))
    if not with_plan and any(r.weight_bits == 4 for r in load_rules(opts.recipe)[1]):
        no_int4 = [t for t in targets if t in ("tflite", "tensorrt", "ascend")]
        if no_int4:  # the same refusal the backend would give
            raise BadInputError(f"--recipe {opts.recipe} asks for INT4 weights, which target(s) {', '.join(no_int4)} "
                                f"cannot lower; use --target onnxruntime for weight-only INT4, or an int8 recipe")
    return opts


def _check_values(opts: DeployOptions) -> None:
    """Option values checked before any model work (issue 22: ``--fidelity-target 1.5`` was refused only
    after calibration).

    Raises:
        BadInputError: the first value out of its range.
    """
    if opts.fidelity_target is not None and not 0.0 < float(opts.fidelity_target) <= 1.0:
        raise BadInputError(f"--fidelity-target {opts.fidelity_target}: give a fraction of FP32 in (0, 1], e.g. 0.99")
    if opts.search_budget < 1:
        raise BadInputError("--search-budget must be at least 1")
    if opts.observer not in OBSERVERS:
        raise BadInputError(f"unknown observer {opts.observer!r}; choose one of {', '.join(OBSERVERS)}")
    if opts.smoothquant is not None and not 0.0 <= opts.smoothquant <= 1.0:
        raise BadInputError(f"--smoothquant {opts.smoothquant}: alpha must be in [0, 1] (the paper uses 0.5)")
    if opts.calib_samples is not None and opts.calib_samples < 1:
        raise BadInputError(f"--calib-samples {opts.calib_samples}: give a positive number of samples")
    if opts.heldout_samples < 1:
        raise BadInputError(f"--heldout-samples {opts.heldout_samples}: give a positive number of samples")
    if not 0.0 <= opts.ema_momentum < 1.0:
        raise BadInputError(f"--ema-momentum {opts.ema_momentum}: an EMA needs 0 <= momentum < 1")
    if opts.eval_dir is not None and not Path(opts.eval_dir).is_dir():
        raise BadInputError(f"--eval {opts.eval_dir}: no such folder; expected {opts.eval_dir}/inputs/ (samples) and "
                            f"{opts.eval_dir}/labels.npy")


def _check_paths(calibration: Any) -> None:
    """A calibration folder given as a path must resolve to a folder (no symlink loop), before any model work."""
    if isinstance(calibration, (str, Path)):
        from calibration.dataset import check_calibration_folder

        check_calibration_folder(calibration)


def _checked_recovery(opts: DeployOptions) -> DeployOptions:
    """Options with the AdaRound budget validated (:func:`deployer.adaround.check_budget`) before any
    model work, so a bad value never costs a calibration pass."""
    from deployer.adaround import check_budget

    load_recovery(opts.recipe)  # a bad recipe file fails here too
    if opts.adaround_iters is not None and (isinstance(opts.adaround_iters, bool) or not isinstance(
            opts.adaround_iters, int) or opts.adaround_iters < 1):
        raise BadInputError(f"--adaround-iters {opts.adaround_iters!r}: give a whole number of iterations per layer >= 1")
    return dataclasses.replace(opts, adaround=check_budget(opts.adaround))


def _with_rounding(plan: QuantPlan, inputs: Inputs, budget: float, iterations: int | None = None,
                   cluster: str | None = None) -> QuantPlan:
    """Add AdaRound bits (:mod:`deployer.adaround`) learned on the first calibration samples within
    ``budget`` seconds (inf with ``iterations``: ``--adaround-iters``), layers mapped over ``cluster``;
    the recipe records what was rounded (no timings: plans stay reproducible when the budget is not hit)."""
    from deployer.adaround import AdaRoundConfig, compute_rounding, encode_bits

    cfg = AdaRoundConfig(time_budget_s=float(budget))
    if iterations is not None:
        cfg = dataclasses.replace(cfg, iterations=int(iterations))
    res = compute_rounding(inputs.reference, plan, inputs.calibration, cfg, cluster=cluster)
    summary = {k: v for k, v in res.summary.items() if k != "seconds"}
    if not res.bits:
        why = ("the time budget ran out before the first layer" if res.summary["not_reached"] else
               "no INT8 per-channel weight to round" + (f" ({len(res.summary['skipped'])} skipped: "
                                                       f"{sorted(set(res.summary['skipped'].values()))})"
                                                       if res.summary["skipped"] else ""))
        summary["warning"] = f"AdaRound rounded no layer: {why}"
    return dataclasses.replace(plan, rounding={n: encode_bits(b) for n, b in res.bits.items()},
                               recipe={**plan.recipe, "adaround": summary})


def _with_smoothing(plan: QuantPlan, inputs: Inputs, stats: Statistics, alpha: float) -> QuantPlan:
    """Add SmoothQuant factors and the ranges of the smoothed MatMul inputs (symmetric, from the
    per-channel max |x| / s)."""

    from deployer.recovery import compute_smoothing

    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"--smoothquant {alpha}: alpha must be in [0, 1] (the paper uses 0.5)")
    absmax = {n: np.asarray(st.last_axis_absmax) for n, st in stats.tensors.items() if st.last_axis_absmax}
    smoothing = compute_smoothing(inputs.reference, plan, absmax, alpha)
    ranges = dict(plan.ranges)
    for t, s in smoothing.items():
        m = float(np.max(absmax[t] / np.asarray(s)))
        ranges[f"{t}__smoothed"] = TensorRange(-m, m)
    return dataclasses.replace(plan, smoothing=smoothing, ranges=ranges)


def provenance() -> dict[str, Any]:
    """Versions of the tool and the libraries that shape results (no timestamps: plans are reproducible)."""
    from importlib import metadata

    versions = {}
    for pkg in ("onnx", "onnxruntime", "onnxslim", "numpy", "onnx2tf", "ai-edge-quantizer", "ai-edge-litert", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {"deployer": __version__, "python": platform.python_version(), "libraries": versions}


def run_deploy(model: Any = None, calibration: Any = None, out_dir: str | Path = "deploy-out",
               options: DeployOptions | None = None, plan: QuantPlan | str | Path | None = None,
               progress: Progress = _noop, log: Callable[[str], None] = lambda s: None) -> DeployResult:
    """Full pipeline; see :func:`deployer.deploy` for the public signature."""
    opts = options or DeployOptions()
    backends = discover()
    targets = resolve_targets(opts.targets, backends)
    unavailable = {t: backends[t].available()[1] for t in targets if not backends[t].available()[0]}
    if unavailable:
        t, why = next(iter(unavailable.items()))
        raise BackendUnavailableError(f"target {t} cannot run here: {why}")
    loaded_plan = QuantPlan.load(plan) if isinstance(plan, (str, Path)) else plan
    plan_warning = ""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, opts.overwrite, [model, calibration, plan, opts.eval_dir])
    opts = preflight(opts, targets, with_plan=loaded_plan is not None)
    _check_paths(calibration)
    t0 = time.perf_counter()
    inputs = equalized(load_inputs(model, calibration, opts), opts)
    if opts.backend_options.get("input_shapes"):  # refused for every target, before calibration
        from deployer.shapes import check_input_names

        check_input_names(inputs.reference, opts.backend_options["input_shapes"])
    log(f"model: {inputs.source}; {len(inputs.calibration)} calibration / {len(inputs.heldout)} held-out samples")
    refused = precheck_targets(backends, targets, inputs.reference, opts, log,
                               dict(inputs.calibration[0]) if len(inputs.calibration) else None)
    targets = [t for t in targets if t not in refused]
    if loaded_plan is not None:
        from deployer.graph import GraphView

        view = GraphView(inputs.reference)
        validate_against_model(loaded_plan, {n.name: n.op_type for n in inputs.reference.graph.node}, view.tensor_names())
        the_plan = loaded_plan
        stats = None
        if loaded_plan.model.get("sha256") not in (None, model_sha256(inputs.reference)):
            plan_warning = (f"the plan was computed for another model (plan sha256 "
                            f"{str(loaded_plan.model.get('sha256'))[:12]}..., this model {model_sha256(inputs.reference)[:12]}...): "
                            f"its nodes match, but its ranges and bias correction may not fit these weights")
            log(f"warning: {plan_warning}")
        ignored = [flag for flag, on in (("--adaround", opts.adaround is not None),
                                          (f"--observer {opts.observer}", opts.observer != "minmax"),
                                          ("--smoothquant", opts.smoothquant is not None),
                                          ("--no-bias-correction", not opts.bias_correction)) if on]
        if ignored:
            note = (f"{', '.join(ignored)} ignored: a given plan is lowered as it is (its ranges, rounding and "
                    f"recovery were fixed when it was computed); recompute it without --plan to apply them")
            plan_warning = f"{plan_warning}; {note}" if plan_warning else note
            log(f"warning: {note}")
    elif inputs.imported is not None:
        log(f"quantized model: its scales become the plan ({inputs.imported['summary']})")
        the_plan = imported_plan(inputs)
        stats = None
    else:
        stats = compute_statistics(inputs, opts, progress)
        progress("plan (recovery, AdaRound)", 0, 1)  # AdaRound alone may run its budget (up to 600 s)
        the_plan = make_plan(inputs, stats, opts)
        progress("plan (recovery, AdaRound)", 1, 1)
        ada = the_plan.recipe.get("adaround")
        if isinstance(ada, dict) and ada.get("warning"):
            plan_warning = str(ada["warning"])
            log(f"warning: {plan_warning}")
    ref_run = onnx_runner(inputs.reference)
    try:
        ref_out = ref_run(inputs.heldout)
    except Exception as e:  # onnxruntime's errors: the reference cannot run on the held-out data
        raise UnsupportedModelError(f"ONNX Runtime fails to run the FP32 model on the held-out samples: "
                                    f"{' '.join(str(e).split())[:300]}; fix the model or the data") from None
    out_names = [o.name for o in inputs.reference.graph.output]
    results: dict[str, TargetResult] = {}
    from deployer.recovery import prepare_for_lowering

    prepared = prepare_for_lowering(inputs.reference, the_plan)
    with atomic_output(out_dir, opts.overwrite) as tmp:
        the_plan.save(tmp / "plan.json")
        onnx.save(inputs.reference, str(tmp / "model_fp32.onnx"))  # what `deploy verify` checks every artifact against
        if stats is not None:
            stats.save(tmp / "statistics.json")
        shared = Shared()
        floor = FidelityFloor.parse(opts.min_fidelity)
        errors: dict[str, DeployerError] = dict(refused)
        for t, err in refused.items():
            results[t] = failed_target(t, err)
        for t in targets:
            log(f"lowering to {t} ...")
            tplan = target_plan(backends[t], the_plan, inputs.reference, opts.backend_options)
            progress(f"lowering {t}", 0, 1)  # one opaque step: the bar shows its elapsed time
            try:
                results[t] = deliver(backends[t], the_plan, inputs, opts, tmp, ref_out, out_names, floor,
                                     escalate_ok=loaded_plan is None, shared=shared, progress=progress, log=log)
            except DeployerError as e:  # this target cannot deliver; the others still do
                progress(f"lowering {t}", 1, 1)
                errors[t] = e
                shutil.rmtree(tmp / t, ignore_errors=True)
                log(f"{t}: failed (exit {e.exit_code}): {' '.join(str(e).split())[:200]}")
                results[t] = failed_target(t, e)
                continue
            if inputs.upcast.changed:
                results[t].notes.append(inputs.upcast.note())
            if results[t].extra.get("speed_warning"):
                log(f"warning: {t}: {results[t].extra['speed_warning']}")
            progress(f"lowering {t}", 1, 1)
            for name, gate in results[t].extra.get("gates", {}).items():
                if name != FLOOR_GATE:  # reported always; exit 1 only when enforced: the floor always,
                    gate["enforced"] = bool(gate.get("enforced") or opts.enforce_gates)  # a user-set one too
            gate_verdict(results[t])
            fixed = (results[t].extra.get("input_shapes") or {}).get("mode") == "fixed"
            if t in ("tflite", "onnxruntime") and _has_symbolic_dims(inputs.reference) and not fixed:
                seen = the_plan.calibration.get("input_shapes") or {}
                shown = "; ".join(f"{n}: {v}" for n, v in seen.items()) or "none recorded in the plan"
                results[t].notes.append(
                    f"symbolic input dims stay dynamic in the artifact ({t} resizes per input; calibration shapes "
                    f"seen: {shown})"
                    + ("; --input-shapes is not used by this target" if opts.backend_options.get("input_shapes") else ""))
            if the_plan.smoothing and not tplan.smoothing:
                results[t].notes.append(f"the plan's SmoothQuant factors ({len(the_plan.smoothing)} tensors) are not "
                                        f"applied on {t}: its per-tensor MatMul/Gemm weights cannot absorb the "
                                        f"migrated outliers")
            dropped = sorted(set(the_plan.rounding) - set(tplan.rounding))
            if dropped:
                results[t].notes.append(f"AdaRound bits of {len(dropped)} node(s) not applied on {t} (its weights there "
                                        f"are per-tensor or on another grid; round to nearest): {dropped[:5]}")
        few = next((r.fidelity["warning"] for r in results.values() if r.fidelity.get("warning")), None)
        if few:
            log(f"warning: {few}")
        if len(errors) == len(results):  # nothing delivered: the worst error, and no output is written
            raise max(errors.values(), key=lambda e: e.exit_code)
        report = build_report(the_plan, inputs, results, tmp, time.perf_counter() - t0)
        from deployer.parity import parity

        report["parity"] = parity([r[0] for r in ref_out[:64]], shared.kept, out_names[0] if out_names else "")
        if plan_warning:
            report["warnings"] = [plan_warning]
        log("per-layer error and report.html ...")
        report["layers"] = _layers(inputs, the_plan, prepared, shared, progress)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        from deployer.report_html import write_html

        write_html(report, tmp)
    result = DeployResult(out_dir, out_dir / "plan.json", out_dir / "report.json", results, report)
    failing = {t: [g for g in failed_enforced(r.extra.get("gates", {})) if g != FLOOR_GATE]
               for t, r in results.items()}
    failing = {t: g for t, g in failing.items() if g}
    if failing:
        raise GateFailedError(f"release gate(s) failed: {failing}; see {result.report_path} (outputs were written)",
                              result=result)
    return result


def precheck_targets(backends: dict[str, Backend], targets: Sequence[str], model: onnx.ModelProto,
                     opts: DeployOptions, log: Callable[[str], None],
                     sample: dict[str, np.ndarray] | None = None) -> dict[str, DeployerError]:
    """Before any calibration: each target whose backend has ``precheck(model, options)`` (e.g. TFLite's
    conversion check) says whether it can lower this graph. Returns the refusing targets with their error;
    with every target refusing, raises the worst error (nothing is written).

    Raises:
        DeployerError: every requested target refuses the graph.
    """
    refused: dict[str, DeployerError] = {}
    for t in targets:
        check = getattr(backends[t], "precheck", None)
        if check is None:
            continue
        try:
            findings = check(model, dict(opts.backend_options), sample)
        except DeployerError as e:
            refused[t] = e
            continue
        errors = [f for f in findings if f.severity == "error"]
        if errors:
            refused[t] = UnsupportedModelError(f"target {t} cannot lower this graph: {errors[0]}"
                                               + (f" (+{len(errors) - 1} more; `deploy check --target {t}` lists them)"
                                                  if len(errors) > 1 else ""))
    for t, err in refused.items():
        log(f"{t}: refused before calibration: {' '.join(str(err).split())[:200]}")
    if refused and len(refused) == len(targets):
        raise max(refused.values(), key=lambda e: e.exit_code)
    return refused


def imported_plan(inputs: Inputs) -> QuantPlan:
    """The plan of an imported QDQ model: its INT8 nodes, weight schemes and activation scales."""
    assert inputs.imported is not None
    specs = input_specs(inputs.reference)
    return QuantPlan(
        model={"sha256": model_sha256(inputs.reference), "source": inputs.source,
               "inputs": [s.to_dict() for s in specs], "outputs": [o.name for o in inputs.reference.graph.output],
               "opset": max(i.version for i in inputs.reference.opset_import if i.domain in ("", "ai.onnx"))},
        calibration={"sha256": inputs.calibration.sha256(), "num_samples": 0, "name": "imported scales",
                     "observer": "imported", "observer_params": {}},
        recipe={"name": "imported", "rules": [], "imported": inputs.imported["summary"]},
        nodes=inputs.imported["nodes"], ranges=inputs.imported["ranges"], provenance=provenance(),
    )


SENSITIVITY_SAMPLES = 4
"""Held-out samples of the report's one-layer-alone sensitivity pass (when escalation did not compute it)."""
SENSITIVITY_LAYERS = 12
"""Layers that pass measures (the MAC layers with the lowest cumulative SQNR): about one model run each."""


def _layers(inputs: Inputs, plan: QuantPlan, prepared: onnx.ModelProto, shared: Shared | None = None,
            progress: Progress = _noop) -> dict[str, Any]:
    """The report's ``layers``: per-layer SQNR on a few held-out samples (:mod:`deployer.layer_error`),
    plus ``sensitivity``: each MAC layer's own sensitivity, the model-output SQNR (dB) with only that
    layer quantized (AIMET-style; :func:`deployer.escalate.layer_order`, reused from escalation when it
    ran)."""
    from deployer.escalate import layer_order
    from deployer.layer_error import layer_errors

    try:
        progress("per-layer error", 0, 1)
        out = layer_errors(inputs.reference, plan, inputs.heldout, lower_from=prepared)
        progress("per-layer error", 1, 1)
    except DeployerError as e:
        progress("per-layer error", 1, 1)
        return {"method": "not computed", "error": str(e), "samples": 0, "layers": []}
    order = shared.order if shared is not None and shared.order is not None else None
    if order is None:  # the MAC layers with the lowest cumulative SQNR: is the error their own?
        from deployer.mixed import MAC_OPS, only_layers

        worst = [r["node"] for r in out["layers"] if r["op_type"] in MAC_OPS][:SENSITIVITY_LAYERS]
        try:
            order = layer_order(only_layers(plan, worst), inputs.reference,
                                list(inputs.heldout)[:SENSITIVITY_SAMPLES],
                                progress=lambda d, t: progress("layer sensitivity", d, t)) if worst else []
        except DeployerError:
            order = []
    out["sensitivity"] = {r["layer"]: r["sqnr_db"] for r in order if r.get("why") == "sensitivity"}
    out["sensitivity_method"] = ("model-output SQNR (dB, worst output) with only this layer quantized "
                                 "(symmetric INT8 Q/DQ simulation)")
    return out


def build_report(plan: QuantPlan, inputs: Inputs, results: dict[str, TargetResult], out: Path,
                 seconds: float) -> dict[str, Any]:
    """The ``report.json`` dict: targets, plan path, provenance, data split and artifact hashes."""
    hashes = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "report.json":
            hashes[str(p.relative_to(out))] = sha256_file(p)
    return {
        "schema_version": "1.0",
        "plan": "plan.json",
        "model": plan.model,
        "calibration": plan.calibration,
        "recipe": plan.recipe.get("name"),
        "data": {"task": inputs.task, "split": inputs.split, "heldout_samples": len(inputs.heldout)},
        "targets": {k: v.to_dict() for k, v in results.items()},
        "provenance": plan.provenance,
        "sha256": hashes,
        "wall_seconds": round(seconds, 1),
    }


def plan_only(model: Any = None, calibration: Any = None, out: str | Path = "plan.json",
              options: DeployOptions | None = None, progress: Progress = _noop) -> QuantPlan:
    """Compute and write a plan without lowering (``deploy plan``)."""
    opts = options or DeployOptions()
    out = Path(out)
    check_plan_output(out, opts.overwrite)  # refused before any calibration or search
    opts = preflight(opts, [], with_plan=False)
    _check_paths(calibration)
    inputs = equalized(load_inputs(model, calibration, opts), opts)
    stats = compute_statistics(inputs, opts, progress)
    p = make_plan(inputs, stats, opts)
    if opts.fidelity_target is not None:  # no target to score: the generic symmetric Q/DQ simulation
        from deployer.deliver import search_samples
        from deployer.mixed import DEFAULT_SIMULATION_POLICY, Evaluator, relative_metric, search

        samples = search_samples(inputs, 256)
        metric = relative_metric(inputs.task)
        res = search(p, inputs.reference, Evaluator(inputs.reference, samples, DEFAULT_SIMULATION_POLICY, metric),
                     target=float(opts.fidelity_target), budget=opts.search_budget,
                     rank_with=Evaluator(inputs.reference, samples[:32], DEFAULT_SIMULATION_POLICY, metric),
                     progress=lambda d, t: progress("sensitivity", d, t), cluster=opts.cluster)
        p = res.plan.with_nodes(res.plan.nodes, {**res.plan.recipe, "search": {
            "fidelity_target": opts.fidelity_target, "budget": opts.search_budget, "kept": res.kept,
            "target": "generic simulation (deploy plan)"}})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        p.save(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise BadInputError(f"cannot write the plan to {out} ({e.strerror}); choose a writable --out") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return p


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["DeployOptions", "DeployResult", "TargetResult", "run_deploy", "plan_only", "load_inputs", "make_plan",
           "DeployerError", "atomic_output", "check_output_dir", "write_manifest"]
