"""``deploy distill``: teacher -> student (distillation, then QAT with a plan) -> student.onnx / .pt / report.

Outputs (written atomically: a temporary folder renamed at the end, nothing left on error):

- ``student.onnx``: the student, FP32 ONNX (opset 17), the input of ``deploy``;
- ``student.pt``: its state dict (``torch.save``; load with ``torch.load(weights_only=True)``);
- ``distill_report.json``: teacher vs student fidelity on the held-out split, parameter counts, sizes,
  the training record (losses, temperature, seconds, steps) and the QAT summary.

Checkpoints of a running job live beside the output in ``.<out>.distill-checkpoint/`` (kept when the
run fails or is interrupted, removed after success); ``resume=True`` (``--resume``) continues from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from deployer.distill.data import Source, load_source
from deployer.distill.losses import HiddenStateLoss, Temperature, attention_loss, distillation_loss, \
    every_other_layer_map
from deployer.distill.students import count_params, find_transformer, shrink, build_from_factory
from deployer.distill.train import LoopConfig, train_loop
from deployer.errors import BadInputError
from deployer.examples import ExampleData

DEFAULTS = {"classification": {"batch_size": 64, "lr": 2e-3}, "embedding": {"batch_size": 16, "lr": 1e-4},
            "generic": {"batch_size": 32, "lr": 1e-3}}


@dataclass
class DistillOptions:
    """Options of a distillation run (names match the ``deploy distill`` flags).

    Attributes:
        epochs: distillation epochs over the training split.
        alpha: weight of the KD term against the task loss (labelled classification only).
        temperature: a number > 0, or ``"learn"`` (learnable T in [3, 10], starting at 4).
        seed: seed of the data split, student initialisation and batch order.
        batch_size / lr: None = per task (classification 64 / 2e-3, embeddings 16 / 1e-4, other 32 / 1e-3).
        max_seconds: wall-time budget of the distillation phase (summed over resumes).
        qat_epochs: quantization-aware fine-tuning epochs after distillation (0 = none).
        qat_max_seconds: wall-time budget of the QAT phase.
        calib_samples / heldout_samples: None = the source's defaults (mnist 200/500, minilm 256/1000).
        hidden_weight / attention_weight: weights of hidden-state / attention matching (transformers).
        freeze_word_embeddings: a transformer student keeps the teacher's word-embedding table frozen (it
            is most of MiniLM's parameters; freezing it saves most of the optimizer's work on a CPU budget).
        recipe / observer: how the QAT plan is computed (as ``deploy``).
        checkpoint_every: steps between checkpoints.
        threads: torch CPU threads for the run (None: torch's setting; restored afterwards). On a shared
            2-core machine 1 thread trains a small CNN several times faster than 2.
        checkpoint_dir: where checkpoints go (None: ``.<out>.distill-checkpoint/`` beside ``out``).
        keep_checkpoint: keep the checkpoint after success (``deploy --distill`` removes it after the deploy).
        resume: continue from the checkpoint beside ``out``.
        overwrite: replace an existing output.
    """

    epochs: int = 5
    alpha: float = 0.5
    temperature: float | str = 4.0
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    max_seconds: float | None = None
    qat_epochs: int = 1
    qat_max_seconds: float | None = None
    calib_samples: int | None = None
    heldout_samples: int | None = None
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    freeze_word_embeddings: bool = True
    recipe: str = "int8"
    observer: str = "minmax"
    checkpoint_every: int = 200
    threads: int | None = None
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = False
    resume: bool = False
    overwrite: bool = False


@dataclass
class DistillResult:
    """What :func:`run_distill` returns.

    Attributes:
        out_dir: the output folder (``student.onnx``, ``student.pt``, ``distill_report.json``).
        report: the report dict.
        student: the trained student (torch, eval mode).
        student_data: the student's ONNX with the source's calibration / held-out splits and task metric,
            ready for :func:`deployer.pipeline.run_deploy` (``deploy --distill``).
    """

    out_dir: Path
    report: dict[str, Any]
    student: nn.Module
    student_data: ExampleData
    files: dict[str, str] = field(default_factory=dict)


def parse_temperature(value: str | float) -> float | str:
    """``"learn"`` or a positive number.

    Raises:
        BadInputError: anything else.
    """
    if isinstance(value, str):
        if value == "learn":
            return "learn"
        try:
            value = float(value)
        except ValueError:
            raise BadInputError(f"--temperature {value!r}: give a number > 0 or 'learn'") from None
    if not value > 0 or not np.isfinite(value):
        raise BadInputError(f"--temperature {value}: give a number > 0 or 'learn'")
    return float(value)


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoints."""
    out = Path(out)
    return out.resolve().parent / f".{out.name}.distill-checkpoint"


def _key(teacher: str, student: str, data: str | None, opts: DistillOptions) -> str:
    d = asdict(opts)
    for k in ("resume", "overwrite", "checkpoint_every", "max_seconds", "qat_max_seconds", "threads", "checkpoint_dir",
              "keep_checkpoint"):
        d.pop(k)
    return hashlib.sha256(json.dumps([teacher, student, data, d], sort_keys=True, default=str).encode()).hexdigest()


def _export(module: nn.Module, source: Source) -> onnx.ModelProto:
    from deployer.model_io import export_torch

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return export_torch(module, source.example_input(), source.output_names)


def _build_student(spec: str, source: Source, seed: int, freeze_word_embeddings: bool = False
                   ) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    if spec.startswith("shrink"):
        example = torch.from_numpy(source.example_input()[source.input_names[0]]) if len(source.input_names) == 1 else None
        student, desc = shrink(source.teacher, spec, example)
    else:
        student = build_from_factory(spec, source.teacher)
        desc = {"rule": f"factory {spec}"}
    for p in student.parameters():
        p.requires_grad_(True)
    found = find_transformer(student)
    words = getattr(getattr(found[1], "embeddings", None), "word_embeddings", None) if found else None
    if freeze_word_embeddings and isinstance(words, nn.Embedding):
        words.weight.requires_grad_(False)
        desc["frozen"] = f"word embeddings ({words.weight.numel():,} parameters, the teacher's)"
    student.train()
    try:
        with torch.no_grad():
            out = student.eval()(*[torch.from_numpy(v) for v in source.example_input().values()])
            ref = source.teacher(*[torch.from_numpy(v) for v in source.example_input().values()])
    except Exception as e:
        raise BadInputError(f"--student {spec}: the student does not run on the teacher's inputs ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        raise BadInputError(f"--student {spec}: its output {tuple(getattr(out, 'shape', ()))} differs from the "
                            f"teacher's {tuple(ref.shape)}; the student must produce the teacher's outputs")
    return student, desc


class _Capture:
    """Forward hook on a BERT-like encoder keeping its output (hidden states and attentions)."""

    def __init__(self, module: nn.Module) -> None:
        found = find_transformer(module)
        self.encoder = found[1] if found else None
        self.out: Any = None
        self.handle: Any = None

    def __enter__(self) -> "_Capture":
        if self.encoder is not None:
            cfg = self.encoder.config
            self.saved = (cfg.output_hidden_states, cfg.output_attentions)
            cfg.output_hidden_states = cfg.output_attentions = True
            self.handle = self.encoder.register_forward_hook(lambda m, a, o: setattr(self, "out", o))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.encoder is not None:
            self.encoder.config.output_hidden_states, self.encoder.config.output_attentions = self.saved
            self.handle.remove()


def make_loss(source: Source, student: nn.Module, opts: DistillOptions
              ) -> tuple[Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor], list[nn.Module], dict[str, Any]]:
    """The loss of one batch for the source's task, the extra trained modules, and its description."""
    temp = Temperature(4.0, learnable=True) if opts.temperature == "learn" else Temperature(float(opts.temperature))
    teacher = source.teacher
    extra: list[nn.Module] = [temp]
    desc: dict[str, Any] = {}
    t_cap, s_cap = _Capture(teacher), _Capture(student)
    hidden: HiddenStateLoss | None = None
    amap: dict[int, int] = {}
    if t_cap.encoder is not None and s_cap.encoder is not None and opts.hidden_weight + opts.attention_weight > 0:
        for enc in (t_cap.encoder, s_cap.encoder):  # sdpa/flash attention return no attention maps
            if getattr(enc.config, "_attn_implementation", "eager") != "eager" and hasattr(enc, "set_attn_implementation"):
                enc.set_attn_implementation("eager")
        nt, ns = teacher_cfg = t_cap.encoder.config.num_hidden_layers, s_cap.encoder.config.num_hidden_layers
        del teacher_cfg
        hmap = every_other_layer_map(ns, nt, with_embeddings=True)
        amap = every_other_layer_map(ns, nt, with_embeddings=False)
        hidden = HiddenStateLoss(hmap, s_cap.encoder.config.hidden_size, t_cap.encoder.config.hidden_size)
        extra.append(hidden)
        desc.update({"hidden_state_map": {f"student {k}": f"teacher {v}" for k, v in hmap.items()},
                     "hidden_state_index": "hidden_states tuple: 0 = embeddings, k = output of layer k",
                     "attention_map": {f"student layer {k}": f"teacher layer {v}" for k, v in amap.items()},
                     "hidden_weight": opts.hidden_weight, "attention_weight": opts.attention_weight,
                     "hidden_loss": "1 - cosine per token (padding excluded), learned projection when widths differ",
                     "attention_loss": "squared L2 per attention row (row_l2), heads averaged when counts differ"})
    if source.kind == "classification":
        desc["output_loss"] = (f"alpha * KL(p_T || p_S) * T^2 + (1 - alpha) * CE (alpha {opts.alpha})"
                               if source.train_labels is not None else "KL(p_T || p_S) * T^2 (no labels)")
    elif source.kind == "embedding":
        desc["output_loss"] = "1 - cosine(student embedding, teacher embedding)"
    else:
        desc["output_loss"] = "mean squared error of the outputs"
    desc["temperature"] = "learnable in [3, 10], start 4" if opts.temperature == "learn" else float(opts.temperature)

    def loss_fn(batch: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is not None:
            width = max(1, int(mask.sum(dim=1).max()))
            batch = {k: v[:, :width] for k, v in batch.items()}
            mask = batch["attention_mask"]
        args = list(batch.values())
        with torch.no_grad(), t_cap:
            t_out = teacher(*args)
        with s_cap:
            s_out = student(*args)
        if source.kind == "classification":
            loss = distillation_loss(s_out, t_out, labels, temp, opts.alpha)
        elif source.kind == "embedding":
            loss = (1.0 - F.cosine_similarity(s_out.flatten(1), t_out.flatten(1), dim=1)).mean()
        else:
            loss = F.mse_loss(s_out, t_out)
        if hidden is not None and s_cap.out is not None and t_cap.out is not None:
            if opts.hidden_weight:
                loss = loss + opts.hidden_weight * hidden(s_cap.out.hidden_states, t_cap.out.hidden_states, mask)
            if opts.attention_weight and s_cap.out.attentions is not None and t_cap.out.attentions is not None:
                loss = loss + opts.attention_weight * attention_loss(s_cap.out.attentions, t_cap.out.attentions, amap,
                                                                     mask, reduction="row_l2")
        return loss

    return loss_fn, extra, desc


def _plan_for(student_model: onnx.ModelProto, source: Source, opts: DistillOptions) -> tuple[Any, onnx.ModelProto]:
    """PTQ plan of the student's ONNX computed by the ordinary pipeline (QAT's ranges and schemes)."""
    from calibration.dataset import CalibrationSet
    from deployer.pipeline import DeployOptions, compute_statistics, load_inputs, make_plan

    data = ExampleData(student_model, CalibrationSet(source.calibration, "distill:calibration"),
                       CalibrationSet(source.calibration[:1], "distill:unused"), source.kind, source.split)
    dopts = DeployOptions(recipe=opts.recipe, observer=opts.observer, no_cache=True, bias_correction=False)
    inputs = load_inputs(data, None, dopts)
    return make_plan(inputs, compute_statistics(inputs, dopts), dopts), inputs.reference


def run_distill(teacher: str, student: str = "shrink", data: str | None = None, out_dir: str | Path = "distill-out",
                options: DistillOptions | None = None, progress: bool = False,
                log: Callable[[str], None] = lambda s: None) -> DistillResult:
    """Distil ``teacher`` into ``student``, fine-tune it with fake quantization, write the outputs.

    Args:
        teacher: ``example:mnist``, ``example:minilm`` or a ``module:function`` returning a trained
            ``torch.nn.Module``.
        student: ``shrink``, ``shrink:W`` or a ``module:function`` returning a fresh module (it may take the
            teacher as its one argument).
        data: ``example:NAME`` (default: the teacher's example) or a folder of ``.npy``/``.npz`` samples with an
            optional ``labels.npy`` (required for a factory teacher).

    Raises:
        BadInputError: bad specs, data, options or output folder. BackendUnavailableError: missing packages.
    """
    opts = options or DistillOptions()
    if opts.threads is not None and opts.threads < 1:
        raise BadInputError(f"--threads {opts.threads}: give at least 1")
    threads = torch.get_num_threads()
    try:
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        return _run(teacher, student, data, Path(out_dir), opts, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run(teacher: str, student: str, data: str | None, out: Path, opts: DistillOptions, progress: bool,
         log: Callable[[str], None]) -> DistillResult:
    from deployer.pipeline import atomic_output, check_output_dir

    opts.temperature = parse_temperature(opts.temperature)
    if opts.epochs < 1:
        raise BadInputError(f"--epochs {opts.epochs}: give at least 1")
    if opts.qat_epochs < 0:
        raise BadInputError(f"--qat-epochs {opts.qat_epochs}: give 0 or more")
    if not 0.0 <= opts.alpha <= 1.0:
        raise BadInputError(f"--alpha {opts.alpha}: the distillation weight must be in [0, 1]")
    for name, v in (("--max-seconds", opts.max_seconds), ("--qat-max-seconds", opts.qat_max_seconds)):
        if v is not None and not v > 0:
            raise BadInputError(f"{name} {v}: give a positive number of seconds")
    check_output_dir(out, opts.overwrite, [data])
    t0 = time.perf_counter()
    source = load_source(teacher, data, opts.seed, opts.calib_samples, opts.heldout_samples, log)
    stu, stu_desc = _build_student(student, source, opts.seed, opts.freeze_word_embeddings)
    log(f"student: {stu_desc['rule']}; {count_params(stu):,} parameters (teacher {count_params(source.teacher):,})")
    defaults = DEFAULTS[source.kind]
    loss_fn, extra, loss_desc = make_loss(source, stu, opts)
    ckpt = Path(opts.checkpoint_dir) if opts.checkpoint_dir else checkpoint_dir(out)
    key = _key(teacher, student, data, opts)
    if not opts.resume and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)
    cfg = LoopConfig(epochs=opts.epochs, batch_size=opts.batch_size or int(defaults["batch_size"]),
                     lr=opts.lr or float(defaults["lr"]), seed=opts.seed, max_seconds=opts.max_seconds,
                     checkpoint_every=opts.checkpoint_every,
                     length_key="attention_mask" if "attention_mask" in source.train else None)
    threads = torch.get_num_threads()
    record = train_loop(stu, loss_fn, source.train, source.train_labels if source.kind == "classification" else None,
                        extra, cfg, ckpt / "distill.pt", key, opts.resume, progress, "distill", log)
    temperature = extra[0]
    assert isinstance(temperature, Temperature)
    training: dict[str, Any] = {"distill": {**record.to_dict(), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                                            "lr": cfg.lr, "final_temperature": round(temperature.value(), 4),
                                            "max_seconds": opts.max_seconds},
                                "losses": loss_desc, "seed": opts.seed, "torch_threads": threads}
    fid_float: dict[str, Any] | None = None
    if opts.qat_epochs > 0:
        from deployer.distill.qat import apply_fake_quant, remove_fake_quant
        from deployer.distill.report import evaluate

        fid_float, _ = evaluate(source, source.teacher, stu, opts.seed)
        log("QAT: computing the student's PTQ plan ...")
        plan, ref = _plan_for(_export(stu, source), source, opts)
        handle = apply_fake_quant(stu, ref, plan)
        qcfg = LoopConfig(epochs=opts.qat_epochs, batch_size=cfg.batch_size, lr=cfg.lr / 10, seed=opts.seed + 1,
                          max_seconds=opts.qat_max_seconds, checkpoint_every=opts.checkpoint_every,
                          length_key=cfg.length_key)
        try:
            qrec = train_loop(stu, loss_fn, source.train,
                              source.train_labels if source.kind == "classification" else None, extra, qcfg,
                              ckpt / "qat.pt", key, opts.resume, progress, "qat", log)
        finally:
            remove_fake_quant(handle, bake_weights=True)
        training["qat"] = {**qrec.to_dict(), "epochs": qcfg.epochs, "lr": qcfg.lr, **handle.summary(),
                           "plan": {"recipe": opts.recipe, "observer": opts.observer,
                                    "calibration_samples": len(source.calibration)},
                           "method": "fake-quantized weights (plan scheme, STE) and module inputs (plan ranges, "
                                     "asymmetric int8); weights baked on the int grid afterwards"}
    from deployer.distill.report import evaluate, onnx_bytes, state_dict_bytes

    stu.eval()
    fid, metric = evaluate(source, source.teacher, stu, opts.seed)
    student_onnx = _export(stu, source)
    t_params, s_params = count_params(source.teacher), count_params(stu)
    encoder_params: dict[str, Any] = {}
    t_enc, s_enc = find_transformer(source.teacher), find_transformer(stu)
    if t_enc is not None and s_enc is not None:
        te, se = count_params(t_enc[1].encoder), count_params(s_enc[1].encoder)  # type: ignore[arg-type]
        encoder_params = {"encoder_parameters": {"teacher": te, "student": se, "ratio": round(se / te, 6)},
                          "note": "the word-embedding table is shared in size by teacher and student"}
    report: dict[str, Any] = {
        "schema_version": "1.0", "kind": "distill",
        "teacher": {"spec": source.name, "parameters": t_params,
                    "onnx_bytes": onnx_bytes(source.teacher, source.example_input(), source.output_names),
                    "state_dict_bytes": state_dict_bytes(source.teacher)},
        "student": {"spec": student, **stu_desc, "parameters": s_params,
                    "onnx_bytes": len(student_onnx.SerializeToString()), "state_dict_bytes": state_dict_bytes(stu)},
        "parameter_ratio": round(s_params / t_params, 6),
        **encoder_params,
        "data": {"task": source.kind, "split": source.split, "train_samples": len(next(iter(source.train.values()))),
                 "calibration_samples": len(source.calibration)},
        "fidelity": fid,
        "training": training,
        "files": {"student_onnx": "student.onnx", "student_state_dict": "student.pt"},
    }
    if fid_float is not None:
        report["fidelity_before_qat"] = fid_float
    with atomic_output(out, opts.overwrite) as tmp:
        onnx.save(student_onnx, str(tmp / "student.onnx"))
        torch.save(stu.state_dict(), tmp / "student.pt")
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "distill_report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if not opts.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    from calibration.dataset import CalibrationSet

    n_held = len(next(iter(source.heldout.values())))
    held = CalibrationSet([{k: v[i:i + 1].numpy() for k, v in source.heldout.items()} for i in range(n_held)],
                          f"distilled({source.name}):heldout")
    student_data = ExampleData(student_onnx, CalibrationSet(source.calibration, f"distilled({source.name}):calibration"),
                               held, source.kind if source.kind != "generic" else "generic",
                               f"{source.split}; student distilled by deploy distill", metric)
    return DistillResult(out, report, stu, student_data)


def deploy_with_distill(model: Any, student: str, out_dir: str | Path, deploy_options: Any,
                        distill_options: DistillOptions | None = None, progress: Any = None,
                        log: Callable[[str], None] = lambda s: None, distill_progress: bool = False,
                        calib: Any = None, plan: Any = None) -> Any:
    """``deploy --distill SPEC``: distil the built-in example ``model`` into ``SPEC``, then deploy the student.

    The distillation outputs land in ``<out>/distill/``; the deployment is the ordinary one of the student's
    ONNX with the example's calibration and held-out splits and task metric. Checkpoints go to
    ``.<out>.distill-checkpoint/`` beside ``out`` (``resume`` continues from them).

    Raises:
        BadInputError: ``model`` is not a built-in example with a teacher (mnist, minilm), or any input error.
    """
    import tempfile

    from deployer.distill.data import EXAMPLES, example_name
    from deployer.pipeline import check_output_dir, run_deploy

    name = example_name(model) if isinstance(model, str) else None
    if name is None:
        raise BadInputError(f"--distill works on the built-in examples with a torch teacher ({', '.join(EXAMPLES)}); for "
                            f"your model run `deploy distill --teacher module:function --data DIR --out D`, then "
                            f"`deploy --model D/student.onnx --calib ...`")
    if calib is not None or plan is not None:
        raise BadInputError("--distill trains the student on the example's own data and computes its plan; drop "
                            "--calib/--plan (or deploy a distilled student.onnx with them)")
    out = Path(out_dir)
    check_output_dir(out, deploy_options.overwrite)
    dopts = distill_options or DistillOptions()
    dopts.checkpoint_dir = str(checkpoint_dir(out))
    dopts.keep_checkpoint = True  # until the deploy succeeds: a failed deploy reruns with --distill-resume
    dopts.seed = deploy_options.seed
    dopts.recipe, dopts.observer = deploy_options.recipe, deploy_options.observer
    if dopts.calib_samples is None:
        dopts.calib_samples = deploy_options.calib_samples
    if dopts.heldout_samples is None:
        dopts.heldout_samples = deploy_options.heldout_samples
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.distill-", dir=parent))
    try:
        res = run_distill(f"example:{name}", student, None, work / "distill", dopts, distill_progress, log)
        log(f"distilled: student {res.report['parameter_ratio']:.3f} of the teacher's parameters; deploying it ...")
        kwargs = {} if progress is None else {"progress": progress}
        try:
            result = run_deploy(res.student_data, None, out, deploy_options, None, log=log, **kwargs)
        except BaseException:
            log(f"the deploy failed; the distillation checkpoint stays in {dopts.checkpoint_dir}: the same command with "
                f"--distill-resume skips the training")
            raise
        shutil.rmtree(dopts.checkpoint_dir, ignore_errors=True)
        shutil.move(str(work / "distill"), str(out / "distill"))
        from deployer.output_dir import add_to_manifest

        add_to_manifest(out, ["distill"])  # written by this command: a later --overwrite may replace it
        result.report["distillation"] = {"report": "distill/distill_report.json",
                                         "parameter_ratio": res.report["parameter_ratio"],
                                         "fidelity": res.report["fidelity"]}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
