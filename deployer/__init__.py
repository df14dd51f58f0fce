"""deployer: one backend-neutral quantization plan, lowered to TFLite, TensorRT and Ascend.

Python API for release pipelines::

    import deployer
    result = deployer.deploy("model.onnx", "calib/", targets=["tflite", "tensorrt"], out_dir="out")
    result.targets["tflite"].fidelity["top1_agreement"]

Every user-facing error is a :class:`DeployerError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

__version__ = "0.1.0"

from deployer.errors import DeployerError  # noqa: E402
from deployer.results import Fidelity, GateResult, OutputRecord, SpeedRecord, TargetName, Verdict  # noqa: E402

if TYPE_CHECKING:  # the pipeline imports onnx and the backends: loaded only when deploy() runs
    from deployer.pipeline import DeployResult


BACKEND_OPTIONS = ("soc_version", "tflite_io", "tflite_layout", "tflite_mode", "tflite_per_tensor", "strict",
                   "input_shapes", "cpu", "ort_mode", "trt_version_compatible", "trt_hardware_compatibility")
"""Every backend option the CLI offers is a keyword of :func:`deploy` too (same names as the flags)."""


def deploy(model: Any = None, calibration: Any = None,
           targets: Literal["all"] | TargetName | str | Sequence[TargetName] = "all", recipe: str = "int8",
           out_dir: str | Path = "deploy-out", observer: str = "minmax", plan: Any = None,
           overwrite: bool = False, calib_samples: int | None = None, heldout_samples: int = 300, seed: int = 0,
           ema_momentum: float = 0.9, no_cache: bool = False, bias_correction: bool = True,
           fidelity_target: float | None = None, search_budget: int = 24, enforce_gates: bool = False,
           eval_dir: str | Path | None = None, metric: Any = None, smoothquant: float | None = None,
           equalize: bool = False, no_smoothquant: bool = False, adaround: float | None = None,
           min_fidelity: Any = None, heldout: str | Path | None = None, gates: Mapping[str, float] | None = None,
           cluster: str | None = None, adaround_iters: int | None = None,
           progress: Callable[[str, int, int], None] | None = None, **backend_options: Any) -> "DeployResult":
    """Quantize ``model`` once and lower it to each target; verify each artifact against FP32.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto``, ``torch.nn.Module``, built-in example name or None
            (the default example, EfficientNet-Lite0).
        calibration: folder of ``.npy``/``.npz`` samples, or an iterable of ``dict[input_name, ndarray]``.
        targets: ``"all"``, ``"tflite,tensorrt"`` or a list of names (:data:`deployer.results.TargetName`
            for the built-in ones; a plugin's name through ``typing.cast``). Checked against the
            installed backends before any work: an unknown name raises ``BadInputError`` with "did you
            mean".
        recipe: ``int8``, ``mixed``, ``fp16`` or a rules file.
        out_dir: output directory (must not exist unless ``overwrite``).
        observer: ``minmax``, ``ema``, ``percentile``, ``entropy``, ``mse`` or ``auto`` (one per tensor,
            :func:`calibration.observers.auto_observer`).
        plan: an existing plan (path or :class:`deployer.plan.QuantPlan`) to lower instead of calibrating.
        calib_samples / heldout_samples / seed / ema_momentum / no_cache: as the CLI flags.
        bias_correction: add empirical bias correction to the plan (default on).
        fidelity_target / search_budget: mixed-precision search (see :mod:`deployer.mixed`).
        enforce_gates: raise :class:`deployer.errors.GateFailedError` when a seed release gate
            (``speed-per-fidelity``, ``size-vs-recall``) fails.
        gates: gate thresholds ``{name: value}`` (:mod:`deployer.gates`: ``top1_agreement``,
            ``cosine_mean``, ``sqnr_db``, ``task_accuracy_relative`` ... pass when metric >= value;
            ``speed-per-fidelity``: ratio; ``size-vs-recall``: max relative loss). Each one given is enforced:
            a failure raises :class:`deployer.errors.GateFailedError` after the outputs are written
            (``e.result``). An unknown name raises ``BadInputError`` before any work.
        eval_dir: labelled evaluation data (``DIR/inputs/`` + ``DIR/labels.npy``).
        metric: callable ``outputs -> {name: value}`` on the held-out outputs (your task metric).
        smoothquant: SmoothQuant alpha for transformer MatMuls (Xiao et al. 2023); None = the recipe's
            choice (``mixed``: 0.8). ``no_smoothquant``: none even where the recipe asks for it.
        equalize: cross-layer equalization before calibration (Nagel et al. 2019); off by default.
        adaround: learned weight rounding (Nagel et al. 2020) with this time budget in seconds; None = off.
        adaround_iters: AdaRound with this many iterations per layer instead of a time budget
            (reproducible bits; ``--adaround-iters``).
        cluster: None (this process), ``"local"`` (start Ray here) or a Ray cluster address: calibration
            shards, sensitivity passes and AdaRound layers run as Ray tasks (:mod:`deployer.distributed`;
            same plan as without; needs the ``ray`` extra).
        progress: called as ``progress(step, done, total)`` during long steps (calibration, sensitivity);
            messages go to the ``logging`` logger ``"deployer"`` (INFO).
        heldout: unlabelled held-out samples (folder like ``calibration``) to verify on; not with ``eval_dir``.
        min_fidelity: the fidelity floor (:class:`deployer.judge.FidelityFloor`, ``"cosine=0.99,sqnr_db=20"``, a
            dict or a number = cosine; None = those defaults). A target below it after escalation has
            ``result.targets[name].extra["verdict"]["ships"] == False`` (the CLI exits 1).
        backend_options: ``soc_version``, ``tflite_io``, ``tflite_layout``, ``input_shapes`` (the CLI's
            ``--input-shapes`` grammar as a string or list, or ``{name: "1x3x224x224"}``), ``cpu`` (the
            onnxruntime target's deployment CPU, as ``--cpu``: ``auto``, ``avx2``, ``avx512``,
            ``avx512-vnni``, ``avx-vnni``, ``amx``, ``arm64``; :mod:`deployer.cpu`); others are refused.

    Returns:
        :class:`deployer.pipeline.DeployResult`.

    Raises:
        DeployerError: bad input (``BadInputError``), unavailable backend (``BackendUnavailableError``).
    """
    from deployer.errors import BadInputError
    from deployer.gates import parse_gates
    from deployer.pipeline import DeployOptions, run_deploy
    from deployer.shapes import ShapeRange

    gate_thresholds = parse_gates(gates, "gates")
    from backends.base import discover, resolve_targets

    resolve_targets(targets, discover())  # an unknown target fails here, before any work

    unknown = sorted(set(backend_options) - set(BACKEND_OPTIONS))
    if unknown:
        raise BadInputError(f"deploy(): unknown option(s) {unknown}; backend options are {list(BACKEND_OPTIONS)}")
    if "cpu" in backend_options:  # checked before any model work
        from deployer.cpu import parse_cpu

        backend_options["cpu"] = parse_cpu(backend_options["cpu"])
    shapes = backend_options.get("input_shapes")
    if isinstance(shapes, dict) and not all(isinstance(v, ShapeRange) for v in shapes.values()):
        shapes = [f"{k}:{v if isinstance(v, str) else 'x'.join(str(d) for d in v)}" for k, v in shapes.items()
                  if isinstance(v, (str, list, tuple)) or _bad_shape(k, v)]
    if isinstance(shapes, (str, list, tuple)):
        from deployer.shapes import parse_input_shapes

        backend_options["input_shapes"] = parse_input_shapes(shapes)
    elif shapes is not None and not isinstance(shapes, dict):
        _bad_shape("input_shapes", shapes)
    opts = DeployOptions(targets=targets, observer=observer, recipe=recipe, overwrite=overwrite,
                         calib_samples=calib_samples, heldout_samples=heldout_samples, seed=seed,
                         ema_momentum=ema_momentum, no_cache=no_cache, bias_correction=bias_correction,
                         fidelity_target=fidelity_target, search_budget=search_budget,
                         enforce_gates=enforce_gates, eval_dir=eval_dir, metric=metric, smoothquant=smoothquant,
                         equalize=equalize, no_smoothquant=no_smoothquant, adaround=adaround,
                         min_fidelity=min_fidelity, heldout_dir=heldout, backend_options=backend_options,
                         gates=gate_thresholds, cluster=cluster, adaround_iters=adaround_iters)
    import logging

    logger = logging.getLogger("deployer")
    return run_deploy(model, calibration, out_dir, opts, plan, progress=progress or (lambda _s, _d, _t: None),
                      log=logger.info)


def _bad_shape(name: str, value: Any) -> bool:
    from deployer.errors import BadInputError

    raise BadInputError(f"deploy(): input_shapes {name!r}: {value!r} is not a shape; give \"1x3x224x224\", "
                        f"\"MIN/OPT/MAX\" or a tuple of ints per input name")


def verify_artifact(artifact: str | Path, data: str | Path, reference: str | Path | None = None,
                    out_dir: str | Path = "verify-out", overwrite: bool = False) -> "DeployResult":
    """Re-verify an existing ``.onnx``/``.tflite`` artifact against the FP32 reference on ``data``
    (``deploy verify``); writes ``report.json`` and ``report.html`` to ``out_dir``.

    Raises:
        DeployerError: bad input (``BadInputError``), a runtime that cannot run here (``BackendUnavailableError``).
    """
    from deployer.reverify import VerifyOptions
    from deployer.reverify import verify_artifact as _verify

    return _verify(artifact, data, reference, out_dir, VerifyOptions(overwrite=overwrite))


__all__ = ["deploy", "verify_artifact", "DeployerError", "__version__", "TargetName", "Fidelity", "OutputRecord",
           "GateResult", "SpeedRecord", "Verdict"]
