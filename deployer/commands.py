"""The ``deploy inspect`` and ``deploy verify`` subcommands, and the exit-code rule for several targets.

Kept beside :mod:`deployer.cli` (which dispatches to them) so each subcommand stays a thin layer: parse,
call the Python API, print. Every subcommand takes ``--json`` (machine-readable output on stdout, see
``deployer/schemas/``), ``--quiet`` (only errors) and ``--verbose`` (progress messages on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BACKEND_UNAVAILABLE = 3


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--quiet``, ``--verbose``: the same on every subcommand."""
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--verbose", action="store_true", help="print each step on stderr")


def use_color(stream: Any = None) -> bool:
    """Colours only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org)."""
    s = sys.stdout if stream is None else stream
    return bool(getattr(s, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def gate_failed(gates: Any) -> bool:
    """Whether a target's ``gates`` entry holds an enforced gate that failed.

    Reads the shapes a gate report can take: ``{"passed": false, "enforced": true}``, a list of such
    dicts, a dict of named gates, or ``status``/``outcome`` strings ``fail``/``failed``. A gate marked
    ``"enforced": false`` never fails the run.
    """
    if isinstance(gates, list):
        return any(gate_failed(g) for g in gates)
    if not isinstance(gates, dict):
        return False
    if gates.get("enforced", True) is False:
        return False
    state = gates.get("status", gates.get("outcome"))
    if gates.get("passed") is False or (isinstance(state, str) and state.lower() in ("fail", "failed")):
        return True
    return any(gate_failed(v) for v in gates.values() if isinstance(v, (dict, list)))


def worst(codes: Iterable[int]) -> int:
    """The exit code of several targets: the worst one (3 > 2 > 1 > 0)."""
    return max(codes, default=EXIT_OK)


def exit_code_for_report(report: dict[str, Any]) -> int:
    """The worst target's code: 0; 1 a failed enforced gate (the ``fidelity-floor`` gate always is);
    2 a vendor step (``atc``) ran and failed, or the target could not lower (``error``); 3 its backend
    was missing. A vendor step not run (tool not installed) is not a failure."""
    def code(t: dict[str, Any]) -> int:
        if isinstance(t.get("error"), dict):  # the target could not deliver (its code: 1, 2 or 3)
            return int(t["error"].get("exit_code", EXIT_BAD_INPUT))
        if (t.get("vendor_step") or {}).get("status") == "failed":
            return EXIT_BAD_INPUT
        return EXIT_GATE_FAILED if gate_failed(t.get("gates")) else EXIT_OK

    return worst(code(t) for t in report.get("targets", {}).values())


def cmd_inspect(argv: Sequence[str]) -> int:
    """``deploy inspect plan.json``: the plan as a table (``--json``: rows, ``inspect.schema.json``)."""
    from deployer.inspect_plan import plan_summary, render_table
    from deployer.plan import QuantPlan

    p = argparse.ArgumentParser(prog="deploy inspect", description="Print a plan as a readable table.")
    p.add_argument("plan", help="plan.json to show (older schema versions are migrated on load)")
    add_output_flags(p)
    a = p.parse_args(argv)
    plan = QuantPlan.load(a.plan)
    if a.json:
        print(json.dumps(plan_summary(plan, a.plan), indent=1))
    elif not a.quiet:
        sys.stdout.write(render_table(plan, a.plan, color=use_color()))
    return EXIT_OK


def cmd_verify(argv: Sequence[str]) -> int:
    """``deploy verify ARTIFACT --data DIR [--reference M.onnx] [--out DIR]``."""
    from deployer.reverify import VerifyOptions, verify_artifact

    p = argparse.ArgumentParser(prog="deploy verify",
                                description="Re-verify an existing artifact against the FP32 model on given data.")
    p.add_argument("artifact", help=".onnx (QDQ / strongly typed) or .tflite artifact")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of .npy/.npz samples keyed by input name")
    p.add_argument("--reference", metavar="M.onnx", help="FP32 ONNX model (default: model_fp32.onnx beside the artifact)")
    p.add_argument("--out", default="verify-out", metavar="DIR", help="output directory (default verify-out)")
    p.add_argument("--target", help="name of the artifact's target in the report (default: its folder name)")
    p.add_argument("--tflite-layout", default="nhwc", help="nhwc | nchw input layout of a .tflite (default nhwc)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_output_flags(p)
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        if a.verbose and not a.quiet:
            print(msg, file=sys.stderr)

    r = verify_artifact(a.artifact, a.data, a.reference, a.out,
                        VerifyOptions(target=a.target, layout=a.tflite_layout, overwrite=a.overwrite), log=log)
    if a.json:
        print(json.dumps(r.report, indent=1, sort_keys=True))
    elif not a.quiet:
        from deployer.cli import format_table

        print(format_table(r.report))
        print(f"\nwrote {r.out_dir}/ (report.json, report.html)")
    return exit_code_for_report(r.report)
