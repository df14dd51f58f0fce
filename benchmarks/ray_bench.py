"""Ray benchmark: sharded calibration vs one process, and a 4-entry ``deploy batch`` sequential vs ``--ray``.

1. Calibration of EfficientNet-Lite0 (the built-in example's model) on ``--calib-samples`` random crops of
   its calibration photos, written once to a folder of ``.npz`` files (untimed; both runs read it by
   path): one process (``collect_statistics``, ONNX Runtime's default threads) vs a local Ray with 2
   workers (``sharded_statistics``, 2 shards, 1 ONNX Runtime thread per task). Each runs in a fresh
   subprocess; peak RSS is ``ru_maxrss`` of that process, and of each Ray worker for its shard. The
   two ``statistics.json`` are compared byte for byte.
2. ``deploy batch`` of EfficientNet-Lite0 and MiniLM x {tensorrt, onnxruntime} (the QDQ targets that
   run here) with ``--batch-calib`` / ``--batch-heldout`` samples per entry, sequentially and with
   ``--ray`` (a local Ray, 2 workers), each in a fresh subprocess.

Usage::

    nice -n 10 python benchmarks/ray_bench.py --calib-samples 256 --out benchmarks/results/ray.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORK = Path(os.environ.get("DEPLOYER_BENCH_DIR", Path(tempfile.gettempdir()) / "deployer-ray-bench"))
ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(n: int) -> tuple[Path, Path]:
    """The canonical EfficientNet-Lite0 ONNX and a folder of ``n`` calibration crops (once)."""
    import numpy as np
    import onnx

    from deployer.examples.efficientnet import build, calibration_set
    from deployer.model_io import canonicalize

    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "efficientnet-lite0.onnx"
    if not model.exists():
        onnx.save(canonicalize(build(1, 1, 0).model), str(model))
    folder = WORK / f"calib-{n}"
    if not (folder / f"{n - 1:05d}.npz").exists():
        folder.mkdir(exist_ok=True)
        for i, s in enumerate(calibration_set(n, 0)):
            np.savez(folder / f"{i:05d}.npz", **{k: np.asarray(v) for k, v in s.items()})
    return model, folder


def one_calibration(mode: str, model: str, folder: str, out: str) -> dict[str, Any]:
    """One calibration run in this (fresh) process: ``single`` or ``ray``."""
    import onnx

    from calibration.collect import collect_statistics
    from calibration.dataset import load_folder
    from deployer import distributed
    from deployer.model_io import input_specs

    m = onnx.load(model)
    cal = load_folder(folder, input_specs(m))
    res: dict[str, Any] = {"mode": mode, "samples": len(cal)}
    if mode == "single":
        t0 = time.perf_counter()
        stats = collect_statistics(m, cal)
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        res["peak_rss_mb"] = round(_rss_mb())
    else:
        t0 = time.perf_counter()
        distributed.connect("local")
        res["ray_start_s"] = round(time.perf_counter() - t0, 2)
        parts: list[Any] = []
        t0 = time.perf_counter()
        stats = distributed.sharded_statistics(m, cal, "local", partials=parts)
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        res["worker_peak_rss_mb"] = [round(p.peak_rss_mb) for p in parts]
        res["driver_peak_rss_mb"] = round(_rss_mb())
        res["shards"] = [p.samples for p in parts]
        distributed.shutdown()
    stats.save(out)
    res["statistics_sha256"] = hashlib.sha256(Path(out).read_bytes()).hexdigest()
    return res


def manifest(path: Path, calib: int, heldout: int, min_fidelity: str | None, models: list[str],
             observers: list[str]) -> Path:
    entries = [{"name": f"{m}-{t}-{o}", "model": m, "targets": [t], "observer": o}
               for m in models for o in observers for t in ("tensorrt", "onnxruntime")]
    defaults: dict[str, Any] = {"calib_samples": calib, "heldout_samples": heldout}
    if min_fidelity:
        defaults["min_fidelity"] = min_fidelity
    path.write_text(json.dumps({"defaults": defaults, "entries": entries}, indent=1))
    return path


def run_batch(manifest_path: Path, out: Path, ray: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "deployer.cli", "batch", str(manifest_path), "--out", str(out), "--overwrite",
           "--quiet"] + (["--ray"] if ray else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 1), "rc": p.returncode, "summary": summary, "stderr": p.stderr[-500:]}


def sub(args: list[str]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        raise SystemExit(f"{args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("Flags")), [])
    have = [f for f in ("avx2", "avx512_vnni", "amx_int8") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, flags: {', '.join(have) or 'none of avx2/avx512_vnni/amx_int8'}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=1024)
    ap.add_argument("--batch-calib", type=int, default=32)
    ap.add_argument("--batch-heldout", type=int, default=16)
    ap.add_argument("--batch-min-fidelity", default=None,
                    help="floor for the batch entries (a low one keeps escalation out of the timing)")
    ap.add_argument("--batch-models", nargs="+", default=["efficientnet-lite0", "minilm"])
    ap.add_argument("--batch-observers", nargs="+", default=["minmax"])
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ray.json"))
    ap.add_argument("--one", nargs=4, metavar=("MODE", "MODEL", "FOLDER", "OUT"), help="internal")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_calibration(*a.one)))
        return
    res: dict[str, Any] = {"cpu": cpu_line(), "load_before": os.getloadavg()}
    if not a.skip_calibration:
        model, folder = setup(a.calib_samples)
        res["single"] = sub(["--one", "single", str(model), str(folder), str(WORK / "stats-single.json")])
        print(res["single"], file=sys.stderr)
        res["ray_calibration"] = sub(["--one", "ray", str(model), str(folder), str(WORK / "stats-ray.json")])
        print(res["ray_calibration"], file=sys.stderr)
        res["identical"] = res["single"]["statistics_sha256"] == res["ray_calibration"]["statistics_sha256"]
    if not a.skip_batch:
        m = manifest(WORK / "batch.json", a.batch_calib, a.batch_heldout, a.batch_min_fidelity, a.batch_models,
                     a.batch_observers)
        res["batch_sequential"] = run_batch(m, WORK / "batch-seq", False)
        print(res["batch_sequential"]["wall_s"], file=sys.stderr)
        res["batch_ray"] = run_batch(m, WORK / "batch-ray", True)
        print(res["batch_ray"]["wall_s"], file=sys.stderr)
    res["load_after"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
