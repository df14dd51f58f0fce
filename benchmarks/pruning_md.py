"""``benchmarks/results/pruning.md`` from ``pruning.json`` (written by ``pruning_bench.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def _m(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} M"


def _lat(lat: dict[str, Any], key: str) -> str:
    v = lat.get(key)
    return "-" if v is None else f"{v['median_ms']:.3f} ({', '.join(f'{x:.3f}' for x in v['rounds'])})"


def _machine(m: dict[str, Any]) -> str:
    return (f"{m['cpu']} (flags: {', '.join(m['flags']) or 'none'}), 2 cores shared with other jobs; load average "
            f"{' / '.join(map(str, m['load_average_start']))} at the start, {' / '.join(map(str, m['load_average_end']))} "
            f"at the end; {m['date']}")


def _mnist(r: dict[str, Any]) -> list[str]:
    st = r["pruning"]["stages"]
    o, f, q = st["original"], st["finetuned"], st["quantized"]
    u = r["unpruned_int8"]
    lat = r["latency"]
    fp32_acc = o["fidelity"]["teacher_accuracy"]
    rows = [
        ("unpruned FP32", fp32_acc, o["params"], o["macs"], o["size_bytes"], "unpruned_fp32_onnx", "unpruned_fp32_tflite"),
        (f"unpruned INT8 (ORT QDQ)¹, its FP32 {u['onnxruntime']['label_accuracy_fp32']:.4f}", u["onnxruntime"]["label_accuracy"], o["params"], o["macs"],
         u["onnxruntime"]["size_bytes"]["artifact"], "unpruned_int8_ort", None),
        (f"unpruned INT8 .tflite¹, its FP32 {u['tflite']['label_accuracy_fp32']:.4f}", u["tflite"]["label_accuracy"], o["params"], o["macs"], u["tflite"]["size_bytes"]["artifact"],
         None, "unpruned_int8_tflite"),
        ("30% pruned, before fine-tuning", st["pruned"]["fidelity"]["student_accuracy"], st["pruned"]["params"],
         st["pruned"]["macs"], st["pruned"]["size_bytes"], None, None),
        ("30% pruned + distilled, FP32", f["fidelity"]["student_accuracy"], f["params"], f["macs"], f["size_bytes"],
         "pruned_fp32_onnx", "pruned_fp32_tflite"),
        ("30% pruned + distilled, INT8 (ORT QDQ)", q["onnxruntime"]["fidelity"]["label_accuracy"], f["params"], f["macs"],
         q["onnxruntime"]["size_bytes"], "pruned_int8_ort", None),
        ("30% pruned + distilled, INT8 .tflite", q["tflite"]["fidelity"]["label_accuracy"], f["params"], f["macs"],
         q["tflite"]["size_bytes"], None, "pruned_int8_tflite"),
    ]
    out = [f"### MNIST example CNN ({o['fidelity']['heldout_samples']} held-out digits, {r['seconds']} s)", "",
           "| model | label accuracy | params | MACs | size | ONNX Runtime ms, median (rounds) | LiteRT ms, median (rounds) |",
           "|---|---|---|---|---|---|---|"]
    for name, acc, p, m, size, lo, lt in rows:
        out.append(f"| {name} | {acc:.4f} | {p:,} | {m:,} | {_mb(size)} | {_lat(lat, lo) if lo else '-'} | "
                   f"{_lat(lat, lt) if lt else '-'} |")
    tfl = q["tflite"]["fidelity"]["label_accuracy"]
    gap = 100 * (fp32_acc - tfl)
    out += ["", "¹ `deploy --model mnist`'s own CNN: same architecture, trained by the example on a split that leaves "
            "out its 256 calibration digits, where `deploy --prune` trained the teacher of this run on the distillation split "
            "(200 calibration digits out; since then `deploy --prune` uses the example's 256), so the two FP32 nets differ; held-out digits are the same 300. Sizes and "
            "latencies compare like with like.",
            "", f"Goal: pruned + INT8 TFLite within 0.5 point of the unpruned FP32 model: "
                f"**{'met' if gap <= 0.5 else 'NOT met'}** ({tfl:.4f} vs {fp32_acc:.4f}: {-gap:+.2f} points). "
                f"Top-1 agreement of the pruned INT8 .tflite with the unpruned FP32 model: "
                f"{q['tflite']['fidelity']['top1_agreement_vs_unpruned']:.4f}.",
            f"Recovery: {(r['pruning'].get('training') or {}).get('epochs_done')} epochs of distillation "
            f"({(r['pruning'].get('training') or {}).get('output_loss')}), teacher = the unpruned CNN, "
            f"{(r['pruning'].get('training') or {}).get('seconds')} s.", ""]
    return out


def _effnet(r: dict[str, Any]) -> list[str]:
    st = r["pruning"]["stages"]
    o, p, f, q = st["original"], st["pruned"], st["finetuned"], st["quantized"]["tflite"]
    lat = r["latency"]
    ui, pi = lat["unpruned_int8_tflite"]["median_ms"], lat["pruned_int8_tflite"]["median_ms"]
    agree = q["fidelity"]["top1_agreement_vs_unpruned"]
    out = [f"### EfficientNet-Lite0 ({o['fidelity']['heldout_samples']} held-out crops of held-out photos, {r['seconds']} s)", "",
           "| model | top-1 agreement with unpruned FP32 | params | MACs | size | LiteRT ms, median (rounds) |",
           "|---|---|---|---|---|---|",
           f"| unpruned FP32 .tflite | 1.0000 | {o['params']:,} | {_m(o['macs'])} | {_mb(o['size_bytes'])} (ONNX) | "
           f"{_lat(lat, 'unpruned_fp32_tflite')} |",
           f"| unpruned INT8 .tflite | {r['unpruned_int8']['top1_agreement_vs_fp32']:.4f} | {o['params']:,} | {_m(o['macs'])} | "
           f"{_mb(r['unpruned_int8']['size_bytes']['artifact'])} | {_lat(lat, 'unpruned_int8_tflite')} |",
           f"| 30% pruned, before fine-tuning (FP32) | {p['fidelity']['top1_agreement']:.4f} | {p['params']:,} | "
           f"{_m(p['macs'])} | {_mb(p['size_bytes'])} (ONNX) | - |",
           f"| 30% pruned + distilled, FP32 .tflite | {f['fidelity']['top1_agreement']:.4f} | {f['params']:,} | {_m(f['macs'])} | "
           f"{_mb(f['size_bytes'])} (ONNX) | {_lat(lat, 'pruned_fp32_tflite')} |",
           f"| 30% pruned + distilled, INT8 .tflite | {agree:.4f} | {f['params']:,} | {_m(f['macs'])} | "
           f"{_mb(q['size_bytes'])} | {_lat(lat, 'pruned_int8_tflite')} |", ""]
    speed = ui / pi if pi else 0.0
    met = speed >= 1.25 and agree >= 0.90
    tr = r["pruning"].get("training") or {}
    tr = {**tr, "losses": {"output_loss": tr.get("output_loss")}}
    out += [f"Goal: >= 1.25x faster than the unpruned INT8 .tflite at top-1 agreement >= 0.90: **{'met' if met else 'NOT met'}** "
            f"({speed:.2f}x, {ui:.2f} -> {pi:.2f} ms; agreement {agree:.4f}).", ""]
    if tr:
        out += [f"Recovery: {tr.get('steps')} steps of batch {tr.get('batch_size')} ({tr.get('epochs_done')} epochs of "
                f"{r['pruning'].get('train_samples', 'the')} training crops) in {tr.get('seconds')} s (budget "
                f"{tr.get('max_seconds')} s); loss per finished epoch {tr.get('loss_per_epoch')}; "
                f"{tr.get('losses', {}).get('output_loss')}.", ""]
    return out


def _minilm(r: dict[str, Any]) -> list[str]:
    st = r["pruning"]["stages"]
    sp, ts = r["sparsity"], r["tensorrt_sparsity"]
    tr = r["training"]
    lines = [f"### all-MiniLM-L6-v2, 2:4 sparsity for TensorRT ({st['original']['fidelity']['heldout_samples']} held-out "
             f"texts, {r['seconds']} s)", "",
             f"- Sparse layers: {len(sp['sparse_layers'])} Linear weights (every eligible one; "
             f"{len(sp['skipped'])} weighted modules left dense: {sorted(set(sp['skipped'].values()))[:3]}).",
             f"- FP32 export: {sp['onnx_fp32']['note']}.",
             f"- Pattern in the strongly typed graph (`model_strongly_typed.onnx`, `mixed` recipe): "
             f"{len(ts['sparse_nodes'])} weights hold 2:4, {ts['expected']} expected (the FP32 export's 2:4 weights), "
             f"missing {ts['missing']}: **{'verified on every pruned weight' if ts['ok'] and ts['expected'] == len(sp['onnx_fp32']['sparse_nodes']) > 0 else 'NOT verified'}**; "
             f"weight dtypes {sorted(set(ts['sparse_weight_dtypes'].values()))}.",
             f"- build_engine.sh: `{' '.join(r['build_command'] or [])}`.",
             "",
             "| stage | cosine to FP32 (mean) | cosine min | topic accuracy (probe) | params | MACs (dense) | effective MACs (2:4 halved) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("original", "pruned", "finetuned"):
        s = st[name]
        fd = s["fidelity"]
        lines.append(f"| {name} | {fd.get('cosine_mean', 1.0)} | {fd.get('cosine_min', 1.0)} | "
                     f"{fd.get('student_topic_accuracy', '-')} | {s['params']:,} | {_m(s['macs'])} | "
                     f"{_m(s.get('effective_macs_2to4')) if s.get('effective_macs_2to4') else '-'} |")
    q = st["quantized"]["tensorrt"]
    lines.append(f"| quantized (TensorRT strongly typed, run in ONNX Runtime) | "
                 f"{q['fidelity'].get('cosine_vs_unpruned', '-'):.4f} | - | - | {q['params']:,} | {_m(q['macs'])} | - |")
    lines += ["", f"Recovery: {tr.get('steps')} steps in {tr.get('seconds')} s (budget {tr.get('max_seconds')} s, "
                  f"stopped by the budget: {tr.get('stopped_by_budget')}, {tr.get('epochs_done')} epochs); losses: {tr.get('losses', {}).get('output_loss')}, "
                  f"hidden-state cosine, attention maps.", ""]
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["<!-- pruning_bench: begin (generated) -->", "## Pruning benchmark", "",
             "`nice -n 10 python benchmarks/pruning_bench.py`; raw numbers in `pruning.json`. Latency: batch 1, 1 thread, "
             "median of 30 runs after 3 warm-up runs, 5 rounds alternating the models compared (median of round medians).",
             ""]
    for part, fn in (("mnist", _mnist), ("effnet", _effnet), ("minilm", _minilm)):
        if part in results:
            lines += fn(results[part])
            lines += [f"Machine: {_machine(results[part]['machine'])}.", ""]
    lines.append("<!-- pruning_bench: end -->")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
