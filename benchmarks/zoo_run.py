"""Deploy every zoo model to every target, one child process per (model, target); raw JSON per model.

For each model (``benchmarks/zoo``) the harness first builds it in a child process and writes its
inputs as the CLI's calibration folders (``WORK/<model>/calib/*.npz``, ``heldout/*.npz``, one sample per
file) beside ``model.onnx``, ``ref.npz`` (FP32 held-out outputs, ONNX Runtime) and ``meta.json``; a
build whose builder hash is unchanged is reused. Then each target group runs a real
``deployer.deploy(...)`` in its own child process (default groups: ``tflite`` alone, and the three QDQ
targets together from one plan; a crash, a refusal or a timeout stops nothing else, and a group that
fails as a whole is retried target by target), with the zoo's calibration and held-out sets and the
zoo's task metric passed as the example's ``metric``: the deploy runs each artifact on the held-out
samples and hands the outputs to that metric, which keeps them, so
cosine / SQNR per output and the task metric are computed here on exactly the outputs the deploy
verified. Time is the child's wall time; peak RSS is the child's (and its children's) maximum
resident set, from ``os.wait4``.

    python benchmarks/zoo_run.py                                   # whole zoo, all four targets
    python benchmarks/zoo_run.py --models magika,ppocr_cls --groups "onnxruntime;tflite"

Results: ``benchmarks/results/zoo/<model>.json``; tables: ``benchmarks/tflite_zoo.py`` and
``benchmarks/fidelity_zoo.py``. Run it with ``nice -n 10`` on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("tflite", "tensorrt", "ascend", "onnxruntime")
RESULTS = ROOT / "benchmarks" / "results" / "zoo"
WORK = Path(os.environ.get("DEPLOYER_ZOO_WORK", "/tmp/deployer-zoo-work"))


def _save_samples(folder: Path, samples: list[dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:04d}.npz", **s)


def _outputs_npz(outs: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"s{i:04d}_o{j}": np.asarray(a) for i, o in enumerate(outs) for j, a in enumerate(o)}


def _outputs_from_npz(path: Path, n_out: int) -> list[list[np.ndarray]]:
    z = np.load(path, allow_pickle=False)
    n = len(z.files) // n_out
    return [[z[f"s{i:04d}_o{j}"] for j in range(n_out)] for i in range(n)]


def prepare(name: str, work: Path) -> dict[str, Any]:
    """Child: build zoo entry ``name`` into ``work`` (model.onnx, calib/, heldout/, ref.npz, meta.json)."""
    import shutil

    from benchmarks.zoo import ZOO, build, common

    import importlib

    key = common.builder_key(importlib.import_module(ZOO[name]).__file__ or "")
    meta_path = work / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("builder") == key:
        return json.loads(meta_path.read_text())
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    m = build(name)
    seconds = time.perf_counter() - t0
    shutil.copyfile(m.onnx_path, work / "model.onnx")
    _save_samples(work / "calib", m.calibration)
    _save_samples(work / "heldout", m.heldout)
    ref = common.run_onnx(work / "model.onnx", m.heldout)
    np.savez(work / "ref.npz", **_outputs_npz(ref))
    import onnx

    g = onnx.load(str(work / "model.onnx")).graph
    inits = {i.name for i in g.initializer}
    meta = {"name": m.name, "domain": m.domain, "builder": key, "outputs": m.outputs,
            "output_names": [o.name for o in g.output], "passing": {k: list(v) for k, v in m.passing.items()},
            "weights": m.weights, "inputs": m.inputs, "notes": m.notes, "calibration_samples": len(m.calibration),
            "heldout_samples": len(m.heldout), "build_seconds": round(seconds, 1),
            "input_specs": {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
                            for i in g.input if i.name not in inits},
            "fp32_self_metric": m.task_metric(ref, ref), "op_types": sorted({n.op_type for n in g.node}),
            "fp32_size_bytes": (work / "model.onnx").stat().st_size}
    meta_path.write_text(json.dumps(meta, indent=1, default=float) + "\n")
    return meta


def _task(meta: dict[str, Any]) -> str:
    kinds = list(meta["outputs"].values())
    if kinds and kinds[0] == "class_scores" and (meta.get("fp32_classes") or 2) > 1:
        return "classification"
    return "embedding" if kinds and kinds[0] == "embedding" else "generic"


def deploy_group(name: str, targets: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Child: one real ``deployer.deploy`` of the prepared model to ``targets`` (one shared plan);
    returns a record per target."""
    import onnx

    import deployer
    from benchmarks.zoo import ZOO
    from calibration.dataset import load_folder
    from deployer.errors import DeployerError
    from deployer.examples import ExampleData
    from deployer.model_io import input_specs

    import importlib

    meta = json.loads((work / "meta.json").read_text())
    mod = importlib.import_module(ZOO[name])
    out_names = meta["output_names"]
    ref = _outputs_from_npz(work / "ref.npz", len(out_names))
    model = onnx.load(str(work / "model.onnx"))
    specs = input_specs(model)
    seen: list[list[list[np.ndarray]]] = []

    def metric(outs: list[list[np.ndarray]]) -> dict[str, float]:
        """Called by the deploy on the FP32 reference first, then on each target's artifact outputs."""
        seen.append([[np.asarray(a) for a in o] for o in outs])
        return {k: float(v) for k, v in mod.task_metric(ref, outs).items()} if len(outs) == len(ref) else {}

    first = ref[0][0]
    meta["fp32_classes"] = int(np.prod(np.shape(first)[1:])) if np.ndim(first) > 1 else 1
    data = ExampleData(model=model, calibration=load_folder(work / "calib", specs),
                       heldout=load_folder(work / "heldout", specs), task=_task(meta),
                       split=f"zoo {name}: {meta['inputs']}", metric=metric)
    out_dir = work / f"deploy-{'-'.join(targets)}"
    t0 = time.perf_counter()
    try:
        res = deployer.deploy(data, targets=targets, out_dir=out_dir, overwrite=True)
    except DeployerError as e:
        return {t: {"target": t, "task": data.task, "converts": False, "error": str(e), "exit_code": e.exit_code,
                    "seconds": round(time.perf_counter() - t0, 1), "deployed_with": targets} for t in targets}
    except Exception as e:  # an internal error of today's code: recorded, never hidden
        return {t: {"target": t, "task": data.task, "converts": False, "exit_code": 4,
                    "error": f"internal: {type(e).__name__}: {' '.join(str(e).split())[:400]}",
                    "traceback": traceback.format_exc()[-2000:], "seconds": round(time.perf_counter() - t0, 1),
                    "deployed_with": targets} for t in targets}
    seconds = round(time.perf_counter() - t0, 1)
    report = json.loads(res.report_path.read_text())
    plan_sha = hashlib.sha256((out_dir / "plan.json").read_bytes()).hexdigest()[:16]
    # the metric sees FP32 first, then every verification of every target in order: once, plus once per
    # escalation round that re-lowered it (fidelity_floor.rounds[].applied); a failed target: none
    calls = [0 if report["targets"][t].get("error") else
             1 + sum(1 for r in ((report["targets"][t].get("fidelity_floor") or {}).get("rounds") or [])
                     if r.get("applied")) for t in targets]
    last = [sum(calls[: k + 1]) for k in range(len(targets))]  # index in seen of each target's final outputs
    art_outs = [seen[i] if c else [] for i, c in zip(last, calls)] if len(seen) == 1 + sum(calls) else []
    recs = {}
    for k, t in enumerate(targets):
        tr = report["targets"][t]
        rec: dict[str, Any] = {
            "target": t, "task": data.task, "converts": True, "exit_code": 0, "seconds": seconds,
            "deployed_with": targets, "plan_sha256": plan_sha, "artifact": tr.get("artifact"),
            "size_bytes": tr.get("size_bytes"), "report_fidelity": tr.get("fidelity"), "notes": tr.get("notes"),
            "verdict": tr.get("verdict"), "float_nodes": tr.get("float_nodes"), "float_ops": tr.get("float_ops"),
            "fp32_islands": tr.get("fp32_islands"), "latency_ms": tr.get("latency_ms"),
            "escalation": (tr.get("fidelity_floor") or {}).get("escalation"),
            "escalated": (tr.get("fidelity_floor") or {}).get("escalated"),
            "precision": _precision_mix(out_dir / "plan.json", out_dir / t / "plan.json"),
            "report_wall_seconds": report.get("wall_seconds")}
        if art_outs and len(art_outs[k]) == len(ref):
            outs = art_outs[k]
            np.savez(work / f"outputs-{t}.npz", **_outputs_npz(outs))
            rec["outputs"] = {n: {**s, "kind": meta["outputs"].get(n, "?")}
                              for n, s in output_stats(ref, outs, out_names).items()}
            rec["task_metric"] = {m: float(v) for m, v in mod.task_metric(ref, outs).items()}
            rec["passes"] = _passes(meta["passing"], rec["task_metric"])
        else:
            rec.update(outputs=None, task_metric=None, passes=None)
            rec["notes"] = (rec["notes"] or []) + ["artifact outputs on the held-out samples not captured"]
        recs[t] = rec
    return recs


def output_stats(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]], names: list[str]) -> dict[str, Any]:
    from benchmarks.zoo.common import output_stats as stats

    return stats(ref, outs, names)


def _passes(passing: dict[str, list[Any]], metrics: dict[str, float]) -> bool:
    from benchmarks.zoo.common import passes

    return passes({k: (str(v[0]), float(v[1])) for k, v in passing.items()}, metrics)


def _precision_mix(*plans: Path) -> dict[str, int] | None:
    """Node count per precision of the most specific plan found (a target's own plan first)."""
    for p in reversed(plans):
        if p.exists():
            nodes = json.loads(p.read_text()).get("nodes", {})
            mix: dict[str, int] = {}
            for n in nodes.values():
                mix[n.get("precision", "?")] = mix.get(n.get("precision", "?"), 0) + 1
            mix["source"] = str(p.relative_to(p.parents[1]))  # type: ignore[assignment]
            return mix
    return None


def _child(argv: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run a child; returns exit status, wall seconds, peak RSS (MiB, child and its descendants)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                timed_out = True
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": p.returncode, "timed_out": timed_out, "wall_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1)}


def _run_group(name: str, group: list[str], work: Path, timeout: float, retry_alone: bool) -> list[dict[str, Any]]:
    """One child deploying ``group``; when it fails as a whole and ``retry_alone``, each target alone."""
    tag = "-".join(group)
    rec_path = work / f"record-{tag}.json"
    rec_path.unlink(missing_ok=True)
    log = work / f"deploy-{tag}.log"
    run = _child(["_deploy", name, ",".join(group), str(work)], log, timeout)
    if rec_path.exists():
        recs = json.loads(rec_path.read_text())
    else:  # the child died (native crash, timeout): the log's tail says how
        why = ("timed out" if run["timed_out"] else f"child exited {run['returncode']}") + f": {_tail(log)}"
        recs = {t: {"target": t, "converts": False, "exit_code": run["returncode"], "error": why} for t in group}
    if retry_alone and not any(r.get("converts") for r in recs.values()):
        return [r for t in group for r in _run_group(name, [t], work, timeout, retry_alone=False)]
    for r in recs.values():
        r["child"] = run
    return [recs[t] for t in group]


def run_model(name: str, groups: list[list[str]], timeout: float) -> dict[str, Any]:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": name, "targets": {}}
    prep = _child(["_prepare", name, str(work)], work.parent / f"{name}-prepare.log", timeout)
    result["prepare"] = prep
    if prep["returncode"] != 0 or not (work / "meta.json").exists():
        why = f"timed out after {prep['wall_seconds']} s" if prep["timed_out"] else f"exit {prep['returncode']}"
        result["error"] = f"build failed ({why}): {_tail(work.parent / f'{name}-prepare.log')}"
        return result
    result["meta"] = json.loads((work / "meta.json").read_text())
    for group in groups:
        for rec in _run_group(name, group, work, timeout, retry_alone=len(group) > 1):
            result["targets"][rec["target"]] = rec
            print(f"  {name} {rec['target']}: converts={rec.get('converts')} passes={rec.get('passes')} "
                  f"{rec['child']['wall_seconds']} s {rec['child']['peak_rss_mib']} MiB", flush=True)
    return result


def _tail(path: Path, n: int = 400) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-3:])[-n:]


def cpu_line() -> str:
    """``lscpu`` model name, core count and the INT8-relevant flags (avx2, avx512_vnni, amx_int8)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "CPU: unknown (lscpu failed)"
    info = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    flags = set(info.get("Flags", "").split())
    have = [f for f in ("avx2", "avx512_vnni", "amx_int8") if f in flags]
    return (f"CPU: {info.get('Model name', '?').strip()}, {os.cpu_count()} cores visible; flags: "
            f"{', '.join(have) or 'none of avx2/avx512_vnni/amx_int8'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_prepare":
        prepare(argv[1], Path(argv[2]))
        return 0
    if argv and argv[0] == "_deploy":
        recs = deploy_group(argv[1], argv[2].split(","), Path(argv[3]))
        tag = argv[2].replace(",", "-")
        (Path(argv[3]) / f"record-{tag}.json").write_text(json.dumps(recs, indent=1, default=float) + "\n")
        return 0
    from benchmarks.zoo import ZOO

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    ap.add_argument("--groups", default="tflite;tensorrt,ascend,onnxruntime",
                    help="';'-separated target groups, one deploy (one child, one plan) per group; a group that "
                         "fails as a whole is retried target by target")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    a = ap.parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        print(f"zoo_run: error: unknown model(s) {unknown}; the zoo holds {', '.join(ZOO)}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_line()
    print(cpu, flush=True)
    for n in names:
        print(f"{n} ...", flush=True)
        groups = [[t for t in g.split(",") if t] for g in a.groups.split(";") if g.strip()]
        res = run_model(n, groups, a.timeout)
        res["cpu"] = cpu
        res["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        (a.out / f"{n}.json").write_text(json.dumps(res, indent=1, sort_keys=True, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
