"""Lower -> verify -> floor -> verdict, for one target.

Each target is delivered on its own: a target whose backend refuses the graph, or whose converter child
process crashes, is reported as failed (``error``: exit code and one-line message; ``verdict.ships``
false) while the other targets still deliver. A target whose artifact misses the fidelity floor
(:class:`deployer.judge.FidelityFloor`) is escalated for that target (:mod:`deployer.escalate`); if it
still misses, it is marked "does not ship" and the built-in ``fidelity-floor`` gate fails (exit 1).

Exit codes per target (the run's is the highest): 0 ships; 1 a gate failed (the fidelity floor is
always enforced); 2 the target cannot lower this graph or its converter crashed; 3 its backend or a
dependency is missing.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from backends.base import Artifact, Backend, LoweringContext
from deployer.errors import DeployerError
from deployer.gates import NOT_EVALUATED, GateConfig, evaluate_gates, speed_warning
from deployer.escalate import SAFETY_DB
from deployer.judge import FidelityFloor, below_floor, floor_margin
from deployer.plan import Precision, QuantPlan
from deployer.qdq import for_policy
from deployer.results import Fidelity, GateResult, SpeedRecord, Verdict
from deployer.verify import fidelity

if TYPE_CHECKING:
    from deployer.pipeline import DeployOptions, Inputs

Progress = Callable[[str, int, int], None]
FLOOR_GATE = "fidelity-floor"
ESCALATION_ROUNDS = 2
"""Escalation rounds per target: after each, the held-out set judges; a remaining miss raises the goal."""


@dataclass
class TargetResult:
    """One target's outcome (the ``targets.<name>`` entry of ``report.json``)."""

    target: str
    artifact: str
    size_bytes: dict[str, int | None]
    fidelity: Fidelity
    verified_by: str
    notes: list[str]
    extra: dict[str, Any]

    @property
    def verdict(self) -> Verdict:
        """Whether this target ships, and why (``{"ships": bool, "reason": str}``)."""
        return cast(Verdict, self.extra.get("verdict") or {"ships": False, "reason": "not judged"})

    @property
    def gates(self) -> dict[str, GateResult]:
        """``gates.<name>`` of the report (:mod:`deployer.gates`)."""
        return cast("dict[str, GateResult]", self.extra.get("gates") or {})

    @property
    def speed(self) -> SpeedRecord | None:
        """The speed record where this target was timed here, else None."""
        return cast("SpeedRecord | None", self.extra.get("speed"))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "artifact": self.artifact, "size_bytes": self.size_bytes,
                "fidelity": self.fidelity, "verified_by": self.verified_by, "notes": self.notes, **self.extra}


@dataclass
class Shared:
    """What every target of one run shares: the escalation order is computed once, on first need."""

    order: list[dict[str, Any]] | None = None
    kept: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    """Each target's first output on the first :data:`KEPT_SAMPLES` held-out samples (float32, flattened),
    for the report's parity table (targets against each other on the same samples)."""


KEPT_SAMPLES = 64


def target_plan(backend: Backend, plan: QuantPlan, reference: Any, options: dict[str, Any]) -> QuantPlan:
    """``plan`` as ``backend`` lowers it under ``options`` (its Q/DQ policy; AdaRound bits it can honour)."""
    out = for_policy(plan, getattr(backend, "qdq_policy", None), reference)
    honours = getattr(backend, "honours_rounding", None)
    if out.rounding and honours is not None and not honours(options):
        out = dataclasses.replace(out, rounding={})
    return out


def make_context(backend: Backend, plan: QuantPlan, inputs: Inputs, options: dict[str, Any],
                 out_dir: Path) -> LoweringContext:
    """The lowering context of ``backend`` for ``plan`` (weight adjustments applied for that plan)."""
    from deployer.recovery import prepare_for_lowering

    tplan = target_plan(backend, plan, inputs.reference, options)
    return LoweringContext(prepare_for_lowering(inputs.reference, tplan), tplan, out_dir, inputs.calibration,
                           dict(options), fp32_reference=inputs.reference)


def failed_target(name: str, error: DeployerError) -> TargetResult:
    """The report entry of a target that could not deliver (no artifact)."""
    msg = " ".join(str(error).split())
    return TargetResult(name, "", {"fp32": None, "artifact": None}, {}, "not verified: no artifact", [msg],
                        {"error": {"exit_code": error.exit_code, "message": msg},
                         "verdict": {"ships": False, "reason": f"failed: {msg}"[:300]}, "float_nodes": []})


def input_shapes(inputs: Inputs) -> dict[str, tuple[int, ...]]:
    first = inputs.heldout[0] if len(inputs.heldout) else {}
    return {k: tuple(np.shape(v)) for k, v in dict(first).items()}


def lower_and_verify(backend: Backend, ctx: LoweringContext, ref_out: list[list[np.ndarray]], out_names: list[str],
                     inputs: Inputs, tmp: Path, kept: dict[str, list[np.ndarray]] | None = None) -> TargetResult:
    """Lower ``ctx.plan`` with ``backend``, run the artifact on the held-out samples and judge every output."""
    art: Artifact = backend.lower(ctx)
    fid: dict[str, Any] = {}
    outputs = None
    if art.run is not None:
        outputs = art.run(inputs.heldout)
        fid = fidelity(ref_out, outputs, out_names, inputs.task, input_shapes(inputs))
    fp32_size = art.fp32_path.stat().st_size if art.fp32_path and art.fp32_path.exists() else None
    size: dict[str, Any] = {"fp32": fp32_size, "artifact": art.path.stat().st_size}
    if fp32_size:
        size["ratio"] = round(size["artifact"] / fp32_size, 4)
    extra = {k: v for k, v in art.extra.items()}
    extra.setdefault("float_nodes", [])
    if art.throughput is not None:  # the speed record (deployer.speed) and its older aliases
        from deployer.speed import aliases

        extra["speed"] = art.throughput(inputs.heldout)
        extra.update(aliases(extra["speed"]))
    if outputs is not None:
        if kept is not None:
            kept[backend.name] = [np.asarray(o[0], dtype=np.float32).ravel() for o in outputs[:KEPT_SAMPLES]]
        fid.update(task_metrics(inputs, ref_out, outputs))
        if inputs.labels is not None:
            extra["labelled"] = {"fp32": labelled_metrics(ref_out, inputs.labels),
                                 "artifact": labelled_metrics(outputs, inputs.labels)}
    return TargetResult(backend.name, str(art.path.relative_to(tmp)), size, cast(Fidelity, fid), art.verified_by,
                        art.notes, extra)


_FP32_TASK: dict[int, dict[str, float]] = {}
RESERVED_FIDELITY_KEYS = frozenset({"outputs", "samples", "sqnr_db", "cosine_mean", "top1_agreement",
                                    "top1_agreement_ci95", "worst_output", "warning"})


def task_metrics(inputs: Inputs, ref_out: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> dict[str, Any]:
    """The example's or user's task metric for the artifact, FP32's, and their ratio (``*_relative``)."""
    if inputs.metric is None:
        return {}
    key = id(ref_out)
    if key not in _FP32_TASK:
        _FP32_TASK.clear()
        _FP32_TASK[key] = inputs.metric(ref_out)
    fp32 = _FP32_TASK[key]
    art = inputs.metric(outputs)
    out: dict[str, Any] = {}
    for given, v in art.items():
        name = f"task_{given}" if given in RESERVED_FIDELITY_KEYS else given  # never overwrites a judged record
        out[name] = v
        out[f"{name}_fp32"] = fp32.get(given)
        if fp32.get(given):
            out[f"{name}_relative"] = round(v / fp32[given], 6)
    return out


def labelled_metrics(outputs: list[list[np.ndarray]], labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro recall of arg-max predictions of output 0 against integer labels."""
    pred = np.array([int(np.argmax(o[0])) for o in outputs])
    lab = labels.astype(np.int64)
    recalls = [float(np.mean(pred[lab == c] == c)) for c in np.unique(lab)]
    return {"accuracy": round(float(np.mean(pred == lab)), 6), "recall": round(float(np.mean(recalls)), 6)}


def search_samples(inputs: Inputs, n: int = 64) -> list[Any]:
    """Samples that score candidates: the example's validation split, else calibration samples (never held-out)."""
    if inputs.validation is not None:
        pool = inputs.validation
    else:
        pool = inputs.calibration
    step = max(1, len(pool) // n)
    return list(pool[::step][:n])


@dataclass
class _Scoring:
    score: Any
    order: list[str]
    scratch: Path


def _scoring(backend: Backend, plan: QuantPlan, inputs: Inputs, opts: DeployOptions, floor: FidelityFloor,
             tmp: Path, out_names: list[str], shared: Shared, progress: Progress, log: Callable[[str], None],
             mode: str) -> _Scoring:
    """A scorer of ``backend``'s real artifact on search samples and the shared escalation order."""
    from backends.base import onnx_runner
    from deployer.escalate import TargetScorer, layer_order, state_nodes

    samples = search_samples(inputs)
    ref = onnx_runner(inputs.reference)(samples)
    shapes = input_shapes(inputs)
    scratch = tmp / ".escalation"
    scratch.mkdir(exist_ok=True)
    score = TargetScorer(backend, inputs.reference, lambda p, o, d: make_context(backend, p, inputs, o, d), samples, ref, out_names,
                         inputs.task, floor, dict(opts.backend_options), scratch, shapes, mode=mode)
    if shared.order is None:
        fid0 = fidelity(ref, ref, out_names, inputs.task, shapes)
        state_out = [n for n, r in fid0["outputs"].items() if r["kind"] == "state"]
        state_in = [i.name for i in inputs.reference.graph.input
                    if any(i.name.split("_")[0].lower() in o.lower() for o in state_out)] if state_out else []
        log("ranking layers by sensitivity (computed once, shared by every target) ...")
        shared.order = layer_order(plan, inputs.reference, samples[:16],
                                   state_nodes(inputs.reference, state_in, state_out),
                                   progress=lambda d, t: progress("sensitivity", d, t), cluster=opts.cluster)
    return _Scoring(score, [r["layer"] for r in shared.order], scratch)


def _escalate(backend: Backend, plan: QuantPlan, scoring: _Scoring, options: dict[str, Any],
              deficit_db: float, judged_out: list[dict[str, Any]] | None = None
              ) -> tuple[QuantPlan, dict[str, Any], dict[str, Any]]:
    """(escalated plan, backend options to lower it with, report section)."""
    from deployer.escalate import escalate

    score = scoring.score
    section: dict[str, Any] = {"samples": f"{len(score.samples)} search samples (never the held-out set)",
                               "tried": []}
    tries = [o for o in getattr(backend, "escalation_options", lambda o: [])(options)
             if o not in (judged_out or [])]  # options the held-out set already failed are not retried
    base = score(plan)[0] if tries else 0.0  # the same goal as the islands' (deployer.escalate.escalate)
    for extra_opts in tries:
        margin, _ = score(plan, extra_opts)
        section["tried"].append({"options": extra_opts, "margin_db": round(margin, 3)})
        if margin >= base + max(deficit_db, 0.0) + SAFETY_DB:
            section.update({"stopped_on": "floor", "kept": [], "evaluations": score.evaluations})
            return plan, {**options, **extra_opts}, section
    high = _escalation_precision(backend, options)
    if high is None:
        section.update({"stopped_on": "no islands (--strict)", "kept": [], "evaluations": score.evaluations})
        return plan, options, section
    res = escalate(plan, _model_of(score), scoring.order, score, high, deficit_db=deficit_db)
    section.update({k: v for k, v in res.items() if k != "plan"})
    section["precision"] = high.value
    if score.failures:
        section["failed_candidates"] = list(score.failures)
    return res["plan"], options, section


def _search(backend: Backend, plan: QuantPlan, scoring: _Scoring, target: float,
            budget: int) -> tuple[QuantPlan, dict[str, Any]]:
    """``--fidelity-target`` for this target: the fewest layers in higher precision so that *its* artifact
    reaches ``target`` (lowest relative primary metric over the outputs) on the search samples."""
    from deployer.mixed import search

    high = _escalation_precision(backend, dict(scoring.score.options)) or Precision.FP16
    res = search(plan, _model_of(scoring.score), scoring.score, target=target, budget=budget, high=high,
                 order=scoring.order, reason=f"fidelity target {target} on {backend.name}: kept in {high.value}")
    section = res.to_dict()
    section.update({"scored_on": f"{backend.name} artifact, {len(scoring.score.samples)} search samples "
                                 f"(never the held-out set)", "metric": "lowest relative primary metric over outputs",
                    "precision": high.value})
    new_plan = res.plan.with_nodes(res.plan.nodes, {**res.plan.recipe, "search": {
        "fidelity_target": target, "budget": budget, "kept": res.kept, "target": backend.name}})
    return new_plan, section


def _escalation_precision(backend: Backend, options: dict[str, Any]) -> Precision | None:
    """The precision escalated layers take on ``backend`` (FP16 unless it says otherwise; None: no islands)."""
    fn = getattr(backend, "escalation_precision", None)
    return Precision.FP16 if fn is None else fn(options)


def _model_of(score: Any) -> Any:
    return score.reference_model


def mark_foreign_cpu(res: TargetResult, built_for: str | None, machine: str | None = None) -> None:
    """Mark ``res``'s speed records ``same_cpu: false`` when the artifact was built for another CPU
    architecture (a backend's ``artifact_cpu``, e.g. ``"arm"`` for TFLite) than this machine's: speed is
    judged only on the CPU an artifact was built for (:mod:`deployer.gates`)."""
    import platform

    if not built_for:
        return
    here = (machine or platform.machine()).lower()
    arm = here.startswith(("arm", "aarch64"))
    same = arm if built_for == "arm" else here == built_for.lower()
    for key in ("speed", "latency_ms", "throughput_qps"):
        rec = res.extra.get(key)
        if isinstance(rec, dict) and not same:
            rec.update(same_cpu=False, built_for=built_for, measured_on=here)


def deliver(backend: Backend, plan: QuantPlan, inputs: Inputs, opts: DeployOptions, tmp: Path,
            ref_out: list[list[np.ndarray]], out_names: list[str], floor: FidelityFloor, escalate_ok: bool,
            shared: Shared, progress: Progress, log: Callable[[str], None]) -> TargetResult:
    """Lower, verify, escalate below the floor, and give the verdict of one target.

    Args:
        escalate_ok: False with a user-given plan (``--plan``): nothing is escalated, a miss fails.

    Raises:
        DeployerError: the target cannot deliver (the caller records it with :func:`failed_target`).
    """
    options = dict(opts.backend_options)
    scoring: _Scoring | None = None
    notes: list[str] = []
    searched: dict[str, Any] | None = None
    try:
        if opts.fidelity_target is not None and escalate_ok:
            log(f"{backend.name}: mixed-precision search for fidelity target {opts.fidelity_target} ...")
            scoring = _scoring(backend, plan, inputs, opts, floor, tmp, out_names, shared, progress, log, "target")
            plan, searched = _search(backend, plan, scoring, float(opts.fidelity_target), opts.search_budget)
            scoring.score.mode = "floor"
            if searched["kept_high_precision"]:
                notes.append(f"fidelity target {opts.fidelity_target}: {len(searched['kept_high_precision'])} layer(s) "
                             f"kept in {searched['precision']} for this target; its plan is {backend.name}/plan.json")
        res = lower_and_verify(backend, make_context(backend, plan, inputs, options, tmp), ref_out, out_names,
                               inputs, tmp, shared.kept)
        misses = below_floor(res.fidelity, floor) if res.fidelity else []
        section: dict[str, Any] = {"floor": floor.to_dict(), "escalated": False}
        if misses and escalate_ok:
            log(f"{backend.name}: below the fidelity floor ({misses[0]}); escalating ...")
            if scoring is None:
                scoring = _scoring(backend, plan, inputs, opts, floor, tmp, out_names, shared, progress, log, "floor")
            base_plan, deficit = plan, -floor_margin(res.fidelity, floor)
            judged_out: list[dict[str, Any]] = []
            section.update({"escalated": True, "rounds": [],
                            "before": {"misses": misses, "sqnr_db": res.fidelity.get("sqnr_db")}})
            for _ in range(ESCALATION_ROUNDS):  # the held-out set judges each round; a miss asks for more
                new_plan, new_options, esc = _escalate(backend, base_plan, scoring, dict(opts.backend_options),
                                                       deficit, judged_out)
                section["rounds"].append(esc)
                section.setdefault("escalation", esc)
                esc["applied"] = bool(esc.get("kept")) or new_options != dict(opts.backend_options)
                if not esc["applied"]:
                    break  # nothing to change: the search found no better candidate
                shutil.rmtree(tmp / backend.name, ignore_errors=True)
                plan, options = new_plan, new_options
                section["escalation"] = esc  # the round whose plan and options were applied
                res = lower_and_verify(backend, make_context(backend, plan, inputs, options, tmp), ref_out,
                                       out_names, inputs, tmp, shared.kept)
                misses = below_floor(res.fidelity, floor) if res.fidelity else []
                if not misses:
                    break
                extra = {k: v for k, v in new_options.items() if opts.backend_options.get(k) != v}
                if extra and not esc.get("kept"):
                    judged_out.append(extra)  # these options alone missed on the held-out set: islands next
                else:
                    deficit += max(-floor_margin(res.fidelity, floor), 0.0) + SAFETY_DB
            if plan is not base_plan or options != dict(opts.backend_options):
                esc = section["escalation"]
                notes.append(f"escalated for the fidelity floor: {len(esc.get('kept', []))} layer(s) kept in "
                             f"{esc.get('precision', 'higher precision')}"
                             + (f", options {options}" if options != dict(opts.backend_options) else "")
                             + f"; its plan is {backend.name}/plan.json")
    finally:
        if scoring is not None:
            shutil.rmtree(scoring.scratch, ignore_errors=True)
    if searched is not None or section["escalated"]:
        (tmp / backend.name).mkdir(parents=True, exist_ok=True)
        plan.save(tmp / backend.name / "plan.json")
    if searched is not None:
        res.extra["mixed_precision"] = searched
    res.notes.extend(notes)
    section["misses"] = misses
    section["passed"] = not misses
    res.extra["fidelity_floor"] = section
    mark_foreign_cpu(res, getattr(backend, "artifact_cpu", None))
    gates = evaluate_gates({"fidelity": res.fidelity, "size_bytes": res.size_bytes, **res.extra},
                           GateConfig(dict(opts.gates or {})))
    gates[FLOOR_GATE] = ({"status": "fail", "enforced": True, "misses": misses} if misses else
                         {"status": "pass", "enforced": True} if res.fidelity else
                         {"status": NOT_EVALUATED, "enforced": True, "reason": "artifact not run here"})
    res.extra["gates"] = gates
    warning = speed_warning({"fidelity": res.fidelity, "size_bytes": res.size_bytes, **res.extra})
    if warning:
        res.extra["speed_warning"] = warning
    if misses:
        why = "below the fidelity floor" + (" (a given plan is not escalated)" if section["escalated"] is False and
                                            not escalate_ok else " after escalation" if section["escalated"] else "")
        res.extra["verdict"] = {"ships": False, "reason": f"{why}: {'; '.join(misses[:3])}"}
    elif not res.fidelity:
        res.extra["verdict"] = {"ships": True, "reason": "not verified here (no runner): fidelity not judged"}
    else:
        worst = res.fidelity.get("worst_output")
        sq = res.fidelity.get("sqnr_db")
        res.extra["verdict"] = {"ships": True, "reason": f"every output meets the floor (worst: {worst}, SQNR "
                                                         f"{'inf' if sq is None else sq} dB, cosine "
                                                         f"{res.fidelity.get('cosine_mean')})"}
    return res
