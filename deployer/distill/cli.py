"""``deploy distill``: parse, call :func:`deployer.distill.run_distill`, print (a thin layer like the others)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from deployer.commands import add_output_flags


def add_train_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Flags shared by ``deploy distill`` and ``deploy --distill`` (the latter with ``prefix="distill-"``)."""
    p.add_argument(f"--{prefix}epochs", type=int, default=5, help="distillation epochs (default 5)")
    p.add_argument(f"--{prefix}alpha", type=float, default=0.5,
                   help="weight of the KD term against the task loss, in [0, 1] (default 0.5)")
    p.add_argument(f"--{prefix}temperature", default="4",
                   help="KD temperature: a number, or 'learn' (learnable, kept in [3, 10]) (default 4)")
    p.add_argument(f"--{prefix}qat-epochs", type=int, default=1,
                   help="quantization-aware fine-tuning epochs with the student's PTQ plan (default 1; 0 = none)")
    p.add_argument(f"--{prefix}max-seconds", type=float, default=None,
                   help="wall-time budget of the distillation phase (a checkpoint is kept; --resume continues)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=None, help="batch size (default per task: 64 / 16 / 32)")
    p.add_argument(f"--{prefix}lr", type=float, default=None, help="Adam learning rate (default per task)")
    p.add_argument(f"--{prefix}threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(f"--{prefix}resume", action="store_true",
                   help="continue from the checkpoint an interrupted run left beside --out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy distill",
                                description="Distil a teacher into a small student, fine-tune it with fake "
                                            "quantization, write student.onnx / student.pt / distill_report.json.")
    p.add_argument("--teacher", required=True,
                   help="example:mnist | example:minilm | module:function returning the trained torch module")
    p.add_argument("--student", default="shrink",
                   help="shrink (transformer: every other layer; CNN: width for <= 1/4 parameters) | shrink:W | "
                        "module:function (may take the teacher as argument) (default shrink)")
    p.add_argument("--data", default=None,
                   help="example:NAME (default: the teacher's example) or a folder of .npy/.npz samples "
                        "(leading axis = samples) with optional labels.npy")
    p.add_argument("--out", default="distill-out", metavar="DIR", help="output directory (default distill-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, initialisation and batch order (default 0)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples for the QAT plan")
    p.add_argument("--heldout-samples", type=int, default=None, help="held-out samples of the fidelity report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_train_flags(p)
    add_output_flags(p)
    return p


def options_from(a: argparse.Namespace, prefix: str = "") -> object:
    from deployer.distill.run import DistillOptions, parse_temperature

    g = lambda name: getattr(a, prefix + name)  # noqa: E731
    return DistillOptions(epochs=g("epochs"), alpha=g("alpha"), temperature=parse_temperature(g("temperature")),
                          qat_epochs=g("qat_epochs"), max_seconds=g("max_seconds"), batch_size=g("batch_size"),
                          lr=g("lr"), threads=g("threads"), resume=g("resume"))


def cmd_distill(argv: Sequence[str]) -> int:
    """``deploy distill ...``; exit 0, 2 on bad input, 3 when an example's packages are missing."""
    from deployer.distill.run import DistillOptions, run_distill

    a = build_parser().parse_args(argv)
    opts = options_from(a)
    assert isinstance(opts, DistillOptions)
    opts.seed, opts.calib_samples, opts.heldout_samples = a.seed, a.calib_samples, a.heldout_samples
    opts.overwrite = a.overwrite
    quiet = a.quiet or a.json

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    try:
        res = run_distill(a.teacher, a.student, a.data, a.out, opts,
                          progress=not quiet and sys.stderr.isatty(), log=log)
    except KeyboardInterrupt:
        from deployer.distill.run import checkpoint_dir

        print(f"deploy distill: interrupted; no output was written; the checkpoint in {checkpoint_dir(a.out)} lets "
              f"the same command with --resume continue", file=sys.stderr)
        return 130
    r = res.report
    if a.json:
        print(json.dumps(r, indent=1, sort_keys=True))
    elif not a.quiet:
        f = r["fidelity"]
        parts = [f"{k} {v}" for k, v in f.items() if isinstance(v, float)]
        print(f"student: {r['student']['parameters']:,} parameters ({100 * r['parameter_ratio']:.1f}% of the teacher's "
              f"{r['teacher']['parameters']:,}); held-out: {', '.join(parts)}")
        print(f"wrote {res.out_dir}/ (student.onnx, student.pt, distill_report.json)")
    return 0
