"""``deploy prune`` and the ``deploy --prune / --sparsity`` flags: parse, call :mod:`deployer.prune.run`, print.

Everything here is checked before torch or a model is loaded (bad input: one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from deployer.commands import add_output_flags
from deployer.prune.options import CRITERIA, PruneOptions, load_rules, parse_prune_flag


def add_recovery_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Flags shared by ``deploy prune`` and ``deploy --prune`` (the latter with ``prefix="prune-"``)."""
    p.add_argument(f"--{prefix}criterion", default="l1", help=f"channel importance: {' | '.join(CRITERIA)} (default l1)")
    p.add_argument(f"--{prefix}round-to", type=int, default=None, metavar="N",
                   help="keep pruned channel counts a multiple of N (8 or 16 suit tensor cores)")
    p.add_argument(f"--{prefix}epochs", type=int, default=3,
                   help="recovery fine-tuning epochs, distilling from the unpruned model (default 3; 0 = none)")
    p.add_argument(f"--{prefix}alpha", type=float, default=0.5,
                   help="weight of the KD term against the task loss where labels exist (default 0.5)")
    p.add_argument(f"--{prefix}temperature", type=float, default=4.0, help="KD temperature (default 4)")
    p.add_argument(f"--{prefix}lr", type=float, default=None, help="Adam learning rate (default per task)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=None, help="batch size (default per task)")
    p.add_argument(f"--{prefix}max-seconds", type=float, default=None, help="wall-time budget of the fine-tuning")
    p.add_argument(f"--{prefix}threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def options_from(a: argparse.Namespace, prefix: str = "", **fixed: Any) -> PruneOptions:
    """PruneOptions from parsed flags (raises BadInputError on a bad value)."""
    g = lambda name: getattr(a, prefix + name)  # noqa: E731
    return PruneOptions(criterion=g("criterion"), round_to=g("round_to"), epochs=g("epochs"), alpha=g("alpha"),
                        temperature=g("temperature"), lr=g("lr"), batch_size=g("batch_size"),
                        max_seconds=g("max_seconds"), threads=g("threads"), **fixed)


def deploy_options_from(a: argparse.Namespace) -> PruneOptions | None:
    """``deploy --prune R|FILE [--sparsity 2:4]`` -> PruneOptions, or None when neither flag is given."""
    if a.prune is None and a.sparsity is None:
        return None
    ratio, rules, default, source = (None, [], 0.0, "") if a.prune is None else parse_prune_flag(a.prune)
    return options_from(a, "prune_", ratio=ratio, rules=rules, default=default, source=source, sparsity=a.sparsity)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy prune",
                                description="Prune channels (Torch-Pruning) and/or prune to 2:4 sparsity, fine-tune by "
                                            "distillation from the unpruned model, write pruned.onnx / pruned.pt / "
                                            "pruning_report.json.")
    p.add_argument("--model", required=True,
                   help="example:mnist | example:minilm | pkg.module:factory returning the trained torch module")
    p.add_argument("--ratio", default=None, help="fraction of channels to remove from each prunable layer, 0 < R < 1")
    p.add_argument("--rules", default=None, metavar="FILE",
                   help="per-layer ratios: YAML/JSON {rules: [{match: PATTERN, ratio: R}], default: R}")
    p.add_argument("--sparsity", default=None, choices=("2:4",), help="prune eligible weights to NVIDIA's 2:4 pattern")
    p.add_argument("--data", default=None,
                   help="example:NAME (default: the model's example) or a folder of .npy/.npz samples with optional "
                        "labels.npy (required for a factory model)")
    p.add_argument("--out", default="prune-out", metavar="DIR", help="output directory (default prune-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and batch order (default 0)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples kept for the later deploy")
    p.add_argument("--heldout-samples", type=int, default=None, help="held-out samples of the fidelity report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_recovery_flags(p)
    add_output_flags(p)
    return p


def cmd_prune(argv: Sequence[str]) -> int:
    """``deploy prune ...``; exit 0, 2 on bad input, 3 when a package is missing."""
    from deployer.errors import BadInputError
    from deployer.prune.options import check_ratio

    a = build_parser().parse_args(argv)
    ratio = check_ratio(a.ratio, "--ratio") if a.ratio is not None else None
    rules, default = load_rules(a.rules) if a.rules is not None else ([], 0.0)
    if a.ratio is not None and a.rules is not None:
        raise BadInputError("give either --ratio or --rules (a rules file sets its own 'default' ratio)")
    opts = options_from(a, ratio=ratio, rules=rules, default=default, sparsity=a.sparsity, seed=a.seed,
                        calib_samples=a.calib_samples, heldout_samples=a.heldout_samples, overwrite=a.overwrite,
                        source=a.rules or (f"--ratio {a.ratio}" if a.ratio else ""))
    quiet = a.quiet or a.json

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    from deployer.prune.run import run_prune

    res = run_prune(a.model, a.data, a.out, opts, progress=not quiet and sys.stderr.isatty(), log=log)
    r = res.report
    if a.json:
        print(json.dumps(r, indent=1, sort_keys=True))
    elif not a.quiet:
        st = r["pruning"]["stages"]
        o, f = st["original"], st["finetuned"]
        print(f"pruned: {f['params']:,} parameters ({100 * f['params'] / o['params']:.1f}% of {o['params']:,}), "
              f"{f['macs']:,} MACs ({100 * f['macs'] / o['macs']:.1f}%); held-out vs unpruned: "
              + ", ".join(f"{k} {v}" for k, v in f["fidelity"].items() if isinstance(v, float)))
        if "sparsity" in r:
            print(f"2:4 sparse layers: {', '.join(r['sparsity']['sparse_layers'])}")
        print(f"wrote {res.out_dir}/ (pruned.onnx, pruned.pt, pruning_report.json)")
    return 0
