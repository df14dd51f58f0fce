"""deployer: one backend-neutral quantization plan, lowered to TFLite, TensorRT and Ascend.

Python API for release pipelines::

    import deployer
    result = deployer.deploy("model.onnx", "calib/", targets=["tflite", "tensorrt"], out_dir="out")
    result.targets["tflite"].fidelity["top1_agreement"]

Every user-facing error is a :class:`DeployerError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

from deployer.errors import DeployerError  # noqa: E402


BACKEND_OPTIONS = ("soc_version", "tflite_io", "tflite_layout", "input_shapes")


def deploy(model: Any = None, calibration: Any = None, targets: Any = "all", recipe: str = "int8",
           out_dir: str | Path = "deploy-out", observer: str = "minmax", plan: Any = None,
           overwrite: bool = False, calib_samples: int | None = None, heldout_samples: int = 300, seed: int = 0,
           ema_momentum: float = 0.9, no_cache: bool = False, bias_correction: bool = True,
           **backend_options: Any) -> Any:
    """Quantize ``model`` once and lower it to each target; verify each artifact against FP32.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto``, ``torch.nn.Module``, built-in example name or None
            (the default example, EfficientNet-Lite0).
        calibration: folder of ``.npy``/``.npz`` samples, or an iterable of ``dict[input_name, ndarray]``.
        targets: ``"all"``, ``"tflite,tensorrt"`` or a list of names.
        recipe: ``int8``, ``mixed``, ``fp16`` or a rules file.
        out_dir: output directory (must not exist unless ``overwrite``).
        observer: ``minmax`` or ``ema``.
        plan: an existing plan (path or :class:`deployer.plan.QuantPlan`) to lower instead of calibrating.
        calib_samples / heldout_samples / seed / ema_momentum / no_cache: as the CLI flags.
        bias_correction: add empirical bias correction to the plan (default on).
        backend_options: ``soc_version``, ``tflite_io``, ``tflite_layout`` (others are refused).

    Returns:
        :class:`deployer.pipeline.DeployResult`.

    Raises:
        DeployerError: bad input (``BadInputError``), unavailable backend (``BackendUnavailableError``).
    """
    from deployer.errors import BadInputError
    from deployer.pipeline import DeployOptions, run_deploy

    unknown = sorted(set(backend_options) - set(BACKEND_OPTIONS))
    if unknown:
        raise BadInputError(f"deploy(): unknown option(s) {unknown}; backend options are {list(BACKEND_OPTIONS)}")
    opts = DeployOptions(targets=targets, observer=observer, recipe=recipe, overwrite=overwrite,
                         calib_samples=calib_samples, heldout_samples=heldout_samples, seed=seed,
                         ema_momentum=ema_momentum, no_cache=no_cache, bias_correction=bias_correction,
                         backend_options=backend_options)
    return run_deploy(model, calibration, out_dir, opts, plan)


__all__ = ["deploy", "DeployerError", "__version__"]
