"""Long fuzz runs of ``deploy plan`` / ``deploy check`` outside CI (the CI pass is ``tests/test_fuzz.py``).

The mutation stream is the one the CI test uses (same seed, same index -> same model), so a crasher
found here is replayed there by adding ``(seed, index, note)`` to ``REGRESSIONS``.

Usage::

    python benchmarks/fuzz_long.py --seconds 3600 --count 100000 --seed 0
    python benchmarks/fuzz_long.py --seed 0 --only 431            # replay one mutation, show its traceback
    python benchmarks/fuzz_long.py --seconds 600 --save crashers/  # keep crashing models and a summary

Exit code 0 when every run honoured the contract (no traceback escaped; failures are DeployerErrors),
1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_fuzz import calib_dirs, fuzz, make_case, problems, run_case  # noqa: E402


def replay(seed: int, index: int) -> int:
    """Run one mutation with tracebacks visible (``deployer.cli.main`` lets non-DeployerErrors escape)."""
    from deployer.cli import main

    case = make_case(seed, index)
    print(f"#{index} base {case.base}: {case.steps}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        calib = calib_dirs(work)
        model = work / "m.onnx"
        model.write_bytes(case.data)
        rc_plan = main(["plan", "--model", str(model), "--calib", str(calib[case.base]), "--out", str(work / "p.json"),
                        "--no-cache", "--no-bias-correction"])
        rc_check = main(["check", "--target", "tensorrt", str(model)])
    print(f"plan exit {rc_plan}, check exit {rc_check}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3600.0, help="time bound (default 3600)")
    p.add_argument("--count", type=int, default=100_000, help="mutation bound (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="mutation stream (default 0, the CI stream)")
    p.add_argument("--start", type=int, default=0, help="first mutation index")
    p.add_argument("--only", type=int, help="replay this one mutation index with its traceback")
    p.add_argument("--save", type=Path, help="folder for crashing models (NNN.onnx) and summary.json")
    a = p.parse_args(argv)
    if a.only is not None:
        return replay(a.seed, a.only)
    codes: Counter[tuple[str, int | None]] = Counter()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        done, bad = fuzz(a.seed, a.seconds, a.count, Path(d), start=a.start,
                         on_outcome=lambda o: codes.update([(o.command, o.exit_code)]))
    wall = time.monotonic() - t0
    kinds = Counter(p[0].split(" at ")[0][:160] for _, p in bad)
    summary = {"seed": a.seed, "start": a.start, "mutations": done, "seconds": round(wall, 1),
               "exit_codes": {f"{c}:{rc}": n for (c, rc), n in sorted(codes.items(), key=str)},
               "violations": [{"index": o.case.index, "base": o.case.base, "steps": o.case.steps, "command": o.command,
                               "problems": p} for o, p in bad],
               "kinds": dict(kinds)}
    print(f"fuzz: seed {a.seed}, {done} mutations in {wall:.0f} s ({done / max(wall, 1e-9):.1f}/s), "
          f"{len(bad)} violations")
    for kind, n in kinds.most_common():
        print(f"  {n:4d} x {kind}")
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
        for o, _ in bad:
            (a.save / f"{o.case.index:06d}.onnx").write_bytes(o.case.data)
        (a.save / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
