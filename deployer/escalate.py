"""Escalation below the fidelity floor: score each target's real artifact, keep the fewest layers high.

When a target's artifact misses the floor (:class:`deployer.judge.FidelityFloor`) on the held-out
samples, the pipeline escalates *for that target only*:

1. An ordering of the plan's INT8 layers, computed once per model and shared by all targets
   (:func:`layer_order`): recurrent and state-path nodes first (LSTM/GRU/RNN and the nodes reading
   a state input or writing a state output), then Conv/ConvTranspose/Gemm/MatMul layers by their
   one-layer-at-a-time sensitivity (the worst output's SQNR with only that layer quantized, exact
   Q/DQ arithmetic in ONNX Runtime; the layer-wise analysis of ModelOpt/AMCT).
2. Candidates keep a growing prefix of that order in higher precision (FP16 where the target has it,
   float islands on TFLite) and are *lowered by the target's own backend* and run by its own runner
   on search samples (never the held-out set): the search scores what ships
   (:class:`TargetScorer`), with :func:`deployer.mixed.search`'s geometric growth, binary search and
   give-back, bounded by a fixed number of evaluations.
3. Options tried before islands (TFLite: 16x8, int16 activations) come from the backend.

The result is reported per target; the shared top-level plan is never changed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.dataset import Sample
from deployer.errors import DeployerError
from deployer.judge import FidelityFloor, floor_margin, judge
from deployer.plan import Precision, QuantPlan

RECURRENT_OPS = ("LSTM", "GRU", "RNN", "Scan", "Loop")
DEFAULT_ESCALATION_BUDGET = 12

ContextFactory = Callable[[QuantPlan, dict[str, Any], Path], Any]
"""(plan, backend options, output dir) -> LoweringContext for the target being escalated."""


@dataclass
class TargetScorer:
    """Lowers a candidate plan with the target's backend into a scratch folder and judges its outputs.

    Calling it returns ``(margin_db, worst_sqnr_db)``: ``margin_db >= 0`` means every output reaches the
    floor on the search samples (:func:`deployer.judge.floor_margin`). ``evaluations`` counts calls, as
    :func:`deployer.mixed.search` expects of an evaluator.
    """

    backend: Any
    reference_model: onnx.ModelProto
    make_ctx: ContextFactory
    samples: Sequence[Sample]
    ref_out: list[list[np.ndarray]]
    out_names: list[str]
    task: str
    floor: FidelityFloor
    options: dict[str, Any]
    scratch: Path
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    evaluations: int = 0
    failures: list[str] = field(default_factory=list)
    """One line per candidate that could not be lowered or run (it scores -inf: never chosen)."""
    mode: str = "floor"
    """``floor``: score = :func:`deployer.judge.floor_margin` (dB, >= 0 passes); ``target``: score = the
    lowest relative primary metric over the outputs (:func:`relative_score`, a fraction of FP32)."""

    _last: tuple[QuantPlan, str, tuple[float, float]] | None = None

    def __call__(self, plan: QuantPlan, options: dict[str, Any] | None = None) -> tuple[float, float]:
        if options is None and self._last is not None and self._last[0] is plan and self._last[1] == self.mode:
            return self._last[2]  # the same plan object again (escalate's base, then search's): not re-lowered
        self.evaluations += 1
        opts = {**self.options, **(options or {}), "tflite_latency_runs": 0}
        work = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.scratch))
        try:
            art = self.backend.lower(self.make_ctx(plan, opts, work))
            if art.run is None:
                return -math.inf, -math.inf
            fid = judge(self.ref_out, art.run(self.samples), self.out_names, self.task, self.input_shapes)
        except DeployerError as e:  # a candidate that does not lower or run (e.g. LiteRT refusing an int16 op)
            self.failures.append(" ".join(str(e).split())[:200])
            return -math.inf, -math.inf
        finally:
            shutil.rmtree(work, ignore_errors=True)
        worst = fid.get("sqnr_db")
        value = floor_margin(fid, self.floor) if self.mode == "floor" else relative_score(fid)
        result = value, (math.inf if worst is None else float(worst))
        if options is None:
            self._last = (plan, self.mode, result)
        return result


def relative_score(fid: dict[str, Any]) -> float:
    """The lowest primary metric over the outputs as a fraction of FP32: top-1 / step agreement for class
    scores and sequences, cosine for embeddings, and ``1 - 10^(-SQNR/10)`` (one minus the noise-to-signal
    power ratio: 20 dB -> 0.99) for outputs judged by SQNR (maps, regression, state, one-element outputs,
    where a cosine of 1.0 says nothing)."""
    values = []
    for rec in (fid.get("outputs") or {}).values():
        if rec["metric"] == "sqnr_db":
            values.append(1.0 if rec["sqnr_db"] is None else 1.0 - 10.0 ** (-float(rec["sqnr_db"]) / 10.0))
        else:
            values.append(float(rec[rec["metric"]]))
    return min(values, default=1.0)


def state_nodes(model: onnx.ModelProto, state_inputs: Sequence[str], state_outputs: Sequence[str]) -> list[str]:
    """Recurrent nodes and the nodes that read a state input or write a state output, in graph order."""
    ins, outs = set(state_inputs), set(state_outputs)
    return [n.name for n in model.graph.node
            if n.op_type in RECURRENT_OPS or ins & set(n.input) or outs & set(n.output)]


def layer_order(plan: QuantPlan, model: onnx.ModelProto, samples: Sequence[Sample],
                first: Sequence[str] = (), progress: Callable[[int, int], None] | None = None,
                cluster: str | None = None) -> list[dict[str, Any]]:
    """The escalation order: ``first`` (state paths), then MAC layers by one-layer sensitivity, worst first.

    Each row: ``{"layer", "op_type", "sqnr_db" (worst output, only this layer INT8), "why"}``.
    Sensitivity uses the generic symmetric Q/DQ simulation (:data:`deployer.mixed.DEFAULT_SIMULATION_POLICY`)
    on ``samples`` (a few calibration samples), so it is computed once and shared by every target.
    The one-layer passes are independent tasks (:func:`layer_sqnr`, mapped by
    :func:`deployer.distributed.task_map`: here, or as Ray tasks on ``cluster``; the same rows).
    """
    from deployer.distributed import task_map
    from deployer.mixed import layers_of
    from backends.base import onnx_runner

    int8 = {n for n, d in plan.nodes.items() if d.precision == Precision.INT8}
    types = {n.name: n.op_type for n in model.graph.node}
    rows = [{"layer": n, "op_type": types.get(n, ""), "sqnr_db": None, "why": "state path"}
            for n in first if n in int8]
    ref = onnx_runner(model, optimize=False)(samples)
    layers = [n for n in layers_of(plan, model) if n not in set(first)]
    worst = task_map(layer_sqnr, [(name,) for name in layers], cluster, shared=(plan, model, list(samples), ref),
                     progress=progress)
    ranked = [{"layer": name, "op_type": types.get(name, ""), "sqnr_db": None if w is None else round(w, 3),
               "why": "sensitivity"} for name, w in zip(layers, worst)]
    ranked.sort(key=lambda r: r["sqnr_db"] if r["sqnr_db"] is not None else math.inf)
    return rows + ranked


def layer_sqnr(plan: QuantPlan, model: onnx.ModelProto, samples: Sequence[Sample], ref: list[list[np.ndarray]],
               name: str) -> float | None:
    """The worst output's SQNR (dB) with only layer ``name`` INT8 under the generic symmetric Q/DQ
    simulation, against the FP32 outputs ``ref`` of ``samples``; None when no output is judged by SQNR."""
    from backends.base import onnx_runner
    from deployer.mixed import DEFAULT_SIMULATION_POLICY, only_layers
    from deployer.qdq import for_policy, lower_qdq
    from deployer.recovery import prepare_for_lowering

    p = for_policy(only_layers(plan, [name]), DEFAULT_SIMULATION_POLICY, model)
    lowered, _ = lower_qdq(prepare_for_lowering(model, p), p, DEFAULT_SIMULATION_POLICY)
    out = onnx_runner(lowered, optimize=False)(samples)
    worst = judge(ref, out, [o.name for o in model.graph.output], "generic").get("sqnr_db")
    return None if worst is None else float(worst)


SAFETY_DB = 0.5
"""Extra margin asked of a candidate on the search samples, beyond the deficit seen on the held-out set."""


def escalate(plan: QuantPlan, model: onnx.ModelProto, order: Sequence[str], score: TargetScorer,
             high: Precision, budget: int = DEFAULT_ESCALATION_BUDGET, deficit_db: float = 0.0) -> dict[str, Any]:
    """Keep the shortest prefix of ``order`` in ``high`` precision so the target's artifact meets the floor.

    The search samples are not the held-out set: calibration samples flatter the plan (its ranges came
    from them), an example's validation crops can be harder. So a candidate must raise the margin on the
    search samples by what the held-out set missed, ``deficit_db``, plus :data:`SAFETY_DB`: the goal is
    ``base + deficit_db + SAFETY_DB`` with ``base`` the full plan's margin there. The held-out set judges
    the result afterwards.

    Returns:
        ``{"plan", "kept", "margin_db", "stopped_on" ("floor" | "budget"), "evaluations"}``; the plan is the
        best one found even when the budget ran out first.
    """
    from deployer.mixed import search

    base, _ = score(plan)
    goal = base + max(deficit_db, 0.0) + SAFETY_DB
    res = search(plan, model, score, target=goal, budget=budget, high=high, order=list(order),
                 reason=f"fidelity floor: kept in {high.value} (target {score.backend.name})")
    return {"plan": res.plan, "kept": res.kept, "margin_db": round(res.metric, 3), "goal_margin_db": round(goal, 3),
            "stopped_on": "floor" if res.stopped_on == "target" else "budget", "evaluations": score.evaluations}
