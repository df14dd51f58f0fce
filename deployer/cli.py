"""The ``deploy`` command. A thin layer: parse, call the Python API, print.

Exit codes: 0 ok (a vendor compile step reported as not run is ok), 1 an enforced gate failed,
2 bad input, 3 a requested backend cannot run at all, 4 an internal error (one line saying where to
report it; the traceback with ``--verbose``), 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from calibration.observers import OBSERVERS
from deployer.adaround import AdaRoundConfig
from deployer.distributed import add_ray_flags, ray_cluster
from deployer.errors import DeployerError
from deployer.mixed import DEFAULT_FIDELITY_TARGET
from deployer.recovery import DEFAULT_SMOOTHQUANT_ALPHA

ADAROUND_BUDGET_S = AdaRoundConfig().time_budget_s

SUBCOMMANDS = ("deploy", "plan", "check", "inspect", "verify", "targets", "examples", "recommend", "distill", "prune", "batch")
SUBCOMMAND_HELP = {
    "deploy": "calibrate, plan, lower to --target and verify (the default when no command is given)",
    "plan": "calibrate and write the plan only (plan.json)",
    "check": "check an ONNX graph against a target's rules, before any calibration",
    "inspect": "print a plan as a table",
    "verify": "re-verify an existing artifact against FP32",
    "targets": "list the targets and whether each can run here",
    "examples": "list the built-in examples",
    "recommend": "recommend a compression route for a deployment (the seed's selection rules)",
    "distill": "distil a teacher into a small student",
    "prune": "prune a PyTorch model's channels (Torch-Pruning) and recover with distillation",
    "batch": "run every deploy of a manifest (models x targets x recipes), on Ray with --ray; summary.json + index.html",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="ONNX file or built-in example name (default: efficientnet-lite0)")
    p.add_argument("--calib", metavar="DIR", help="folder of .npy/.npz calibration samples keyed by input name")
    p.add_argument("--calib-samples", type=int, help="number of calibration samples (examples: any N)")
    p.add_argument("--heldout-samples", type=int, default=300, help="held-out samples of a built-in example")
    p.add_argument("--observer", default="minmax",
                   help=f"activation observer: {' | '.join(OBSERVERS)} (default minmax)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the user statistics cache")
    p.add_argument("--ema-momentum", type=float, default=0.9, help="EMA momentum for --observer ema")
    p.add_argument("--recipe", default="int8", help="int8 | mixed | fp16 | int4 (weight-only, onnxruntime) | rules file (JSON/YAML)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example's crop split")
    p.add_argument("--fidelity-target", type=float, default=None, metavar="FRACTION", nargs="?",
                   const=DEFAULT_FIDELITY_TARGET,
                   help="mixed-precision search: keep the fewest layers in FP16/float so the primary metric "
                        f"reaches this fraction of FP32 (no value: the default target {DEFAULT_FIDELITY_TARGET})")
    p.add_argument("--search-budget", type=int, default=24, help="evaluations the search may spend (default 24)")
    p.add_argument("--enforce-gates", action="store_true",
                   help="exit 1 when a seed release gate (speed-per-fidelity, size-vs-recall) fails")
    p.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help="gate threshold, repeatable, enforced (exit 1 on fail): top1_agreement, cosine_mean, "
                        "sqnr_db, task_accuracy(_relative) pass when metric >= VALUE; speed-per-fidelity=RATIO; "
                        "size-vs-recall=MAX_LOSS")
    p.add_argument("--min-fidelity", default=None, metavar="SPEC",
                   help="fidelity floor every output must reach to ship (default cosine=0.99,sqnr_db=20); below it "
                        "the target is escalated, then marked 'does not ship' (exit 1)")
    p.add_argument("--eval", dest="eval_dir", metavar="DIR",
                   help="labelled held-out data: DIR/inputs/ samples + DIR/labels.npy")
    p.add_argument("--heldout", dest="heldout_dir", metavar="DIR",
                   help="unlabelled held-out samples (like --calib) to verify on; not with --eval")
    p.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of Conv pairs before calibration (Nagel et al. 2019; off by default)")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA", nargs="?", const=DEFAULT_SMOOTHQUANT_ALPHA,
                   help="SmoothQuant: migrate activation outliers of INT8 MatMul/Gemm inputs into the weights "
                        f"(no value: alpha {DEFAULT_SMOOTHQUANT_ALPHA}; the mixed recipe turns it on; Xiao et al. 2023)")
    p.add_argument("--no-smoothquant", action="store_true", help="no SmoothQuant, even with the mixed recipe")
    p.add_argument("--adaround", type=float, default=None, metavar="SECONDS", nargs="?", const=ADAROUND_BUDGET_S,
                   help="AdaRound: learn the rounding of per-channel INT8 weights on calibration data within this "
                        f"time budget (no value: {ADAROUND_BUDGET_S:g} s; off by default; Nagel et al. 2020)")
    p.add_argument("--adaround-iters", type=int, default=None, metavar="N",
                   help="AdaRound with N iterations per layer instead of a time budget (same bits on every run)")
    add_ray_flags(p)
    p.add_argument("--no-bias-correction", action="store_true",
                   help="do not add empirical bias correction (Nagel et al. 2019) to the plan")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--verbose", action="store_true", help="also print the worst layers (per-layer SQNR)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {SUBCOMMAND_HELP.get(name, '')}" for name in SUBCOMMANDS)
    p = argparse.ArgumentParser(
        prog="deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize once, lower to tflite / tensorrt / ascend / onnxruntime, verify each artifact.",
        epilog=f"commands (deploy COMMAND --help for each):\n{commands}\n\nexit codes: 0 ships, 1 a gate or the "
               f"fidelity floor failed, 2 bad input, 3 a backend is missing, 4 internal error, 130/143 interrupted")
    p.add_argument("--version", action="version", version=f"deploy {_version()}")
    _common(p)
    p.add_argument("--target", default="all", help="tflite,tensorrt,ascend or all (comma-separated)")
    p.add_argument("--out", default="deploy-out", metavar="DIR", help="output directory (default deploy-out)")
    p.add_argument("--plan", metavar="FILE", help="lower this plan (validated first) instead of calibrating")
    p.add_argument("--soc-version", default=None, help="Ascend SoC for atc (default Ascend310P3)")
    p.add_argument("--tflite-io", default="int8", choices=("int8", "uint8", "float"),
                   help="int8 | uint8 | float model inputs/outputs (default int8)")
    p.add_argument("--tflite-layout", default="nhwc", choices=("nhwc", "nchw"), help="nhwc | nchw (default nhwc)")
    p.add_argument("--tflite-mode", default="int8", choices=("int8", "16x8"),
                   help="tflite: int8 activations (default) or 16x8 (int16 activations, int8 weights)")
    p.add_argument("--tflite-per-tensor", action="store_true",
                   help="tflite: per-tensor weight scales (TFLite Micro and delegates without per-channel FC)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) instead of leaving ops unquantized (tflite: float ops)")
    p.add_argument("--ort-mode", default="static", choices=("static", "dynamic"),
                   help="onnxruntime target: static (QDQ, activation ranges from the plan; default) or dynamic "
                        "(INT8 weights, activations quantized at run time)")
    p.add_argument("--cpu", default="auto", metavar="ISA",
                   help="onnxruntime target: build for this deployment CPU (auto = this machine, avx2, avx512, "
                        "avx512-vnni, avx-vnni, amx, arm64); the plan is the same, only the int8 kernel flavour changes")
    p.add_argument("--input-shapes", action="append", metavar="NAME:SHAPE",
                   help="static name:1x3x224x224 or dynamic name:MIN/OPT/MAX (TensorRT profiles, ATC dynamic "
                        "profiles); repeat or comma-separate for several inputs")
    p.add_argument("--trt-version-compatible", action="store_true",
                   help="tensorrt: build a version-compatible engine (runs on later TensorRT runtimes)")
    p.add_argument("--trt-hardware-compatibility", choices=("ampere_plus", "same_compute_capability"),
                   help="tensorrt: engine hardware-compatibility level (default: this GPU only)")
    p.add_argument("--distill", metavar="STUDENT", default=None,
                   help="distil the example (--model mnist|minilm) into STUDENT (shrink, shrink:W, module:function) "
                        "first, then deploy the student; distillation outputs go to <out>/distill/")
    from deployer.distill.cli import add_train_flags

    add_train_flags(p, prefix="distill-")
    p.add_argument("--prune", metavar="RATIO|FILE", default=None,
                   help="prune channels of the example's torch model (--model mnist) by RATIO (0 < R < 1) or per layer "
                        "from a rules file, fine-tune it by distillation from the unpruned model, then deploy it; "
                        "pruning outputs go to <out>/prune/")
    p.add_argument("--sparsity", default=None, choices=("2:4",),
                   help="prune eligible weights to NVIDIA's 2:4 pattern (kept through INT8; tensorrt: --sparsity=enable)")
    from deployer.prune.cli import add_recovery_flags

    add_recovery_flags(p, prefix="prune-")
    return p


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy plan", description="Calibrate and write a plan without lowering.")
    _common(p)
    p.add_argument("--out", default="plan.json", metavar="FILE", help="plan file to write (default plan.json)")
    return p


def _print(msg: str, quiet: bool) -> None:
    if not quiet:
        from deployer.terminal import fit

        print(fit(msg), file=sys.stderr)


def _progress(enabled: bool) -> Any:
    """A ``progress(step, done, total)`` callback drawing one bar per running step on stderr, with the
    elapsed time (steps without a count report ``0/1`` then ``1/1``: the bar shows the time spent)."""
    if not enabled:
        return lambda *a: None
    state: dict[str, Any] = {"tasks": {}}

    def update(task: str, done: int, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from deployer.terminal import width

        if "p" not in state:
            state["p"] = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None),
                                  MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
                                  console=Console(file=sys.stderr, width=width()))
            state["p"].start()
        tasks = state["tasks"]
        if task not in tasks:
            tasks[task] = state["p"].add_task(task[:40], total=max(total, 1))
        state["p"].update(tasks[task], completed=done, total=max(total, 1))
        if done >= total:
            state["p"].remove_task(tasks.pop(task))
            if not tasks:
                state["p"].stop()
                del state["p"]

    return update


def _output_only(prog: str, args: Sequence[str]) -> argparse.Namespace:
    from deployer.commands import add_output_flags

    p = argparse.ArgumentParser(prog=f"deploy {prog}")
    add_output_flags(p)
    return p.parse_args(args)


def cmd_targets(args: Sequence[str]) -> int:
    from backends.base import discover

    as_json = _output_only("targets", args).json
    rows = []
    for name, b in discover().items():
        ok, why = b.available()
        rows.append({"target": name, "available": ok, "reason": why, "description": b.description})
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        from deployer.terminal import fit

        for r in rows:
            state = "available" if r["available"] else f"unavailable: {r['reason']}"
            print(fit(f"{r['target']:<10} {state}  ({r['description']})"))
        print(fit(_examples_state()))
    return 0


def _examples_state() -> str:
    """One line: which built-in examples can run here, and what the others miss."""
    import importlib.util

    from deployer.examples import EXAMPLE_MODULES, EXAMPLES_INSTALL

    ok, missing = [], []
    for name, modules in EXAMPLE_MODULES.items():
        lacks = [m for m in modules if importlib.util.find_spec(m) is None]
        (missing.append(f"{name} (needs {', '.join(lacks)})") if lacks else ok.append(name))
    text = f"examples: {', '.join(ok) or 'none'} can run here"
    if missing:
        text += f"; not {', '.join(missing)}: {EXAMPLES_INSTALL}"
    return text


def cmd_examples(args: Sequence[str]) -> int:
    from deployer.examples import DEFAULT_EXAMPLE, EXAMPLES

    if _output_only("examples", args).json:
        print(json.dumps([{"name": e.name, "description": e.description, "requires": e.requires,
                           "default": e.name == DEFAULT_EXAMPLE} for e in EXAMPLES.values()], indent=1))
    else:
        for e in EXAMPLES.values():
            flag = " (default)" if e.name == DEFAULT_EXAMPLE else ""
            print(f"{e.name}{flag}: {e.description}")
    return 0


def cmd_plan(argv: Sequence[str]) -> int:
    from deployer.pipeline import DeployOptions, plan_only

    a = _plan_parser().parse_args(argv)
    opts = DeployOptions(observer=a.observer, recipe=a.recipe, calib_samples=a.calib_samples,
                         heldout_samples=a.heldout_samples, seed=a.seed, ema_momentum=a.ema_momentum,
                         overwrite=a.overwrite, no_cache=a.no_cache,
                         bias_correction=not a.no_bias_correction, smoothquant=a.smoothquant, no_smoothquant=a.no_smoothquant, equalize=a.equalize,
                         adaround=a.adaround, adaround_iters=a.adaround_iters, cluster=ray_cluster(a),
                         fidelity_target=a.fidelity_target, search_budget=a.search_budget,
                         enforce_gates=a.enforce_gates, eval_dir=a.eval_dir)
    plan = plan_only(a.model, a.calib, a.out, opts, _progress(not (a.quiet or a.json) and sys.stderr.isatty()))
    if a.json:
        print(json.dumps({"plan": a.out, "nodes": len(plan.nodes), "ranges": len(plan.ranges)}))
    else:
        _print(f"plan written to {a.out}: {len(plan.nodes)} nodes, {len(plan.ranges)} ranges", a.quiet)
    return 0


def cmd_check(argv: Sequence[str]) -> int:
    """``deploy check --target T M.onnx``: run a backend's graph checker on any ONNX model.

    Exit 0 when no error-level finding, 1 when the model breaks a rule, 2 on bad input.
    """
    from backends.base import discover
    from deployer.errors import BadInputError
    from deployer.model_io import load_onnx

    p = argparse.ArgumentParser(prog="deploy check", description="Check an ONNX model against a backend's rules.")
    p.add_argument("model", help="ONNX file to check")
    p.add_argument("--target", required=True, help="backend whose rules to apply (tensorrt, ascend, ...)")
    p.add_argument("--json", action="store_true", help="findings as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--verbose", action="store_true", help="accepted on every subcommand; check already prints every finding")
    a = p.parse_args(argv)
    backends = discover()
    if a.target not in backends:
        raise BadInputError(f"unknown target {a.target!r}; `deploy targets` lists: {', '.join(sorted(backends))}")
    backend = backends[a.target]
    checker = getattr(backend, "check", None)
    if checker is None:
        raise BadInputError(f"target {a.target!r} has no graph checker; checkers exist for: "
                            f"{', '.join(n for n, b in backends.items() if hasattr(b, 'check'))}")
    findings = checker(load_onnx(a.model))
    errors = [f for f in findings if f.severity == "error"]
    if a.json:
        print(json.dumps({"model": a.model, "target": a.target, "ok": not errors,
                          "findings": [f.to_dict() for f in findings]}, indent=1))
    elif not a.quiet:
        for f in findings:
            print(str(f))
        print(f"{a.model}: {len(errors)} error(s), {len(findings) - len(errors)} warning(s) for {a.target}")
    return 1 if errors else 0


def cmd_deploy(argv: Sequence[str]) -> int:
    from deployer.gates import parse_gates
    from deployer.pipeline import DeployOptions, run_deploy

    a = build_parser().parse_args(argv)
    from deployer.shapes import parse_input_shapes

    backend_options: dict[str, Any] = {"tflite_io": a.tflite_io, "tflite_layout": a.tflite_layout,
                                       "input_shapes": parse_input_shapes(a.input_shapes)}
    if a.soc_version:
        backend_options["soc_version"] = a.soc_version
    backend_options["ort_mode"] = a.ort_mode
    from deployer.cpu import parse_cpu

    backend_options["cpu"] = parse_cpu(a.cpu)  # a bad value: one line, exit 2, before any model work
    backend_options["tflite_mode"] = a.tflite_mode
    backend_options["tflite_per_tensor"] = a.tflite_per_tensor
    backend_options["strict"] = a.strict
    backend_options["trt_version_compatible"] = a.trt_version_compatible
    backend_options["trt_hardware_compatibility"] = a.trt_hardware_compatibility
    opts = DeployOptions(targets=a.target, observer=a.observer, recipe=a.recipe, calib_samples=a.calib_samples,
                         heldout_samples=a.heldout_samples, seed=a.seed, ema_momentum=a.ema_momentum,
                         overwrite=a.overwrite, no_cache=a.no_cache, backend_options=backend_options,
                         bias_correction=not a.no_bias_correction, smoothquant=a.smoothquant, no_smoothquant=a.no_smoothquant, equalize=a.equalize,
                         adaround=a.adaround, adaround_iters=a.adaround_iters, cluster=ray_cluster(a),
                         fidelity_target=a.fidelity_target, search_budget=a.search_budget,
                         enforce_gates=a.enforce_gates, gates=parse_gates(a.gate), eval_dir=a.eval_dir,
                         min_fidelity=a.min_fidelity,
                         heldout_dir=a.heldout_dir)
    log = (lambda s: None) if (a.quiet or a.json) else (lambda s: _print(s, False))
    from deployer.errors import GateFailedError

    from deployer.prune.cli import deploy_options_from

    prune_opts = deploy_options_from(a)  # checked before any model work
    if prune_opts is not None and a.distill is not None:
        from deployer.errors import BadInputError

        raise BadInputError("--prune/--sparsity and --distill in one run are not supported; distil first "
                            "(deploy distill), then prune the student (deploy prune --model ...)")
    try:
        if prune_opts is not None:
            from deployer.pipeline import preflight
            from deployer.prune.run import deploy_with_prune

            opts = preflight(opts, with_plan=a.plan is not None)
            result = deploy_with_prune(a.model, a.out, opts, prune_opts,
                                       progress=_progress(not (a.quiet or a.json) and sys.stderr.isatty()), log=log,
                                       prune_progress=not (a.quiet or a.json) and sys.stderr.isatty(),
                                       calib=a.calib, plan=a.plan)
        elif a.distill is not None:
            from deployer.distill.cli import options_from
            from deployer.distill.run import deploy_with_distill
            from deployer.pipeline import preflight

            opts = preflight(opts, with_plan=a.plan is not None)  # before any training

            result = deploy_with_distill(a.model, a.distill, a.out, opts, options_from(a, "distill_"),  # type: ignore[arg-type]
                                         progress=_progress(not (a.quiet or a.json) and sys.stderr.isatty()), log=log,
                                         distill_progress=not (a.quiet or a.json) and sys.stderr.isatty(),
                                         calib=a.calib, plan=a.plan)
        else:
            result = run_deploy(a.model, a.calib, a.out, opts, a.plan,
                                progress=_progress(not (a.quiet or a.json) and sys.stderr.isatty()), log=log)
    except GateFailedError as e:  # outputs were written: show them, then exit 1
        written = getattr(e.result, "report", None)
        if written is not None and a.json:
            print(json.dumps(written, indent=1, sort_keys=True))
        elif written is not None and not a.quiet:
            print(format_table(written))
        if written is not None:
            _save_log(getattr(e.result, "out_dir", ""))
        raise
    if a.json:
        print(json.dumps(result.report, indent=1, sort_keys=True))
    elif not a.quiet:
        print(format_table(result.report))
        if a.verbose:
            for row in result.report.get("layers", {}).get("layers", [])[:10]:
                _print(f"  {row['node']:<40} {row['op_type']:<12} {row['precision']:<5} SQNR {row['sqnr_db']} dB", False)
        from deployer.terminal import fit

        print(fit(f"\nwrote {result.out_dir}/ (plan.json, report.json, report.html, log.txt, artifacts)"))
    _save_log(result.out_dir)
    from deployer.commands import exit_code_for_report

    return exit_code_for_report(result.report)


def _save_log(out_dir: Any) -> None:
    """Third-party output captured during the run (:func:`deployer.terminal.captured_stderr`) as
    ``<out>/log.txt``."""
    from pathlib import Path

    from deployer.terminal import captured_log

    from deployer.output_dir import add_to_manifest

    text = captured_log()
    out = Path(out_dir)
    if out.is_dir():
        (out / "log.txt").write_text(text or "(no third-party output during this run)\n", encoding="utf-8")
        add_to_manifest(out, ["log.txt"])  # written by this command: a later --overwrite may replace it


def format_table(report: dict[str, Any]) -> str:
    """The short terminal table: one row per target (verdict, worst-output fidelity, size), fitted to
    ``COLUMNS`` (80 when not a terminal); details are in report.json / report.html and under --verbose."""
    import shutil as _shutil

    from rich.console import Console
    from rich.table import Table

    table = Table(title="deploy: each target against FP32 on held-out samples")
    for col in ("target", "verdict", "fidelity (worst output)", "size vs FP32"):
        table.add_column(col, overflow="fold")
    for name, t in report["targets"].items():
        fid = t.get("fidelity") or {}
        parts = [f"top-1 {fid['top1_agreement']:.3f}"] if isinstance(fid.get("top1_agreement"), float) else []
        if isinstance(fid.get("cosine_mean"), float):
            parts.append(f"cos {fid['cosine_mean']:.4f}")
        if "sqnr_db" in fid:
            parts.append("SQNR inf" if fid["sqnr_db"] is None else f"SQNR {fid['sqnr_db']:.1f} dB")
        if fid.get("samples"):
            parts.append(f"n={fid['samples']}")
        size = t.get("size_bytes") or {}
        ratio = (f"{size['artifact'] / 1e6:.2f} MB ({100 * size['ratio']:.1f}%)" if size.get("ratio") else
                 f"{size['artifact'] / 1e6:.2f} MB" if size.get("artifact") else "-")
        verdict = t.get("verdict") or {}
        ships = verdict.get("ships")
        word = "ships" if ships else "FAILED" if t.get("error") else "does not ship" if ships is False else "?"
        table.add_row(name, word, ", ".join(parts) or "not measured", ratio)
    width = _shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 80))
    console = Console(file=None, width=width, no_color=not sys.stdout.isatty(), force_terminal=False)
    with console.capture() as cap:
        console.print(table)
        for name, t in report["targets"].items():
            verdict = t.get("verdict") or {}
            if verdict and not verdict.get("ships"):
                console.print(f"{name}: {verdict.get('reason', '')}", soft_wrap=False, overflow="fold")
    return cap.get()


@contextlib.contextmanager
def _silenced_stderr(enabled: bool) -> Iterator[None]:
    """Under ``--quiet``: send file descriptor 2 to /dev/null (TensorFlow, LiteRT/XNNPACK and ONNX Runtime
    print from C++; Python warnings too). Restored before any error message or traceback is printed."""
    if not enabled:
        yield
        return
    import warnings

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deploy`` console script; returns the exit code."""
    from deployer.terminal import captured_stderr, quiet_libraries

    args = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()  # before TensorFlow / LiteRT are imported
    original_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _usage_error  # type: ignore[method-assign,assignment]
    previous_term = _on_sigterm_interrupt()
    try:
        quiet = "--quiet" in args
        with _silenced_stderr(quiet), (contextlib.nullcontext() if quiet else captured_stderr()):
            return _dispatch(args)
    except DeployerError as e:
        print(f"deploy: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        term = str(e) == f"signal {int(signal.SIGTERM)}"
        print(f"deploy: interrupted by {'SIGTERM' if term else 'SIGINT'}; nothing was written (no partial output "
              f"is left behind)", file=sys.stderr)
        return 143 if term else 130  # 128 + signal number, as shells report
    except Exception as e:  # a bug, not bad input: exit 4, one line; the traceback with --verbose
        if "--verbose" in args:
            traceback.print_exc()
        where = f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins.")
        print(f"deploy: internal error: {where}: {_one_line(str(e))[:300]}; please report it at {REPORT_AT} "
              f"(with the command{'' if '--verbose' in args else ' and the traceback that --verbose prints'})",
              file=sys.stderr)
        return INTERNAL_ERROR
    finally:
        argparse.ArgumentParser.error = original_error  # type: ignore[method-assign]
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


INTERNAL_ERROR = 4
REPORT_AT = "the project's issue tracker (README.md, section \"Reporting a bug\")"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _on_sigterm_interrupt() -> Any:
    """Turn SIGTERM into ``KeyboardInterrupt("signal 15")`` for the whole command (calibration included),
    so that it ends with one line and exit 143 after every temporary output is removed. Returns the
    previous handler (None outside the main thread, where signals cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, on_term)


def _usage_error(self: argparse.ArgumentParser, message: str) -> None:
    """argparse's usage errors as one line through the common error path (exit 2), also under --quiet
    (argparse itself prints the whole usage text to stderr, which --quiet silences)."""
    from deployer.errors import BadInputError

    raise BadInputError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _version() -> str:
    from deployer import __version__

    return __version__


def _dispatch(args: list[str]) -> int:
    """Run the subcommand named by ``args[0]`` (default: deploy).

    Raises:
        BadInputError: an unknown command word (with the closest command as a suggestion).
    """
    if args and args[0] in ("--version", "-V"):
        print(f"deploy {_version()}")
        return 0
    if args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
        import difflib

        from deployer.errors import BadInputError

        close = difflib.get_close_matches(args[0], SUBCOMMANDS, n=1, cutoff=0.6)
        hint = f"did you mean `deploy {close[0]}`?" if close else f"commands: {', '.join(SUBCOMMANDS)}"
        raise BadInputError(f"unknown command {args[0]!r}; {hint} (see `deploy --help`)")
    if args and args[0] == "targets":
        return cmd_targets(args[1:])
    if args and args[0] == "examples":
        return cmd_examples(args[1:])
    if args and args[0] == "plan":
        return cmd_plan(args[1:])
    if args and args[0] == "check":
        return cmd_check(args[1:])
    if args and args[0] == "distill":
        from deployer.distill.cli import cmd_distill

        return cmd_distill(args[1:])
    if args and args[0] == "prune":
        from deployer.prune.cli import cmd_prune

        return cmd_prune(args[1:])
    if args and args[0] == "batch":
        from deployer.batch import cmd_batch

        return cmd_batch(args[1:])
    if args and args[0] == "recommend":
        from deployer.recommend import cmd_recommend

        return cmd_recommend(args[1:])
    if args and args[0] in ("inspect", "verify"):
        from deployer import commands

        return commands.cmd_inspect(args[1:]) if args[0] == "inspect" else commands.cmd_verify(args[1:])
    if args and args[0] == "deploy":
        return cmd_deploy(args[1:])
    if not args or all(a in ("--quiet", "--json", "--verbose") for a in args):
        if not ("--quiet" in args or "--json" in args):
            print("deploy: no options given: quantizing the built-in example (EfficientNet-Lite0, real ImageNet "
                  "weights) for tflite, tensorrt and ascend into deploy-out/ (a few minutes); Ctrl-C stops it, "
                  "`deploy --help` lists the options", file=sys.stderr)
    return cmd_deploy(args)


if __name__ == "__main__":
    sys.exit(main())
