"""Child-process entry point: ``python -m backends.tflite.worker OP JOB_DIR``.

Everything that loads a ``.tflite`` runs here, never in the ``deploy`` process (a LiteRT abort kills
only this process; :mod:`backends.tflite.child` turns it into one error line). The job directory holds
``job.json`` (the step's parameters), the models and ``samples.npz`` (sample ``k``'s input ``name`` as
``k/name``); results are written back there (``result.json``, ``outputs.npz``, models).

OPs: ``lower`` (layout, value-verified mapping, quantization), ``run`` (outputs for samples),
``latency`` (median invoke time).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def save_samples(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    arrays: dict[str, Any] = {f"{k}/{n}": np.asarray(v) for k, s in enumerate(samples) for n, v in s.items()}
    np.savez(path, **arrays)


def load_samples(path: Path) -> list[dict[str, np.ndarray]]:
    z = np.load(path)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        k, n = key.split("/", 1)
        out.setdefault(int(k), {})[n] = z[key]
    return [out[k] for k in sorted(out)]


def _lower(job: Path, p: dict[str, Any]) -> None:
    import onnx

    from backends.tflite.mapping import find_layout, map_tensors
    from backends.tflite.quantize import quantize
    from deployer.recovery import tensor_values

    data = (job / "float.tflite").read_bytes()
    model = onnx.load(str(job / "reference.onnx"))
    samples = load_samples(job / "samples.npz")
    outs = [o.name for o in model.graph.output]
    ref = next(iter(tensor_values(model, samples[:1], outs)))
    layout = find_layout(data, model, samples[0], bool(p["keep_nchw"]), [np.asarray(ref[o], np.float32) for o in outs])
    m = map_tensors(data, model, samples, layout, p["correspondence"])
    result: dict[str, Any] = {"layout": layout.to_dict(), "mapped": len(m.onnx_of), "by_value": m.by_value,
                              "rejected": m.rejected, "activations": len(m.minmax)}
    if p.get("plan_ranges") is not None:
        ranges = {k: (float(v[0]), float(v[1])) for k, v in p["plan_ranges"].items()}
        q = quantize(data, m.minmax, m.onnx_of, ranges, set(p["masks"]), p["mode"], bool(p["per_tensor"]), p["io"],
                     set(p.get("float_tensors") or ()))
        (job / "quantized.tflite").write_bytes(q.data)
        result.update(float_reasons=q.float_reasons, deviations=q.deviations, from_plan=q.from_plan,
                      without_plan_range=q.without_plan_range, plan_tensors=q.plan_tensors, fitted_biases=q.fitted_biases)
    (job / "result.json").write_text(json.dumps(result))


def _run(job: Path, p: dict[str, Any]) -> None:
    from backends.tflite.session import Layout, Session, shape_layout

    data = (job / "model.tflite").read_bytes()
    samples = load_samples(job / "samples.npz")
    if p["layout"] is not None:
        layout = Layout.from_dict(p["layout"])
    else:
        layout = shape_layout(data, p["in_names"], samples[0], p["out_shapes"], p["layout_name"] == "nchw")
    s = Session(data, layout, threads=int(p.get("threads", 1)))
    res = s.run(samples)
    arrays: dict[str, Any] = {f"{k}/{j}": y for k, row in enumerate(res) for j, y in enumerate(row)}
    np.savez(job / "outputs.npz", **arrays)


def _latency(job: Path, p: dict[str, Any]) -> None:
    """Median ``invoke`` time per model, the models timed in alternation (one invoke each per round), so
    a load change on a shared machine hits every model alike."""
    from backends.tflite.session import Layout, Session

    sample = load_samples(job / "samples.npz")[0]
    sessions = {}
    for name in p["models"]:
        s = Session((job / name).read_bytes(), Layout.from_dict(p["layout"]), threads=1)
        s.feed(sample)
        for _ in range(3):
            s.it.invoke()
        sessions[name] = s
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(int(p["runs"])):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.it.invoke()
            times[name].append((time.perf_counter() - t0) * 1e3)
    (job / "result.json").write_text(json.dumps({k: round(float(np.median(v)), 3) for k, v in times.items()}))


def main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    op, job = argv[0], Path(argv[1])
    p = json.loads((job / "job.json").read_text())
    {"lower": _lower, "run": _run, "latency": _latency}[op](job, p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
