"""``deploy batch MANIFEST.yaml``: release builds of many models x targets x recipes, one deploy per entry.

Every entry is one :func:`deployer.pipeline.run_deploy` into ``<out>/<name>/``, run in this process
one after another, or each as a Ray task with ``--ray`` (:func:`deployer.distributed.task_map`; the
entry's model and calibration are read by path on the worker). A failing entry is recorded with its
exit code and one-line message and the others still run; a worker that dies is retried by Ray and,
if it keeps dying, only its entry is marked failed (exit 4). At the end ``<out>/summary.json`` and
``<out>/index.html`` list every entry's verdict per target, exit code and report link; the command
exits with the highest entry code (0 ok, 1 a gate or the fidelity floor, 2 bad input, 3 a missing
backend, 4 an internal error).

Manifest (YAML or JSON)::

    defaults:            # optional, applied to every entry (an entry's own keys win)
      calib_samples: 64
    entries:
      - name: effnet-trt         # output folder (unique; default: model stem + index)
        model: efficientnet-lite0  # example name or .onnx path (relative to the manifest)
        calib: calib/            # folder of .npy/.npz samples (optional for examples)
        targets: [tensorrt, onnxruntime]
        recipe: int8
        min_fidelity: cosine=0.99,sqnr_db=20
        enforce_gates: true      # release gates exit 1 (the fidelity floor always does)

Entry keys: :data:`ENTRY_KEYS`. An unknown key, a missing ``model``, duplicate names or an
unreadable manifest are refused before any entry runs (exit 2, nothing written).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployer.errors import BadInputError, DeployerError

ENTRY_KEYS = ("name", "model", "calib", "targets", "recipe", "min_fidelity", "enforce_gates", "observer",
              "calib_samples", "heldout_samples", "seed", "fidelity_target", "search_budget", "heldout",
              "adaround_iters", "ort_mode")
PATH_KEYS = ("calib", "heldout")
INTERNAL = 4
REPORT_BUGS = "please report it with the manifest entry and `deploy --version`"


def load_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The manifest's entries with defaults applied, names filled in and paths made absolute.

    Raises:
        BadInputError: unreadable file, not a mapping with an ``entries`` list, unknown keys, an entry
            without ``model``, duplicate or unsafe names.
    """
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadInputError(f"manifest {p} cannot be read ({e.strerror}); give a YAML file with 'entries'") from None
    except yaml.YAMLError as e:
        raise BadInputError(f"manifest {p} is not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not data["entries"]:
        raise BadInputError(f"manifest {p} needs a non-empty 'entries' list (see `deploy batch --help`)")
    extra = sorted(set(data) - {"entries", "defaults"})
    if extra:
        raise BadInputError(f"manifest {p}: unknown top-level key(s) {extra}; use 'entries' and 'defaults'")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise BadInputError(f"manifest {p}: 'defaults' must be a mapping of entry keys")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(data["entries"]):
        if not isinstance(raw, dict):
            raise BadInputError(f"manifest {p}: entry {i} is not a mapping; give model, targets, ... keys")
        ent = {**defaults, **raw}
        unknown = sorted(set(ent) - set(ENTRY_KEYS))
        if unknown:
            raise BadInputError(f"manifest {p}: entry {i} has unknown key(s) {unknown}; allowed: {', '.join(ENTRY_KEYS)}")
        if not ent.get("model"):
            raise BadInputError(f"manifest {p}: entry {i} has no 'model' (an example name or a .onnx path)")
        model = str(ent["model"])
        if model.endswith(".onnx") or "/" in model:
            ent["model"] = str((p.parent / model).resolve())
        for k in PATH_KEYS:
            if ent.get(k):
                ent[k] = str((p.parent / str(ent[k])).resolve())
        if isinstance(ent.get("targets"), list):
            ent["targets"] = ",".join(str(t) for t in ent["targets"])
        name = str(ent.get("name") or f"{Path(model).stem}-{i}")
        if not name or "/" in name or name.startswith(".") or name in ("summary.json", "index.html"):
            raise BadInputError(f"manifest {p}: entry {i} name {name!r} is not a plain folder name")
        ent["name"] = name
        out.append(ent)
    names = [e["name"] for e in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"manifest {p}: duplicate entry name(s) {dup}; give each entry its own 'name'")
    return out


def run_entry(entry: dict[str, Any], out_root: str, overwrite: bool) -> dict[str, Any]:
    """Run one manifest entry into ``<out_root>/<name>``; never raises: the record says what happened.

    Returns:
        ``{"name", "model", "targets", "exit_code", "verdicts": {target: {"ships", "reason"}},
        "error": str | None, "seconds", "report": relative path or None}``.
    """
    from deployer.commands import exit_code_for_report
    from deployer.errors import GateFailedError
    from deployer.pipeline import DeployOptions, run_deploy

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"name": entry["name"], "model": entry["model"], "targets": entry.get("targets", "all"),
                           "exit_code": 0, "verdicts": {}, "error": None, "report": None}
    report: dict[str, Any] | None = None
    try:
        backend_options: dict[str, Any] = {"ort_mode": entry["ort_mode"]} if entry.get("ort_mode") else {}
        opts = DeployOptions(targets=entry.get("targets", "all"), recipe=entry.get("recipe", "int8"),
                             observer=entry.get("observer", "minmax"), calib_samples=entry.get("calib_samples"),
                             heldout_samples=int(entry.get("heldout_samples", 300)), seed=int(entry.get("seed", 0)),
                             min_fidelity=entry.get("min_fidelity"), enforce_gates=bool(entry.get("enforce_gates")),
                             fidelity_target=entry.get("fidelity_target"),
                             search_budget=int(entry.get("search_budget", 24)), heldout_dir=entry.get("heldout"),
                             adaround_iters=entry.get("adaround_iters"), overwrite=overwrite,
                             backend_options=backend_options)
        result = run_deploy(entry["model"], entry.get("calib"), Path(out_root) / entry["name"], opts)
        report = result.report
        rec["exit_code"] = exit_code_for_report(report)
    except GateFailedError as e:
        report = getattr(e.result, "report", None)
        rec["exit_code"], rec["error"] = e.exit_code, _line(e)
    except DeployerError as e:
        rec["exit_code"], rec["error"] = e.exit_code, _line(e)
    except Exception as e:  # an internal error of this entry must not stop the others
        rec["exit_code"] = INTERNAL
        rec["error"] = f"internal error ({type(e).__name__}: {_line(e)}); {REPORT_BUGS}"
        rec["traceback"] = traceback.format_exc(limit=8)
    if report is not None:
        rec["verdicts"] = {t: r.get("verdict", {}) for t, r in report.get("targets", {}).items()}
        rec["report"] = f"{entry['name']}/report.html"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def run_batch(manifest: str | Path, out: str | Path, cluster: str | None = None, overwrite: bool = False,
              log: Any = None) -> dict[str, Any]:
    """Run every entry of ``manifest`` (sequentially, or as Ray tasks on ``cluster``) and write
    ``summary.json`` and ``index.html`` in ``out``.

    Returns:
        The summary (``entries``: one record per entry, in manifest order; ``exit_code``: the highest).

    Raises:
        BadInputError: a bad manifest, or ``out`` holds files and ``overwrite`` is off (before any entry runs).
    """
    from deployer.distributed import connect, task_map

    entries = load_manifest(manifest)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise BadInputError(f"--out {root} is a file; give a folder for the batch outputs")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise BadInputError(f"{root} is not empty; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    ray_info = None
    if cluster is not None:  # before anything is written: no Ray, no output folder
        info = connect(cluster, announce=f"{len(entries)} shards (one deploy per entry)")
        ray_info = {"address": info.address, "workers": info.workers}
    root.mkdir(parents=True, exist_ok=True)

    def done(k: int, n: int) -> None:
        if log:
            log(f"batch: {k}/{n} entries finished")

    recs = task_map(run_entry, [(e, str(root.resolve()), overwrite) for e in entries], cluster,
                    progress=done, return_exceptions=True)
    records = []
    for e, r in zip(entries, recs):
        if isinstance(r, BaseException):  # the worker died on every retry: only this entry fails
            r = {"name": e["name"], "model": e["model"], "targets": e.get("targets", "all"), "exit_code": INTERNAL,
                 "verdicts": {}, "error": f"its Ray task failed ({type(r).__name__}: {_line(r)}); {REPORT_BUGS}",
                 "report": None, "seconds": None}
        records.append(r)
    summary = {"manifest": str(Path(manifest).resolve()), "exit_code": max(r["exit_code"] for r in records),
               "entries": records, "ray": ray_info, "wall_seconds": round(time.perf_counter() - t0, 1)}
    _write(root / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    _write(root / "index.html", index_html(summary))
    return summary


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def index_html(summary: dict[str, Any]) -> str:
    """A self-contained HTML table: one row per entry (name, model, verdict per target, exit code, report link)."""
    rows = []
    for r in summary["entries"]:
        verdicts = "<br>".join(
            f"<span class={'ok' if v.get('ships') else 'bad'}>{html.escape(t)}: "
            f"{'ships' if v.get('ships') else 'does not ship'}</span>" for t, v in r["verdicts"].items()) or "-"
        link = f"<a href=\"{html.escape(r['report'])}\">report</a>" if r.get("report") else "-"
        err = html.escape(r["error"] or "")
        rows.append(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(str(r['model']))}</td><td>{verdicts}</td>"
                    f"<td class={'ok' if r['exit_code'] == 0 else 'bad'}>{r['exit_code']}</td><td>{link}</td>"
                    f"<td>{err}</td></tr>")
    return ("<!doctype html><html><head><meta charset=utf-8><title>deploy batch</title><style>"
            "body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
            "table{border-collapse:collapse}.ok{color:#070}.bad{color:#b00;font-weight:bold}</style></head><body>"
            f"<h1>deploy batch: exit {summary['exit_code']}</h1><p>{html.escape(summary['manifest'])}; "
            f"{len(summary['entries'])} entries; {summary['wall_seconds']} s"
            f"{'; Ray ' + html.escape(summary['ray']['address']) if summary.get('ray') else ''}</p>"
            "<table><tr><th>entry</th><th>model</th><th>verdict</th><th>exit</th><th>report</th><th>error</th></tr>"
            + "".join(rows) + "</table></body></html>\n")


def cmd_batch(argv: Sequence[str]) -> int:
    """``deploy batch MANIFEST --out DIR [--ray]``: exit code = the highest entry code."""
    from deployer.distributed import add_ray_flags, ray_cluster

    p = argparse.ArgumentParser(prog="deploy batch", description="Run every deploy of a manifest; write "
                                "summary.json and index.html. Exit: the highest entry code.")
    p.add_argument("manifest", help="YAML manifest: entries of model, calib, targets, recipe, min_fidelity, name")
    p.add_argument("--out", default="batch-out", metavar="DIR", help="output folder (default batch-out)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_ray_flags(p)
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--verbose", action="store_true", help="tracebacks of internal errors in entries")
    a = p.parse_args(argv)
    say = (lambda s: None) if (a.quiet or a.json) else (lambda s: print(s, file=sys.stderr))
    summary = run_batch(a.manifest, a.out, ray_cluster(a), a.overwrite, log=say)
    if a.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    elif not a.quiet:
        for r in summary["entries"]:
            ships = ", ".join(f"{t} {'ships' if v.get('ships') else 'does not ship'}" for t, v in r["verdicts"].items())
            print(f"{r['name']:<24} exit {r['exit_code']}  {ships or r['error']}")
            if a.verbose and r.get("traceback"):
                print(r["traceback"], file=sys.stderr)
        print(f"\nwrote {a.out}/ (summary.json, index.html, one folder per entry)")
    return int(summary["exit_code"])
