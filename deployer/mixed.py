"""Mixed precision: per-layer sensitivity and the search for the fewest high-precision layers.

Sensitivity (one layer at a time, as in ModelOpt's and AMCT's layer-wise analysis and ONNX Runtime's
``qdq_loss_debug``): for each INT8 layer of the plan, quantize *only* that layer, run the Q/DQ graph
in ONNX Runtime (exact Q/DQ arithmetic) and measure the output SQNR and the task metric against FP32.

Search (greedy by sensitivity, Dong et al. 2019 "HAWQ" ordering idea with a measured instead of a
Hessian score): start from the full-INT8 plan; if it misses the fidelity target, move the most
sensitive layers to FP16 (TensorRT, Ascend, ONNX Runtime) / float (TFLite) in growing groups, then
binary-search the smallest prefix that meets the target, then give kept layers back to INT8 (most MACs
first) while the target still holds. Every evaluation counts against a fixed
budget, so the result is deterministic; the search says whether it stopped on the target or on the
budget.

The search evaluates on *calibration* samples, never on the held-out set that the report uses, so the
reported fidelity is not tuned on itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from backends.base import onnx_runner
from calibration.dataset import Sample
from deployer.graph import GraphView, weight_channel_axis
from deployer.plan import NodeDecision, Precision, QuantPlan
from deployer.qdq import QdqPolicy, for_policy, lower_qdq
from deployer.verify import cosine_mean, sqnr_db, top1_agreement

Outputs = list[list[np.ndarray]]


class PlanScorer(Protocol):
    """Scores a plan: ``(metric, worst SQNR dB)``, higher is better; counts its calls in ``evaluations``."""

    evaluations: int

    def __call__(self, plan: QuantPlan) -> tuple[float, float]:
        ...

Metric = Callable[[Outputs, Outputs], float]
"""(reference outputs, candidate outputs) -> metric value, higher is better, 1.0 = FP32."""

DEFAULT_FIDELITY_TARGET = 0.99
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _per_channel_axis(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    return None if node.op_type == "MatMul" and w.ndim != 2 else weight_channel_axis(node)


DEFAULT_SIMULATION_POLICY = QdqPolicy(
    weighted_ops=frozenset(MAC_OPS), per_channel=_per_channel_axis, activation_ops=frozenset({"Add"}),
    residual_skip_only=True, symmetric_activations=True, fp16=True, opset=17,
)
"""Simulator used by the search when no requested target exposes a ``qdq_policy``."""
DEFAULT_BUDGET = 24


def relative_metric(task: str) -> Metric:
    """The primary metric as a fraction of FP32: top-1 agreement (classifiers), else mean cosine."""
    if task == "classification":
        return lambda ref, out: top1_agreement(np.concatenate([r[0] for r in ref]), np.concatenate([o[0] for o in out]))
    return lambda ref, out: cosine_mean(np.concatenate([r[0] for r in ref]), np.concatenate([o[0] for o in out]))


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul node (batch as in the model's shapes)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    view = GraphView(model)
    for name, arr in view.constants.items():
        shapes.setdefault(name, list(arr.shape))
    macs: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not out or not w:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            k = int(np.prod(w[2:])) if len(w) > 2 else 1
            cin_per_group = w[1] if node.op_type == "Conv" else w[0] // max(group, 1)
            macs[node.name] = int(np.prod(out)) * cin_per_group * k
        else:
            a = shapes.get(node.input[0]) or []
            kdim = a[-1] if a else w[0]
            if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) and len(a) >= 2:
                kdim = a[-2]
            macs[node.name] = int(np.prod(out)) * int(kdim)
    return macs


def int8_mac_fraction(plan: QuantPlan, macs: dict[str, int]) -> float:
    """Fraction of MatMul/Gemm/Conv MACs computed in INT8 under ``plan``."""
    total = sum(macs.values())
    if not total:
        return 0.0
    return sum(v for n, v in macs.items() if plan.precision_of(n) == Precision.INT8) / total


def layers_of(plan: QuantPlan, model: onnx.ModelProto) -> list[str]:
    """The INT8 layers the search may move: nodes with MACs (Conv/Gemm/MatMul) in graph order."""
    return [n.name for n in model.graph.node if n.op_type in MAC_OPS and plan.precision_of(n.name) == Precision.INT8]


def with_precision(plan: QuantPlan, names: Sequence[str], precision: Precision, reason: str,
                   model: onnx.ModelProto | None = None) -> QuantPlan:
    """``plan`` with ``names`` moved to ``precision``; with ``model``, a residual ``Add`` reading a moved
    layer's output moves too (its own Q/DQ would otherwise keep the block's error)."""
    nodes = dict(plan.nodes)
    moved = set(names)
    if model is not None:
        view = GraphView(model)
        for n in names:
            for out in view.nodes[n].output:
                for c in view.consumers.get(out, []):
                    if c.op_type == "Add" and c.name in nodes and nodes[c.name].precision == Precision.INT8:
                        moved.add(c.name)
    for n in sorted(moved):
        d = nodes[n]
        nodes[n] = NodeDecision(d.op_type, precision, None if precision != Precision.INT8 else d.weight, reason)
    return plan.with_nodes(nodes)


def only_layers(plan: QuantPlan, keep: Sequence[str]) -> QuantPlan:
    """``plan`` with every node FP32 except ``keep`` (and non-MAC nodes as they were)."""
    keep_set = set(keep)
    nodes = {n: d for n, d in plan.nodes.items() if d.op_type not in MAC_OPS or n in keep_set}
    return plan.with_nodes(nodes)


@dataclass
class Evaluator:
    """Runs a plan's Q/DQ simulation on fixed samples and scores it against FP32 (counts evaluations).

    ``model`` is the FP32 reference; each plan is lowered from it with its own weight adjustments
    (:func:`deployer.recovery.prepare_for_lowering`).
    """

    model: onnx.ModelProto
    samples: Sequence[Sample]
    policy: QdqPolicy
    metric: Metric
    evaluations: int = 0
    _ref: Outputs | None = None

    def reference(self) -> Outputs:
        if self._ref is None:
            self._ref = onnx_runner(self.model, optimize=False)(self.samples)
        return self._ref

    def __call__(self, plan: QuantPlan) -> tuple[float, float]:
        """(metric, output-0 SQNR in dB)."""
        from deployer.recovery import prepare_for_lowering

        self.evaluations += 1
        plan = for_policy(plan, self.policy, self.model)
        lowered, _ = lower_qdq(prepare_for_lowering(self.model, plan), plan, self.policy)
        out = onnx_runner(lowered, optimize=False)(self.samples)
        ref = self.reference()
        sq = sqnr_db(np.concatenate([r[0] for r in ref]), np.concatenate([o[0] for o in out]))
        return self.metric(ref, out), sq


@dataclass
class SearchResult:
    """Outcome of :func:`search`.

    Attributes:
        plan: the chosen plan.
        kept: layers moved to high precision, most sensitive first.
        metric: metric of the chosen plan on the search samples.
        target: the fidelity target (fraction of FP32).
        stopped_on: ``"target"`` (met, possibly with no layer moved) or ``"budget"``.
        evaluations: evaluations spent (sensitivity + search).
        int8_mac_fraction: fraction of Conv/Gemm/MatMul MACs still INT8.
        sensitivity: ranked table rows (layer, op, sqnr_db, metric, macs), worst first.
    """

    plan: QuantPlan
    kept: list[str]
    metric: float
    target: float
    stopped_on: str
    evaluations: int
    int8_mac_fraction: float
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kept_high_precision": self.kept, "metric_on_search_samples": round(self.metric, 6),
                "fidelity_target": self.target, "stopped_on": self.stopped_on, "evaluations": self.evaluations,
                "int8_mac_fraction": round(self.int8_mac_fraction, 4), "sensitivity": self.sensitivity}


def sensitivity(plan: QuantPlan, model: onnx.ModelProto, evaluate: PlanScorer,
                macs: dict[str, int] | None = None,
                progress: Callable[[int, int], None] | None = None, cluster: str | None = None) -> list[dict[str, Any]]:
    """Quantize one layer at a time; rows sorted worst first (lowest metric, then lowest SQNR).

    The one-layer evaluations are independent: with ``cluster`` they run as Ray tasks
    (:func:`deployer.distributed.score_plans`), with the same rows as in this process."""
    from deployer.distributed import score_plans

    macs = macs if macs is not None else node_macs(model)
    view = GraphView(model)
    names = layers_of(plan, model)
    rows = []
    scores = score_plans(evaluate, [only_layers(plan, [name]) for name in names], cluster, progress)
    for name, (m, sq) in zip(names, scores):
        rows.append({"layer": name, "op_type": view.nodes[name].op_type, "metric": round(m, 6),
                     "sqnr_db": round(sq, 3) if np.isfinite(sq) else None, "macs": macs.get(name, 0)})
    # SQNR first: finer-grained and less noisy than agreement on a few samples
    rows.sort(key=lambda r: (r["sqnr_db"] if r["sqnr_db"] is not None else float("inf"), r["metric"]))
    return rows


def search(plan: QuantPlan, model: onnx.ModelProto, evaluate: PlanScorer, target: float = DEFAULT_FIDELITY_TARGET,
           budget: int = DEFAULT_BUDGET, high: Precision = Precision.FP16,
           progress: Callable[[int, int], None] | None = None, rank_with: PlanScorer | None = None,
           order: Sequence[str] | None = None, reason: str | None = None,
           cluster: str | None = None) -> SearchResult:
    """Find a short list of layers to keep in ``high`` precision so that the metric >= ``target``.

    Args:
        plan: the full-INT8 plan (from the recipe).
        model: the model the plan lowers (bias correction applied).
        evaluate: the evaluator (samples, simulator policy, metric).
        target: fidelity target as a fraction of FP32 (the metric is already relative).
        budget: maximum search evaluations after the sensitivity pass (deterministic stop).
        rank_with: a cheaper evaluator (fewer samples) for the one-layer-at-a-time ranking; default
            ``evaluate``.
        order: a ranking computed elsewhere (most sensitive first): no sensitivity pass is run.
        reason: the reason written into each moved node's decision.
        cluster: run the sensitivity pass as Ray tasks (:mod:`deployer.distributed`); same result.

    Returns:
        :class:`SearchResult` (stopped on target or budget).
    """
    macs = node_macs(model)
    base_metric, _ = evaluate(plan)
    if base_metric >= target:
        return SearchResult(plan, [], base_metric, target, "target", evaluate.evaluations,
                            int8_mac_fraction(plan, macs), [])
    table = [] if order is not None else sensitivity(plan, model, rank_with or evaluate, macs, progress, cluster)
    order = list(order) if order is not None else [r["layer"] for r in table]
    reason = reason or f"mixed-precision search: kept in {high.value} to reach fidelity target {target}"
    tried: dict[int, float] = {0: base_metric}
    spent = 0

    def trial(k: int) -> float:
        nonlocal spent
        if k not in tried:
            spent += 1
            tried[k] = evaluate(with_precision(plan, order[:k], high, reason, model))[0]
        return tried[k]

    # grow geometrically until the target is met, then binary-search the smallest prefix
    lo, hi, k = 0, None, 1
    while k <= len(order) and spent < budget:
        if trial(k) >= target:
            hi = k
            break
        lo, k = k, k * 2
    if hi is None and spent < budget and len(order) not in tried:
        if trial(len(order)) >= target:
            hi = len(order)
    if hi is not None:
        while hi - lo > 1 and spent < budget:
            mid = (lo + hi) // 2
            if trial(mid) >= target:
                hi = mid
            else:
                lo = mid
        best = hi
        stopped = "target" if tried[best] >= target else "budget"
    else:
        best = max(tried, key=lambda j: (tried[j], -j))
        stopped = "budget"
    kept, metric = list(order[:best]), tried[best]
    if stopped == "target" and spent < budget:
        kept, metric, spent = _prune(plan, model, evaluate, kept, metric, target, budget - spent, high, reason, macs,
                                     spent)
    final = with_precision(plan, kept, high, reason, model)
    spent_total = evaluate.evaluations + (rank_with.evaluations if rank_with is not None else 0)
    return SearchResult(final, kept, metric, target, stopped, spent_total, int8_mac_fraction(final, macs), table)


def _prune(plan: QuantPlan, model: onnx.ModelProto, evaluate: PlanScorer, kept: list[str], metric: float,
           target: float, left: int, high: Precision, reason: str, macs: dict[str, int],
           spent: int) -> tuple[list[str], float, int]:
    """Give kept layers back to INT8, most MACs first, while the target still holds (budget permitting).

    The sensitivity ranking is measured one layer at a time, so a prefix of it can hold layers that
    are harmless once their neighbours are high precision; each removal is one evaluation.
    Returns (kept layers, their metric, evaluations spent in total).
    """
    for name in sorted(kept, key=lambda n: -macs.get(n, 0)):
        if left <= 0 or len(kept) <= 1:
            break
        trial = [k for k in kept if k != name]
        m = evaluate(with_precision(plan, trial, high, reason, model))[0]
        left, spent = left - 1, spent + 1
        if m >= target:
            kept, metric = trial, m
    return kept, metric, spent
