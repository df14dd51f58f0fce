"""Dynamic shapes end to end on a real model: all-MiniLM-L6-v2 with symbolic batch and sequence length.

The encoder is exported with dynamic axes (``batch``, ``sequence``), the calibration folder holds real
fortunes texts tokenized *without padding* (each sample its own length), and one ``deploy`` run lowers
the plan to every target. The result file lists the shapes the plan recorded and what each target
chose (profile, ATC shapes, dynamic ``.tflite``), with fidelity on held-out texts of many lengths.

    python benchmarks/dynamic_minilm.py [--calib 64] [--heldout 200] [--targets ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128, help="training-pool texts (deploy calibrates on them)")
    ap.add_argument("--heldout", type=int, default=32,
                    help="held-out-split texts; keep calib = 4 x heldout so that deploy's held-out fifth is exactly them")
    ap.add_argument("--targets", default="tensorrt,ascend,onnxruntime")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dynamic_shapes.md"))
    a = ap.parse_args()

    import torch

    from deployer.examples import fortunes, minilm
    from deployer.model_io import canonicalize

    module, tok = minilm.load_module()
    corpus = fortunes.load_corpus()
    held_idx, train_idx = fortunes.split(corpus.labels, 1000, 0)
    work = Path(tempfile.mkdtemp(prefix="dyn-minilm-"))
    dummy = (torch.zeros((1, 16), dtype=torch.int64), torch.ones((1, 16), dtype=torch.int64))
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, dummy, buf, dynamo=False, opset_version=17, input_names=list(minilm.INPUT_NAMES),
                          output_names=[minilm.OUTPUT_NAME],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in minilm.INPUT_NAMES}
                          | {minilm.OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True)
    model = canonicalize(onnx.load_model_from_string(buf.getvalue()))
    onnx.save(model, str(work / "minilm_dynamic.onnx"))
    calib = work / "calib"
    calib.mkdir()
    # calibration first, held-out texts last: deploy holds out the last fifth of a user folder
    texts = [corpus.texts[i] for i in train_idx[: a.calib]] + [corpus.texts[i] for i in held_idx[: a.heldout]]
    lengths = []
    for k, t in enumerate(texts):
        enc = tok([t], truncation=True, max_length=minilm.SEQ, return_tensors="np")  # no padding: own length
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        lengths.append(ids.shape[1])
        np.savez(calib / f"{k:05d}.npz", input_ids=ids, attention_mask=mask)
    out = work / "out"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "deployer.cli", "--model", str(work / "minilm_dynamic.onnx"),
                        "--calib", str(calib), "--target", a.targets, "--recipe", "mixed", "--out", str(out),
                        "--json", "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-2000:])
        return p.returncode
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    n_cal = plan["calibration"]["num_samples"]
    lines = [
        "# Dynamic shapes end to end: all-MiniLM-L6-v2 with symbolic batch and sequence (issue #12)",
        "",
        f"Command: `python benchmarks/dynamic_minilm.py --calib {a.calib} --heldout {a.heldout} --targets {a.targets}` "
        f"(one `deploy --recipe mixed` run, {wall:.0f} s wall on 2 shared cores).",
        "",
        f"Model: the sentence-embedding encoder exported with dynamic axes `batch` and `sequence` on both inputs. "
        f"Data: {len(texts)} real fortunes texts tokenized without padding (lengths {min(lengths)}-{max(lengths)} "
        f"tokens, median {int(np.median(lengths))}); deploy calibrates on the first {n_cal} (training-pool texts) "
        f"and verifies on the last {len(texts) - n_cal} (held-out-split texts). Fidelity is SQNR of the "
        f"embedding (a user model gets no task metric); 20 dB is about cosine 0.995, 8 dB about 0.92.",
        "",
        f"Plan `calibration.input_shapes`: `{json.dumps(plan['calibration'].get('input_shapes'))}`",
        "",
        "| target | fidelity vs FP32 (held-out, each text at its own length) | shapes chosen (from the report) |",
        "|---|---|---|",
    ]
    for t, r in report["targets"].items():
        fid = r["fidelity"]
        sq = fid.get("sqnr_db")
        shape_notes = [n for n in r.get("notes", []) if "shape" in n or "profile" in n or "dynamic" in n]
        lines.append(f"| {t} | SQNR {json.dumps(sq)} dB | "
                     f"{'; '.join(shape_notes)[:400] or '-'} |")
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
