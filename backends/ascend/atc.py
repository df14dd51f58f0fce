"""The ``atc`` command line as a pure function, its side files, and the one runner.

Rules (CANN ATC Offline Model Builder, option reference ``atlasatcparam_16_*``, CANN 8.0/8.2):

- ONNX models: ``--framework=5``; ``--soc_version`` one of the SoC names in ``data/soc_versions.json``.
- ``--input_shape="a:1,3,224,224;b:1,-1"``: ``-1`` marks a dynamic dimension; exactly one of
  ``--dynamic_batch_size="1,2,4"`` (only the batch axis varies), ``--dynamic_image_size="224,224;448,448"``
  (only H and W of a 4-D NCHW input vary) or ``--dynamic_dims="16,16;32,32"`` (any axes; needs
  ``--input_format=ND``) gives the profiles; 2 to 100 profiles; ``--dynamic_dims`` and
  ``--insert_op_conf`` (AIPP) are mutually exclusive.
- ``--precision_mode_v2``: ``fp16`` (ATC's default: float ops in fp16), ``origin`` (keep the model's
  types), ``cube_fp16in_fp32out``, ``mixed_float16``, ``mixed_bfloat16`` (ops follow ATC's built-in
  white/gray/black lists). ``--keep_dtype=FILE`` keeps named ops (``OpName::x``) in the model's type;
  ``--modify_mixlist=FILE`` edits the lists by op type and applies only to the ``mixed_*`` modes.

Mapping of a ``MIN/OPT/MAX`` range (:mod:`deployer.shapes`) to ATC profiles: when every dynamic axis of
every input has the same ``(min, opt, max)`` (the batch, or one sequence length shared by all inputs),
the profiles are ``min``, each power of two strictly between ``min`` and ``max``, ``opt`` and ``max``;
otherwise they are the three tuples ``min``, ``opt``, ``max``. Fewer than 2 or more than 100 profiles is
an error.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from deployer.errors import BadInputError, ExternalToolError
from deployer.shapes import ShapeRange

PRECISION_MODES = ("fp16", "origin", "cube_fp16in_fp32out", "mixed_float16", "mixed_bfloat16")
"""``--precision_mode_v2`` values we emit (CANN 8.x; ``fp16`` is ATC's default)."""
DEFAULT_PRECISION_MODE = "fp16"
MIN_PROFILES, MAX_PROFILES = 2, 100


def load_data(name: str) -> dict[str, Any]:
    """A data file of this package (``soc_versions.json``, ``ops.json``)."""
    text = resources.files("backends.ascend").joinpath("data", name).read_text(encoding="utf-8")
    return dict(json.loads(text))


_SOC = load_data("soc_versions.json")
SOC_VERSIONS: tuple[str, ...] = tuple(_SOC["soc_versions"])
DEFAULT_SOC_VERSION: str = _SOC["default"]


def validate_soc(soc_version: str) -> str:
    """Return ``soc_version`` if ATC knows it.

    Raises:
        BadInputError: unknown SoC name.
    """
    if soc_version not in SOC_VERSIONS:
        raise BadInputError(f"--soc-version {soc_version!r} is not known to CANN {_SOC['cann_version']}; use one of "
                            f"{', '.join(SOC_VERSIONS)} (default {DEFAULT_SOC_VERSION})")
    return soc_version


@dataclass(frozen=True)
class AippConfig:
    """Static AIPP (image pre-processing on the AI Core) for one NCHW image input.

    AIPP computes ``out = (pixel - mean_chn_i) * var_reci_chn_i`` on ``RGB888_U8`` pixels (CANN ATC
    "AIPP configuration"), so ``mean``/``std`` are in pixel units: EfficientNet-Lite0's
    ``(x - 127) / 128`` is ``mean=(127,)*3, std=(128,)*3``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_format: str = "RGB888_U8"

    def render(self, height: int, width: int, related_input_rank: int = 0) -> str:
        lines = ["aipp_op {", "  aipp_mode : static", f"  related_input_rank : {related_input_rank}",
                 f"  input_format : {self.input_format}", f"  src_image_size_w : {width}",
                 f"  src_image_size_h : {height}", "  csc_switch : false", "  rbuv_swap_switch : false"]
        for i, (m, s) in enumerate(zip(self.mean, self.std)):
            if s <= 0:
                raise BadInputError(f"AIPP std {s} must be positive")
            lines += [f"  mean_chn_{i} : {int(round(m))}", f"  min_chn_{i} : {m - int(round(m)):.6f}",
                      f"  var_reci_chn_{i} : {1.0 / s:.9f}"]
        return "\n".join(lines + ["}"]) + "\n"


@dataclass(frozen=True)
class ShapeArgs:
    """``--input_shape`` and the dynamic-profile option derived from the inputs' shapes."""

    input_shape: str
    dynamic_option: str | None  # "--dynamic_batch_size" | "--dynamic_image_size" | "--dynamic_dims"
    profiles: str | None
    input_format: str


def _ladder(lo: int, opt: int, hi: int) -> list[int]:
    vals = {lo, opt, hi}
    p = 1
    while p < hi:
        if p > lo:
            vals.add(p)
        p *= 2
    return sorted(vals)


def shape_args(inputs: Mapping[str, ShapeRange | Sequence[int]], input_format: str | None = None) -> ShapeArgs:
    """Translate input shapes (static, or ``MIN/OPT/MAX`` ranges) into ATC's options.

    Args:
        inputs: input name -> :class:`ShapeRange` or a static shape, in graph order.
        input_format: force ``NCHW``/``ND``; default NCHW when every input is 4-D, else ND.

    Raises:
        BadInputError: a profile count outside 2..100, a dynamic layout ATC cannot express.
    """
    ranges = {k: (v if isinstance(v, ShapeRange) else ShapeRange(tuple(v), tuple(v), tuple(v)))
              for k, v in inputs.items()}
    if not ranges:
        raise BadInputError("the model has no inputs to give --input_shape for")
    fmt = input_format or ("NCHW" if all(len(r.min) == 4 for r in ranges.values()) else "ND")
    dyn = {k: r.dynamic_axes() for k, r in ranges.items()}
    shape = ";".join(f"{k}:" + ",".join("-1" if i in dyn[k] else str(d) for i, d in enumerate(r.opt))
                     for k, r in ranges.items())
    axes = [(k, i) for k, ax in dyn.items() for i in ax]
    if not axes:
        return ShapeArgs(shape, None, None, fmt)
    triples = [(ranges[k].min[i], ranges[k].opt[i], ranges[k].max[i]) for k, i in axes]
    if len(set(triples)) == 1:
        levels = [[v] * len(axes) for v in _ladder(*triples[0])]
    else:  # each axis its own power-of-two ladder, stepped in lockstep from all-min to all-max
        ladders = [_ladder(*t) for t in triples]
        n = max(len(ld) for ld in ladders)
        levels = [[ld[round(j * (len(ld) - 1) / (n - 1))] if n > 1 else ld[0] for ld in ladders] for j in range(n)]
        levels = [list(t) for t in dict.fromkeys(tuple(lv) for lv in levels)]
    if not MIN_PROFILES <= len(levels) <= MAX_PROFILES:
        raise BadInputError(f"--input-shapes gives {len(levels)} ATC profile(s); ATC needs {MIN_PROFILES} to "
                            f"{MAX_PROFILES}: widen the MIN/OPT/MAX range")
    if all(ax == [0] for ax in dyn.values() if ax) and len(set(triples)) == 1:
        return ShapeArgs(shape, "--dynamic_batch_size", ",".join(str(lv[0]) for lv in levels), fmt)
    dynamic_inputs = [ax for ax in dyn.values() if ax]
    if fmt == "NCHW" and len(dynamic_inputs) == 1 and dynamic_inputs[0] == [2, 3]:
        return ShapeArgs(shape, "--dynamic_image_size", ";".join(f"{lv[0]},{lv[1]}" for lv in levels), fmt)
    return ShapeArgs(shape, "--dynamic_dims", ";".join(",".join(str(v) for v in lv) for lv in levels), "ND")


def atc_argv(model_file: str, output_prefix: str, soc_version: str,
             input_shapes: Mapping[str, ShapeRange | Sequence[int]], keep_dtype_file: str | None = None,
             input_format: str | None = None, precision_mode: str = DEFAULT_PRECISION_MODE,
             modify_mixlist_file: str | None = None, insert_op_conf: str | None = None) -> list[str]:
    """The ``atc`` command line for an ONNX model (pure; no file is read).

    Args:
        model_file: the deploy-form ONNX (ATC does not compile raw Q/DQ).
        output_prefix: ``--output`` (ATC appends ``.om``).
        soc_version: checked against ``data/soc_versions.json``.
        input_shapes: see :func:`shape_args`.
        keep_dtype_file: ``--keep_dtype`` config (ops kept in the model's own type).
        precision_mode: ``--precision_mode_v2``.
        modify_mixlist_file: ``--modify_mixlist`` JSON (``mixed_*`` modes only).
        insert_op_conf: AIPP config file.

    Raises:
        BadInputError: unknown SoC or precision mode, a mixlist outside a mixed mode, AIPP with
            ``--dynamic_dims``, a bad profile count.
    """
    validate_soc(soc_version)
    if precision_mode not in PRECISION_MODES:
        raise BadInputError(f"--precision-mode {precision_mode!r}: use one of {', '.join(PRECISION_MODES)}")
    if modify_mixlist_file and not precision_mode.startswith("mixed_"):
        raise BadInputError(f"--modify_mixlist applies only to mixed_* precision modes, not {precision_mode!r}")
    sa = shape_args(input_shapes, input_format)
    if insert_op_conf and sa.dynamic_option == "--dynamic_dims":
        raise BadInputError("ATC cannot combine AIPP (--insert_op_conf) with --dynamic_dims; give static shapes "
                            "or a dynamic batch / image size")
    argv = ["atc", f"--model={model_file}", "--framework=5", f"--output={output_prefix}",
            f"--soc_version={soc_version}", f"--input_shape={sa.input_shape}", f"--input_format={sa.input_format}"]
    if sa.dynamic_option:
        argv.append(f"{sa.dynamic_option}={sa.profiles}")
    argv.append(f"--precision_mode_v2={precision_mode}")
    if keep_dtype_file:
        argv.append(f"--keep_dtype={keep_dtype_file}")
    if modify_mixlist_file:
        argv.append(f"--modify_mixlist={modify_mixlist_file}")
    if insert_op_conf:
        argv.append(f"--insert_op_conf={insert_op_conf}")
    return argv


def keep_dtype_text(node_names: Sequence[str]) -> str:
    """``--keep_dtype`` file: one ``OpName::name`` per line."""
    return "".join(f"OpName::{n}\n" for n in sorted(node_names))


def mixlist_text(fp16_op_types: Sequence[str], fp32_op_types: Sequence[str]) -> str:
    """``--modify_mixlist`` JSON: op types moved to the white list (fp16) or black list (fp32)."""
    data: dict[str, Any] = {}
    if fp16_op_types:
        data["white-list"] = {"to-add": sorted(set(fp16_op_types))}
    if fp32_op_types:
        data["black-list"] = {"to-add": sorted(set(fp32_op_types))}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def script_text(argv: Sequence[str]) -> str:
    """``atc.sh``: run ATC from the artifact directory, output captured into ``atc.log``."""
    return ("#!/bin/sh\n# Compile the Ascend deploy form with CANN's ATC (source CANN's set_env.sh first)\nset -e\n"
            'cd "$(dirname "$0")"\n' + shlex.join(argv) + " > atc.log 2>&1 || { tail -n 20 atc.log; exit 1; }\n")


def run_atc(argv: Sequence[str], cwd: Path, timeout_s: int = 3600) -> Path:
    """Run ``atc`` (no shell), output captured into ``cwd/atc.log``; return the ``.om`` path.

    Raises:
        ExternalToolError: non-zero exit, timeout, or no ``.om`` written.
    """
    log = cwd / "atc.log"
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ExternalToolError(f"atc did not finish within {timeout_s} s; see {log}") from None
    except OSError as e:
        raise ExternalToolError(f"atc could not be started ({e.strerror}); source CANN's set_env.sh") from None
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise ExternalToolError(f"atc failed (exit {proc.returncode}): {' | '.join(tail)}; full log in {log}")
    prefix = next(a.split("=", 1)[1] for a in argv if a.startswith("--output="))
    om = cwd / f"{prefix}.om"
    if not om.exists():
        candidates = sorted(cwd.glob(f"{prefix}*.om"))
        if not candidates:
            raise ExternalToolError(f"atc exited 0 but wrote no {prefix}.om; see {log}")
        om = candidates[0]
    return om
