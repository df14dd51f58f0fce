"""``deploy verify ARTIFACT --data DIR [--reference M.onnx]``: re-verify an existing artifact against FP32.

For example last release's ``.tflite`` or QDQ ``.onnx``, on new data. The output directory gets the same
``report.json`` / ``report.html`` as a deploy: the artifact's fidelity against the FP32 reference on every
sample of ``--data``, its size, provenance, and (for ONNX artifacts) the per-layer error.

How an artifact is executed follows its file format, not a backend name: ``.onnx`` runs in ONNX Runtime
with graph optimizations off (exact Q/DQ arithmetic, as TensorRT and Ascend compute); ``.tflite`` runs in
the LiteRT interpreter. Compiled vendor formats (``.engine``, ``.om``) cannot run here (exit 3).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import onnx

from backends.base import Runner, onnx_runner
from calibration.adapters import load_calibration
from calibration.dataset import sha256_file
from deployer.errors import BackendUnavailableError, BadInputError, DeployerError
from deployer.model_io import input_specs, load_onnx, model_sha256
from deployer.output_dir import check_output_dir
from deployer.pipeline import DeployResult, TargetResult, atomic_output, provenance
from deployer.plan import QuantPlan
from deployer.results import Fidelity
from deployer.verify import fidelity

COMPILED_FORMATS = {".engine": "a TensorRT engine (needs TensorRT and an NVIDIA GPU)",
                    ".plan": "a TensorRT engine (needs TensorRT and an NVIDIA GPU)",
                    ".om": "an Ascend offline model (needs an Ascend NPU and CANN)"}


@dataclass(frozen=True)
class VerifyOptions:
    """Options of ``deploy verify``.

    Attributes:
        target: the name the report uses for the artifact (default: its folder name, e.g. ``tflite``).
        layout: ``nhwc`` or ``nchw``, the input layout of a ``.tflite`` (as ``--tflite-layout``).
        overwrite: replace an existing output directory.
    """

    target: str | None = None
    layout: str = "nhwc"
    overwrite: bool = False


def find_reference(artifact: Path) -> Path | None:
    """``model_fp32.onnx`` beside the artifact, at the root of the deploy output holding it (every deploy
    output keeps the FP32 reference there), or in a sibling target folder (outputs of older versions)."""
    for cand in [artifact.parent / "model_fp32.onnx", artifact.parent.parent / "model_fp32.onnx",
                 *sorted(artifact.parent.parent.glob("*/model_fp32.onnx"))]:
        if cand.is_file():
            return cand
    return None


def find_plan(artifact: Path) -> Path | None:
    for cand in (artifact.parent / "plan.json", artifact.parent.parent / "plan.json"):
        if cand.is_file():
            return cand
    return None


def _runner(artifact: Path, reference: onnx.ModelProto, opts: VerifyOptions) -> tuple[Runner, str]:
    suffix = artifact.suffix.lower()
    if suffix == ".onnx":
        import onnxruntime

        return (onnx_runner(artifact, optimize=False),
                f"ONNX Runtime {onnxruntime.__version__} (CPU, graph optimizations off: exact Q/DQ arithmetic)")
    if suffix == ".tflite":
        try:
            import ai_edge_litert  # noqa: F401
        except ImportError:
            raise BackendUnavailableError("a .tflite needs the LiteRT interpreter: pip install -e '.[tflite]'") from None
        from backends.tflite.backend import tflite_runner

        from importlib import metadata

        return tflite_runner(artifact, reference, opts.layout), f"LiteRT interpreter {metadata.version('ai-edge-litert')}"
    if suffix in COMPILED_FORMATS:
        raise BackendUnavailableError(f"{artifact} is {COMPILED_FORMATS[suffix]}; it cannot run here. Re-verify the "
                                      f"ONNX graph it was compiled from instead")
    raise BadInputError(f"{artifact}: unknown artifact format {suffix!r}; give a .onnx or .tflite file")


def verify_artifact(artifact: str | Path, data: str | Path, reference: str | Path | None = None,
                    out_dir: str | Path = "verify-out", options: VerifyOptions | None = None,
                    log: Any = lambda s: None) -> DeployResult:
    """Run ``artifact`` and the FP32 ``reference`` on every sample of ``data``; write report.json/html.

    Args:
        artifact: a ``.onnx`` (QDQ / strongly typed) or ``.tflite`` file.
        data: a calibration-format folder (``.npy``/``.npz`` samples keyed by the reference's inputs).
        reference: the FP32 ONNX model; default ``model_fp32.onnx`` beside the artifact (deploy output).
        out_dir: output directory for ``report.json`` and ``report.html`` (must not exist unless overwrite).

    Raises:
        BadInputError: missing files, data that does not match the reference, unknown format.
        BackendUnavailableError: the artifact's runtime is not installed or cannot run here.
    """
    opts = options or VerifyOptions()
    art = Path(artifact)
    if not art.is_file():
        raise BadInputError(f"artifact {art} does not exist; give the .onnx or .tflite file to re-verify")
    ref_path = Path(reference) if reference is not None else find_reference(art)
    if ref_path is None:
        raise BadInputError(f"no FP32 reference found beside {art}; pass --reference model_fp32.onnx")
    check_output_dir(Path(out_dir), opts.overwrite, [art, data, ref_path])  # before any model work
    t0 = time.perf_counter()
    ref = load_onnx(ref_path)
    specs = input_specs(ref)
    samples = load_calibration(data, specs)
    if len(samples) == 0:
        raise BadInputError(f"--data {data}: no samples found")
    try:
        run, verified_by = _runner(art, ref, opts)
    except DeployerError:
        raise
    except Exception as e:  # a runtime refusing to load the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadInputError(f"{art} cannot be loaded for verification ({type(e).__name__}: {first}); an Ascend deploy "
                            f"form (AscendQuant ops) only runs under ATC: verify model_qdq.onnx instead") from None
    out_names = [o.name for o in ref.graph.output]
    ref_out = onnx_runner(ref)(samples)
    try:
        got = run(samples)
    except DeployerError:
        raise
    except Exception as e:  # a runtime refusing the artifact (wrong inputs, corrupt file)
        raise BadInputError(f"{art} could not run on {data} ({type(e).__name__}: {e}); is it the artifact of "
                            f"this reference?") from None
    dims = [d.dim_value for d in ref.graph.output[0].type.tensor_type.shape.dim]
    task = "classification" if len(dims) == 2 and dims[1] > 1 else "generic"
    fid = fidelity(ref_out, got, out_names, task)
    plan_path = find_plan(art)
    plan = QuantPlan.load(plan_path) if plan_path is not None else None
    name = opts.target or art.parent.name or art.suffix.lstrip(".")
    fp32_size = ref_path.stat().st_size
    size: dict[str, Any] = {"fp32": fp32_size, "artifact": art.stat().st_size,
                            "ratio": round(art.stat().st_size / fp32_size, 4)}
    result = TargetResult(name, art.name, size, cast(Fidelity, fid), verified_by,
                          [f"re-verified {art} against {ref_path} on {len(samples)} samples of {data}"], {})
    layers: dict[str, Any] = {"method": "not computed (not an ONNX artifact)", "samples": 0, "layers": []}
    if art.suffix.lower() == ".onnx":
        from deployer.layer_error import layer_errors

        layers = layer_errors(ref, plan, samples, qdq_model=load_onnx(art))
        layers["method"] = "the artifact's intermediate tensors vs the FP32 reference; ONNX Runtime CPU, optimizations off"
    with atomic_output(Path(out_dir), opts.overwrite) as tmp:
        shutil.copyfile(art, tmp / art.name)
        if plan_path is not None:
            shutil.copyfile(plan_path, tmp / "plan.json")
        report = {
            "schema_version": "1.0", "kind": "verify",
            "plan": "plan.json" if plan_path is not None else None,
            "model": {"sha256": model_sha256(ref), "source": str(ref_path), "inputs": [s.to_dict() for s in specs],
                      "outputs": out_names},
            "calibration": {"sha256": samples.sha256(), "num_samples": len(samples), "name": str(data),
                            "observer": plan.calibration.get("observer") if plan else None},
            "recipe": plan.recipe.get("name") if plan else None,
            "data": {"task": task, "split": f"verify: every sample of {data}", "heldout_samples": len(samples)},
            "targets": {name: result.to_dict()},
            "layers": layers,
            "provenance": provenance(),
            "sha256": {art.name: sha256_file(art), "reference": sha256_file(ref_path)},
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        from deployer.report_html import write_html

        write_html(report, tmp)
    out = Path(out_dir)
    return DeployResult(out, out / "plan.json", out / "report.json", {name: result}, report)
