"""``deploy prune`` and ``deploy --prune / --sparsity``: prune a torch model, recover it by distillation from
the unpruned model, hand it to the ordinary plan and lowering.

Stages (each measured for the report: params, MACs, size, fidelity to the unpruned model, latency):

1. ``original``: the unpruned model (the teacher of step 3).
2. ``pruned``: channels removed (:mod:`deployer.prune.structured`) and/or weights pruned to 2:4
   (:mod:`deployer.prune.semi`), before any training.
3. ``finetuned``: recovery fine-tuning with this tool's distillation losses (:mod:`deployer.distill.losses`:
   KL(student/T || teacher/T)·T² mixed with cross-entropy where labels exist, cosine for embeddings,
   hidden-state cosine for transformer encoders), the 2:4 masks held fixed.
4. ``quantized``: the deploy artifact (``deploy --prune``); ``deploy prune`` stops at 3.

``deploy prune`` writes (atomically) ``pruned.onnx`` (FP32, opset 17), ``pruned.pt`` (the state dict of the
pruned module, ``torch.load(..., weights_only=True)``) and
``pruning_report.json``. Load ``pruned.pt`` into a fresh instance of the model's class with
:func:`deployer.prune.structured.load_pruned_state` (it resizes the layers to the saved shapes).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from deployer.distill.data import Source
from deployer.errors import BadInputError
from deployer.examples import ExampleData
from deployer.prune import measure
from deployer.prune.options import PruneOptions

DEFAULTS = {"classification": {"batch_size": 64, "lr": 1e-3}, "embedding": {"batch_size": 16, "lr": 5e-5},
            "generic": {"batch_size": 32, "lr": 1e-3}}


@dataclass
class PruneResult:
    """What :func:`run_prune` returns.

    Attributes:
        out_dir: the output folder. report: ``pruning_report.json`` as a dict.
        model: the pruned, fine-tuned torch module (eval mode). onnx_model: its FP32 ONNX.
        data: the pruned ONNX with the source's calibration and held-out splits, and a task metric comparing
            an artifact's held-out outputs with the *unpruned* model's (``*_vs_unpruned``), ready for
            :func:`deployer.pipeline.run_deploy`.
    """

    out_dir: Path
    report: dict[str, Any]
    model: nn.Module
    onnx_model: onnx.ModelProto
    data: ExampleData


def _export(module: nn.Module, source: Source) -> onnx.ModelProto:
    from deployer.model_io import export_torch

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return export_torch(module, source.example_input(), source.output_names)


def _example(source: Source) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(v) for v in source.example_input().values())


def _measure(module: nn.Module, source: Source, fidelity: dict[str, Any], **extra: Any) -> tuple[dict[str, Any], onnx.ModelProto]:
    from deployer.prune.structured import count_macs_params

    model = _export(module, source)
    macs, params = count_macs_params(module, _example(source))
    lat = measure.onnx_latency_ms(model, source.example_input())
    return measure.stage(params, macs, len(model.SerializeToString()), fidelity, lat,
                         latency_how="FP32 ONNX in ONNX Runtime CPU, 1 thread, batch 1, median", **extra), model


def _taylor_loss(source: Source) -> Callable[[nn.Module], torch.Tensor]:
    """Loss whose gradients rank channels for ``taylor``: cross-entropy to the labels (or to the unpruned
    model's predictions when there are none) on up to 64 training samples; other tasks: distance to the
    unpruned model's outputs plus their squared norm (the first term alone is zero before pruning)."""
    n = min(64, len(next(iter(source.train.values()))))
    batch = [v[:n] for v in source.train.values()]

    def loss(model: nn.Module) -> torch.Tensor:
        out = model(*batch)
        if source.kind == "classification":
            labels = source.train_labels[:n] if source.train_labels is not None else source.teacher(*batch).argmax(-1)
            return F.cross_entropy(out, labels)
        return out.pow(2).mean()

    return loss


def prune_source(source: Source, opts: PruneOptions, progress: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> tuple[nn.Module, onnx.ModelProto, dict[str, Any]]:
    """Prune ``source.teacher`` (a copy), fine-tune it by distillation, measure every stage.

    Returns:
        (pruned module, its FP32 ONNX, the report dict without ``files``).

    Raises:
        BadInputError: see :func:`deployer.prune.structured.prune_channels`; a loss that diverged.
    """
    from deployer.distill.report import evaluate, state_dict_bytes
    from deployer.distill.run import DistillOptions, make_loss
    from deployer.distill.train import LoopConfig, train_loop
    from deployer.prune import pattern, semi
    from deployer.prune.structured import output_layer, prune_channels

    t0 = time.perf_counter()
    teacher = source.teacher
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    example = _example(source)
    fid0, _ = evaluate(source, teacher, teacher, opts.seed)
    original, _ = _measure(teacher, source, fid0, state_dict_bytes=state_dict_bytes(teacher))
    log(f"original: {original['params']:,} parameters, {original['macs']:,} MACs")
    report: dict[str, Any] = {"schema_version": "1.0", "kind": "prune", "model": source.name,
                              "options": opts.describe(), "machine": measure.machine()}
    if opts.structured:
        log(f"pruning channels ({opts.criterion}, {opts.source or opts.ratio}) ...")
        report["channels"] = prune_channels(student, example, opts, _taylor_loss(source))
    sparse_layers: list[str] = []
    if opts.sparsity == "2:4":
        out_layer = output_layer(student, example)
        names = {m: n for n, m in student.named_modules()}
        plain = copy.deepcopy(student)  # the "pruned" stage is measured on a copy without parametrizations
        semi.apply_2to4(plain, keep_masks=False)
        sp = semi.apply_2to4(student)
        sparse_layers = sp["sparse_layers"]
        report["sparsity"] = {"pattern": "2:4", "sparse_layers": sparse_layers, "skipped": sp["skipped"],
                              "output_layer": names.get(out_layer) if out_layer is not None else None,
                              "rules": semi.__doc__.split("Eligibility (each rule with its source):")[1]
                              .split("Masks are")[0].strip()}
        log(f"2:4 sparsity on {len(sparse_layers)} layer(s); {len(sp['skipped'])} left dense")
        if not sparse_layers:
            raise BadInputError("--sparsity 2:4: no eligible layer (Linear/Conv2d with groups 1, output channels a "
                                "multiple of 8, input channels a multiple of 16)")
    else:
        plain = student
    fid1, _ = evaluate(source, teacher, plain, opts.seed)
    pruned, _ = _measure(plain, source, fid1)
    del plain
    log(f"pruned: {pruned['params']:,} parameters, {pruned['macs']:,} MACs; held-out {fid1}")
    training: dict[str, Any] = {"epochs": opts.epochs}
    if opts.epochs > 0:
        dopts = DistillOptions(alpha=opts.alpha, temperature=float(opts.temperature), seed=opts.seed)
        loss_fn, extra, loss_desc = make_loss(source, student, dopts)
        defaults = DEFAULTS[source.kind]
        cfg = LoopConfig(epochs=opts.epochs, batch_size=opts.batch_size or int(defaults["batch_size"]),
                         lr=opts.lr or float(defaults["lr"]), seed=opts.seed, max_seconds=opts.max_seconds,
                         checkpoint_every=10 ** 9,
                         length_key="attention_mask" if "attention_mask" in source.train else None)
        rec = train_loop(student, loss_fn, source.train,
                         source.train_labels if source.kind == "classification" else None, extra, cfg,
                         None, "", False, progress, "recover", log)
        training.update({**rec.to_dict(), "batch_size": cfg.batch_size, "lr": cfg.lr, "losses": loss_desc,
                         "teacher": "the unpruned model", "max_seconds": opts.max_seconds,
                         "masks": "2:4 masks held by weight = original * mask during training" if sparse_layers else None})
    semi.bake_masks(student)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if sparse_layers:
        holds = semi.torch_pattern_holds(student, sparse_layers)
        report["sparsity"]["torch_pattern_holds"] = all(holds.values())
        if not all(holds.values()):
            raise AssertionError(f"2:4 pattern lost during fine-tuning in {[k for k, v in holds.items() if not v]}")
    fid2, _ = evaluate(source, teacher, student, opts.seed)
    finetuned, model = _measure(student, source, fid2, state_dict_bytes=state_dict_bytes(student))
    if sparse_layers:
        chk = pattern.check_2to4(model)
        report["sparsity"]["onnx_fp32"] = {k: chk[k] for k in ("sparse_nodes", "dense_nodes")}
        # a sparse layer the outputs do not use (e.g. BERT's pooler under mean pooling) is not in the export
        report["sparsity"]["onnx_fp32"]["note"] = (
            f"{len(chk['sparse_nodes'])} 2:4 weights in the export for {len(sparse_layers)} sparse layers"  # type: ignore[arg-type]
            + ("" if len(chk["sparse_nodes"]) == len(sparse_layers) else  # type: ignore[arg-type]
               "; the others are not used by the model's outputs (dropped by the exporter)"))
        finetuned["effective_macs_2to4"] = _sparse_macs(student, example, sparse_layers, finetuned["macs"])
    log(f"fine-tuned: held-out {fid2}")
    report["pruning"] = {"criterion": opts.criterion if opts.structured else None, "ratio": opts.ratio,
                         "rules": opts.describe()["rules"], "sparsity": opts.sparsity,
                         "stages": {"original": original, "pruned": pruned, "finetuned": finetuned, "quantized": None}}
    report["training"] = training
    report["data"] = {"task": source.kind, "split": source.split,
                      "train_samples": len(next(iter(source.train.values()))),
                      "heldout_samples": int(fid2.get("heldout_samples", 0)),
                      "calibration_samples": len(source.calibration)}
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return student, model, report


def _sparse_macs(model: nn.Module, example: tuple[torch.Tensor, ...], layers: list[str], dense: int) -> int:
    """MACs with the 2:4 layers' products halved (what sparse tensor cores skip)."""
    per: dict[str, int] = {}
    hooks = []
    for name in layers:
        m = model.get_submodule(name)

        def hook(mod: nn.Module, i: Any, o: torch.Tensor, name: str = name) -> None:
            w = mod.weight
            per[name] = int(o.numel() // o.shape[0] * (w[0].numel()))
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return int(dense - sum(per.values()) // 2)


def unpruned_metric(source: Source) -> Callable[[list[list[np.ndarray]]], dict[str, float]]:
    """Task metric of an artifact's held-out outputs against the *unpruned* model's (and labels if any)."""
    from deployer.distill.report import forward_batched

    ref = forward_batched(source.teacher, source.heldout)
    labels = source.heldout_labels.numpy() if source.heldout_labels is not None else None
    kind = source.kind

    def metric(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        out = np.concatenate([np.asarray(o[0]).reshape(1, -1) for o in outputs]).astype(np.float64)
        r = ref[: len(out)].reshape(len(out), -1)
        if kind == "classification":
            res = {"top1_agreement_vs_unpruned": float(np.mean(out.argmax(1) == r.argmax(1)))}
            if labels is not None:
                res["label_accuracy"] = float(np.mean(out.argmax(1) == labels[: len(out)]))
            return res
        cos = np.sum(out * r, 1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
        return {"cosine_vs_unpruned": float(np.mean(cos))}

    return metric


def pruned_data(source: Source, model: onnx.ModelProto) -> ExampleData:
    """The pruned ONNX with the source's splits (for ``run_deploy``)."""
    from calibration.dataset import CalibrationSet

    n_held = len(next(iter(source.heldout.values())))
    held = CalibrationSet([{k: v[i:i + 1].numpy() for k, v in source.heldout.items()} for i in range(n_held)],
                          f"pruned({source.name}):heldout")
    task = "classification" if source.kind == "classification" else "embedding" if source.kind == "embedding" else "generic"
    return ExampleData(model, CalibrationSet(source.calibration, f"pruned({source.name}):calibration"), held, task,
                       f"{source.split}; pruned and fine-tuned by deployer.prune", unpruned_metric(source))


def run_prune(model: str, data: str | None, out_dir: str | Path, opts: PruneOptions, progress: bool = False,
              log: Callable[[str], None] = lambda s: None, source: Source | None = None) -> PruneResult:
    """``deploy prune``: prune ``model`` (``example:mnist``, ``example:minilm`` or ``pkg.mod:factory``) on ``data``
    (see :func:`deployer.distill.data.load_source`), fine-tune, write the outputs to ``out_dir``.

    Raises:
        BadInputError: bad options, model spec, data or output folder. BackendUnavailableError: missing packages.
    """
    from deployer.pipeline import atomic_output, check_output_dir

    opts.check()
    out = Path(out_dir)
    check_output_dir(out, opts.overwrite, [data])
    threads = torch.get_num_threads()
    try:
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        from deployer.prune.sources import load_prune_source

        src = source or load_prune_source(model, data, opts.seed, opts.calib_samples, opts.heldout_samples, log)
        student, onnx_model, report = prune_source(src, opts, progress, log)
    finally:
        torch.set_num_threads(threads)
    report["pruning"]["stages"]["quantized"] = {
        "not_run": "deploy prune stops at the fine-tuned FP32 model; quantize it with `deploy --model "
                   f"{out}/pruned.onnx --calib ...` or prune and deploy in one run with `deploy --prune`"}
    report["files"] = {"onnx": "pruned.onnx", "state_dict": "pruned.pt"}
    with atomic_output(out, opts.overwrite) as tmp:
        onnx.save(onnx_model, str(tmp / "pruned.onnx"))
        torch.save(student.state_dict(), tmp / "pruned.pt")
        (tmp / "pruning_report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return PruneResult(out, report, student, onnx_model, pruned_data(src, onnx_model))


def deploy_with_prune(model: Any, out_dir: str | Path, deploy_options: Any, opts: PruneOptions,
                      progress: Any = None, log: Callable[[str], None] = lambda s: None, prune_progress: bool = False,
                      calib: Any = None, plan: Any = None, source: Source | None = None) -> Any:
    """``deploy --model EXAMPLE --prune R [--sparsity 2:4]``: prune the example's torch model, fine-tune, deploy.

    The pruning outputs land in ``<out>/prune/``; ``report.json`` gains ``pruning`` with the four stages, the
    ``quantized`` one per target (fidelity vs the unpruned model on the held-out split, size, latency where
    the artifact runs here). With ``--sparsity 2:4`` the TensorRT target writes ``--sparsity=enable`` into
    ``build_engine.sh`` and checks the pattern in its strongly typed graph.

    Raises:
        BadInputError: ``model`` is not a built-in example with a torch model (mnist, minilm), or bad input.
    """
    from deployer.pipeline import check_output_dir, run_deploy
    from deployer.prune.sources import EXAMPLES, prune_example

    name = prune_example(model) if isinstance(model, str) or model is None else None
    if source is None and name is None:
        raise BadInputError(f"--prune/--sparsity work on the built-in examples with a torch model ({', '.join(EXAMPLES)}); "
                            f"for your model run `deploy prune --model pkg.module:factory --data DIR --out P`, then "
                            f"`deploy --model P/pruned.onnx --calib ...`")
    if calib is not None or plan is not None:
        raise BadInputError("--prune fine-tunes on the example's own data and computes its plan; drop --calib/--plan")
    opts.check()
    out = Path(out_dir)
    check_output_dir(out, deploy_options.overwrite)
    opts.seed = deploy_options.seed
    if opts.calib_samples is None:  # the example's own split, so the teacher is `deploy --model NAME`'s model
        from deployer.pipeline import DEFAULT_CALIB_SAMPLES

        opts.calib_samples = deploy_options.calib_samples or DEFAULT_CALIB_SAMPLES
    if opts.heldout_samples is None:
        opts.heldout_samples = deploy_options.heldout_samples
    if opts.sparsity:
        deploy_options.backend_options["trt_sparsity"] = True
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.prune-", dir=parent))
    try:
        opts.overwrite = False
        res = run_prune(f"example:{name}" if source is None else source.name, None, work / "prune", opts,
                        prune_progress, log, source=source)
        log("pruned and fine-tuned; deploying ...")
        kwargs = {} if progress is None else {"progress": progress}
        result = run_deploy(res.data, None, out, deploy_options, None, log=log, **kwargs)
        shutil.move(str(work / "prune"), str(out / "prune"))
        from deployer.output_dir import add_to_manifest

        add_to_manifest(out, ["prune"])  # written by this command: a later --overwrite may replace it
        section = res.report["pruning"]
        section["stages"]["quantized"] = quantized_stage(result, section["stages"]["finetuned"])
        section["report"] = "prune/pruning_report.json"
        tr = res.report.get("training", {})
        section["training"] = {k: tr.get(k) for k in ("epochs", "steps", "epochs_done", "seconds", "stopped_by_budget",
                                                      "batch_size", "lr", "max_seconds", "loss_per_epoch")}
        section["training"]["output_loss"] = tr.get("losses", {}).get("output_loss")
        section["train_samples"] = res.report["data"]["train_samples"]
        section["sha256"] = {f"prune/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
                             for f in sorted((out / "prune").iterdir())}
        if "sparsity" in res.report:
            section["sparse_layers"] = res.report["sparsity"]["sparse_layers"]
        result.report["pruning"] = section
        (out / "report.json").write_text(json.dumps(result.report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantized_stage(result: Any, finetuned: dict[str, Any]) -> dict[str, Any]:
    """``stages.quantized``: one entry per deployed target (params/MACs those of the fine-tuned model)."""
    per: dict[str, Any] = {}
    for t, entry in result.report["targets"].items():
        path = Path(result.out_dir) / entry["artifact"]
        lat, how = measure.artifact_latency_ms(path) if path.is_file() else (None, "artifact missing")
        fid = {k: v for k, v in entry.get("fidelity", {}).items() if k.endswith("_vs_unpruned") or k == "label_accuracy"}
        extra = {"sparsity": entry["sparsity"]} if "sparsity" in entry else {}
        per[t] = measure.stage(finetuned["params"], finetuned["macs"], entry["size_bytes"]["artifact"], fid, lat,
                               latency_how=how, artifact=entry["artifact"], **extra)
    return per
