"""The deploy pipeline: model -> FP32 reference -> shared calibration -> plan -> lowering -> verify -> report.

Data flows left to right once: statistics are computed once per command and reused for every target.
All outputs are written into a temporary directory beside ``out_dir`` and renamed at the end, so an
error or an interrupt never leaves a half-written output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Backend, LoweringContext, discover, onnx_runner, resolve_targets
from calibration.adapters import load_calibration
from calibration.cache import cached_statistics
from calibration.dataset import CalibrationSet, from_iterable, sha256_file
from calibration.observers import DEFAULT_EMA_MOMENTUM, OBSERVERS, Statistics, reduce_range
from deployer import __version__
from deployer.errors import BackendUnavailableError, BadInputError, DeployerError
from deployer.examples import DEFAULT_EXAMPLE, EXAMPLES, get_example
from deployer.model_io import canonicalize, export_torch, input_specs, load_onnx, model_sha256
from deployer.plan import QuantPlan, TensorRange, validate_against_model
from deployer.recipe import decide, load_rules
from deployer.verify import fidelity

DEFAULT_CALIB_SAMPLES = 256
DEFAULT_HELDOUT_SAMPLES = 300


@dataclass
class DeployOptions:
    """Options shared by the CLI and the Python API (names match the CLI flags).

    Attributes:
        targets: backend names (``["tflite", "tensorrt", "ascend"]``) or ``"all"``.
        observer: ``minmax``, ``ema`` (the seed's EMA of per-batch min/max), ``percentile``,
            ``entropy`` or ``mse`` (see :mod:`calibration.observers`).
        recipe: preset name (``int8``, ``mixed``, ``fp16``) or a rules file.
        calib_samples: number of calibration samples (built-in examples draw that many crops).
        heldout_samples: number of held-out samples (built-in examples).
        seed: fixed seed of the example split.
        bias_correction: add empirical bias correction (Nagel et al. 2019) to the plan.
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


@dataclass
class Inputs:
    """The FP32 reference and the data of one command."""

    reference: onnx.ModelProto
    calibration: CalibrationSet
    heldout: CalibrationSet
    task: str
    source: str
    split: str


@dataclass
class TargetResult:
    """One target's outcome (the ``targets.<name>`` entry of ``report.json``)."""

    target: str
    artifact: str
    size_bytes: dict[str, int | None]
    fidelity: dict[str, Any]
    verified_by: str
    notes: list[str]
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "artifact": self.artifact, "size_bytes": self.size_bytes,
                "fidelity": self.fidelity, "verified_by": self.verified_by, "notes": self.notes, **self.extra}


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
        model: None (the default example), an example name, a path to a ``.onnx`` file, an
            ``onnx.ModelProto`` or a ``torch.nn.Module`` (exported at opset 17 with the shapes of the
            first calibration sample).
        calib: None (the example's set), a folder of ``.npy``/``.npz`` files, or an iterable of samples.

    Raises:
        BadInputError: unknown example, unreadable model, calibration that does not match the model.
    """
    opts = options or DeployOptions()
    if opts.calib_samples is not None and opts.calib_samples < 1:
        raise BadInputError(f"--calib-samples {opts.calib_samples}: give a positive number of samples")
    if opts.heldout_samples < 1:
        raise BadInputError(f"--heldout-samples {opts.heldout_samples}: give a positive number of samples")
    if not 0.0 <= opts.ema_momentum < 1.0:
        raise BadInputError(f"--ema-momentum {opts.ema_momentum}: an EMA needs 0 <= momentum < 1")
    if model is None or (isinstance(model, str) and model in EXAMPLES):
        name = model or DEFAULT_EXAMPLE
        ex = get_example(name)
        n_cal = DEFAULT_CALIB_SAMPLES if opts.calib_samples is None else opts.calib_samples
        data = ex.build(n_cal, opts.heldout_samples, opts.seed)
        ref = canonicalize(data.model)
        cal = data.calibration
        if calib is not None:
            cal = _user_calibration(calib, ref)
        return Inputs(ref, cal, data.heldout, data.task, f"example:{name}", data.split)
    if isinstance(model, (str, Path)):
        p = Path(model)
        if p.suffix.lower() != ".onnx" and not p.exists():
            raise BadInputError(f"model {model!r} is neither a built-in example ({', '.join(EXAMPLES)}) nor an existing file")
        ref = canonicalize(load_onnx(p))
        source = str(p)
    elif isinstance(model, onnx.ModelProto):
        ref = canonicalize(model)
        source = "onnx.ModelProto"
    elif hasattr(model, "forward") and hasattr(model, "eval"):
        if calib is None:
            raise BadInputError("a torch.nn.Module needs calibration samples (their shapes fix the export)")
        first = next(iter(calib))
        example = first if isinstance(first, dict) else {"input": first}
        example = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in example.items()}
        ref = canonicalize(export_torch(model, example))
        source = f"torch:{type(model).__name__}"
    else:
        raise BadInputError(f"model of type {type(model).__name__} is not supported; give a .onnx path, an example "
                            f"name or a torch.nn.Module")
    if calib is None:
        raise BadInputError("a user model needs calibration data; pass --calib DIR (.npy/.npz samples keyed by input name)")
    specs = input_specs(ref)
    dynamic = [s.name for s in specs if any(d is None for d in s.shape)]
    if dynamic:
        raise BadInputError(f"model input(s) {dynamic} have dynamic dimensions; export with static shapes")
    cal = _user_calibration(calib, ref)
    n = len(cal)
    if n >= 5:
        k = max(1, n // 5)
        cal, held = cal.split(n - k)
        split = f"user calibration set: first {n - k} samples calibrate, last {k} are held out"
    else:
        held = cal
        split = f"user calibration set of {n} samples: too few to hold out, verification reuses them"
    if opts.calib_samples is not None:
        cal = CalibrationSet(list(cal)[: opts.calib_samples], cal.name)
    task = "classification" if _looks_like_classifier(ref) else "generic"
    return Inputs(ref, cal, held, task, source, split)


def _user_calibration(calib: Any, ref: onnx.ModelProto) -> CalibrationSet:
    specs = input_specs(ref)
    if isinstance(calib, (str, Path)):
        return load_calibration(calib, specs)
    if isinstance(calib, CalibrationSet):
        calib.validate(specs)
        return calib
    return from_iterable(calib, specs)


def _looks_like_classifier(model: onnx.ModelProto) -> bool:
    out = model.graph.output[0].type.tensor_type
    dims = [d.dim_value for d in out.shape.dim]
    return len(dims) == 2 and dims[1] > 1


def compute_statistics(inputs: Inputs, options: DeployOptions, progress: Progress = _noop) -> Statistics:
    """Run the FP32 reference over the calibration set once (streaming observers), or reuse the cache."""
    stats, _ = cached_statistics(inputs.reference, inputs.calibration, model_sha256(inputs.reference),
                                 use_cache=not options.no_cache, ema_momentum=options.ema_momentum,
                                 progress=lambda d, t: progress("calibration", d, t))
    return stats


def make_plan(inputs: Inputs, stats: Statistics, options: DeployOptions) -> QuantPlan:
    """Reduce statistics with the chosen observer and apply the recipe.

    Raises:
        BadInputError: unknown observer or recipe.
    """
    if options.observer not in OBSERVERS:
        raise BadInputError(f"unknown observer {options.observer!r}; choose one of {', '.join(OBSERVERS)}")
    recipe_name, rules = load_rules(options.recipe)
    nodes = decide(inputs.reference, rules)
    ranges = {}
    for name, st in stats.tensors.items():
        lo, hi = reduce_range(st, options.observer)
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
               "opset": max(i.version for i in inputs.reference.opset_import if i.domain in ("", "ai.onnx"))},
        calibration={"sha256": inputs.calibration.sha256(), "num_samples": len(inputs.calibration),
                     "name": inputs.calibration.name, "observer": options.observer,
                     "observer_params": {"ema_momentum": options.ema_momentum} if options.observer == "ema" else {}},
        recipe={"name": recipe_name, "rules": [r.to_dict() for r in rules]},
        nodes=nodes, ranges=ranges, shared_scales=shared, provenance=provenance(),
    )
    if options.bias_correction:
        from deployer.recovery import compute_bias_correction

        means = {n: m for n, st in stats.tensors.items() if (m := st.channel_mean()) is not None}
        plan = plan.with_bias_correction(compute_bias_correction(inputs.reference, plan, means))
        plan = plan.with_nodes(plan.nodes, {**plan.recipe, "recovery": ["bias_correction"]})
    return plan


def provenance() -> dict[str, Any]:
    """Versions of the tool and the libraries that shape results (no timestamps: plans are reproducible)."""
    from importlib import metadata

    versions = {}
    for pkg in ("onnx", "onnxruntime", "onnxslim", "numpy", "tensorflow-cpu", "ai-edge-litert", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {"deployer": __version__, "python": platform.python_version(), "libraries": versions}


@contextmanager
def atomic_output(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    On any exception, SIGINT or SIGTERM the temporary directory is removed and ``out_dir`` is untouched.

    Raises:
        BadInputError: ``out_dir`` exists (without ``overwrite``) or its parent is not writable.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BadInputError(f"output directory {out_dir} exists; pass --overwrite or choose another --out")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise BadInputError(f"cannot write to {parent} ({e.strerror}); choose a writable --out") from None
    tmp.chmod(0o755)  # mkdtemp creates 0700; the output is meant to be shared
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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
    out_dir = Path(out_dir)
    if out_dir.exists() and not opts.overwrite:
        raise BadInputError(f"output directory {out_dir} exists; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    inputs = load_inputs(model, calibration, opts)
    log(f"model: {inputs.source}; {len(inputs.calibration)} calibration / {len(inputs.heldout)} held-out samples")
    if loaded_plan is not None:
        from deployer.graph import GraphView

        view = GraphView(inputs.reference)
        validate_against_model(loaded_plan, {n.name: n.op_type for n in inputs.reference.graph.node}, view.tensor_names())
        the_plan = loaded_plan
        stats = None
    else:
        stats = compute_statistics(inputs, opts, progress)
        the_plan = make_plan(inputs, stats, opts)
    ref_run = onnx_runner(inputs.reference)
    ref_out = ref_run(inputs.heldout)
    out_names = [o.name for o in inputs.reference.graph.output]
    results: dict[str, TargetResult] = {}
    from deployer.recovery import apply_bias_correction

    prepared = apply_bias_correction(inputs.reference, the_plan.bias_correction)
    with atomic_output(out_dir, opts.overwrite) as tmp:
        the_plan.save(tmp / "plan.json")
        if stats is not None:
            stats.save(tmp / "statistics.json")
        for t in targets:
            log(f"lowering to {t} ...")
            ctx = LoweringContext(prepared, the_plan, tmp, inputs.calibration, dict(opts.backend_options),
                                  fp32_reference=inputs.reference)
            results[t] = _lower_and_verify(backends[t], ctx, ref_out, out_names, inputs, tmp, progress)
        report = build_report(the_plan, inputs, results, tmp, time.perf_counter() - t0)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return DeployResult(out_dir, out_dir / "plan.json", out_dir / "report.json", results, report)


def _lower_and_verify(backend: Backend, ctx: LoweringContext, ref_out: list[list[np.ndarray]], out_names: list[str],
                      inputs: Inputs, tmp: Path, progress: Progress) -> TargetResult:
    art = backend.lower(ctx)
    fid: dict[str, Any] = {}
    if art.run is not None:
        fid = fidelity(ref_out, art.run(inputs.heldout), out_names, inputs.task)
    fp32_size = art.fp32_path.stat().st_size if art.fp32_path and art.fp32_path.exists() else None
    size = {"fp32": fp32_size, "artifact": art.path.stat().st_size}
    if fp32_size:
        size["ratio"] = round(size["artifact"] / fp32_size, 4)  # type: ignore[operator]
    return TargetResult(backend.name, str(art.path.relative_to(tmp)), size, fid, art.verified_by, art.notes,
                        {k: v for k, v in art.extra.items()})


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
    inputs = load_inputs(model, calibration, opts)
    stats = compute_statistics(inputs, opts, progress)
    p = make_plan(inputs, stats, opts)
    out = Path(out)
    if out.exists() and not opts.overwrite:
        raise BadInputError(f"{out} exists; pass --overwrite or choose another path")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        p.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["DeployOptions", "DeployResult", "TargetResult", "run_deploy", "plan_only", "load_inputs", "make_plan",
           "DeployerError"]
