"""Distillation losses, shrink rules, fake quantization, factories, checkpoint/resume and the CLI (no real model)."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deployer.distill.losses import (  # noqa: E402
    HiddenStateLoss, Temperature, attention_loss, distillation_loss, every_other_layer_map, frozen_copy, kd_loss,
    self_distillation_loss,
)
from deployer.errors import BadInputError  # noqa: E402

SIG1 = 1 / (1 + math.exp(-1))  # softmax([1, 0])[0]


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# -- logit distillation ---------------------------------------------------------------------------------------


def test_kd_loss_hand_values():
    s, te = t([[1.0, 0.0]]), t([[0.0, 1.0]])
    # T = 1: KL(p_T || p_S) with p_T = (1 - a, a), p_S = (a, 1 - a), a = sigmoid(1): log-ratio is exactly 1
    assert float(kd_loss(s, te, 1.0)) == pytest.approx(SIG1 - (1 - SIG1), abs=1e-6)  # 0.462117
    # T = 2: logits halved -> log-ratio 0.5; times T^2 = 4
    a = 1 / (1 + math.exp(-0.5))
    assert float(kd_loss(s, te, 2.0)) == pytest.approx(4 * 0.5 * (a - (1 - a)), abs=1e-6)  # 0.489836
    # asymmetric case: forward vs reverse KL by hand
    s2, t2 = t([[2.0, 0.0, 0.0]]), t([[0.0, 0.0, 0.0]])
    ps = np.exp([2.0, 0, 0]) / np.exp([2.0, 0, 0]).sum()
    pt = np.full(3, 1 / 3)
    assert float(kd_loss(s2, t2, 1.0)) == pytest.approx(float(np.sum(pt * np.log(pt / ps))), abs=1e-6)
    assert float(kd_loss(s2, t2, 1.0, "reverse")) == pytest.approx(float(np.sum(ps * np.log(ps / pt))), abs=1e-6)
    assert float(kd_loss(t2, t2, 5.0)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(BadInputError):
        kd_loss(s, t([[1.0, 2.0, 3.0]]), 1.0)


def test_distillation_loss_mixes_task_loss():
    s, te, y = t([[1.0, 0.0]]), t([[0.0, 1.0]]), torch.tensor([0])
    ce = -math.log(SIG1)  # 0.313262
    kd = 2 * SIG1 - 1
    assert float(distillation_loss(s, te, y, 1.0, alpha=0.25)) == pytest.approx(0.25 * kd + 0.75 * ce, abs=1e-6)
    assert float(distillation_loss(s, te, None, 1.0, alpha=0.25)) == pytest.approx(kd, abs=1e-6)
    with pytest.raises(BadInputError):
        distillation_loss(s, te, y, 1.0, alpha=1.5)


def test_teacher_gets_no_gradient():
    s = t([[1.0, 0.0]]).requires_grad_()
    te = t([[0.0, 1.0]]).requires_grad_()
    kd_loss(s, te, 4.0).backward()
    assert s.grad is not None and te.grad is None


def test_learnable_temperature_gets_gradient_and_stays_in_range():
    temp = Temperature(4.0, learnable=True)
    assert temp.value() == pytest.approx(4.0, abs=1e-5)
    s = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    te = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)) * 3
    loss = kd_loss(s, te, temp)
    loss.backward()
    assert temp.raw.grad is not None and float(temp.raw.grad) != 0.0
    for sign in (1.0, -1.0):  # drive T hard both ways with a huge learning rate
        temp = Temperature(4.0, learnable=True)
        opt = torch.optim.SGD(temp.parameters(), lr=1e4)
        for _ in range(50):
            opt.zero_grad()
            (sign * kd_loss(s, te, temp)).backward()
            opt.step()
            assert 3.0 <= temp.value() <= 10.0
    assert list(Temperature(4.0).parameters()) == []  # fixed T: no parameter
    with pytest.raises(BadInputError):
        Temperature(12.0, learnable=True)


# -- hidden states, attention maps, self-distillation --------------------------------------------------------


def test_hidden_state_cosine_hand_values():
    loss = HiddenStateLoss({0: 0}, 2, 2)
    assert len(loss.projections) == 0
    hs, ht = [t([[[1.0, 0.0], [0.0, 1.0]]])], [t([[[1.0, 1.0], [0.0, 1.0]]])]
    # token 0: 1 - 1/sqrt(2); token 1: 0 -> mean
    assert float(loss(hs, ht)) == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert float(loss(hs, ht, mask=torch.tensor([[1, 0]]))) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_hidden_state_projection_when_widths_differ():
    loss = HiddenStateLoss({1: 2}, 2, 3)  # student layer 1 <- teacher layer 2
    assert set(loss.projections) == {"1"} and loss.projections["1"].weight.shape == (3, 2)
    with torch.no_grad():
        loss.projections["1"].weight.copy_(t([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    hs = [torch.zeros(1, 1, 2), t([[[3.0, 4.0]]])]
    ht = [torch.zeros(1, 1, 3)] * 2 + [t([[[3.0, 0.0, 4.0]]])]
    # projected student (3, 4, 0) vs teacher (3, 0, 4): cos = 9/25
    val = loss(hs, ht)
    assert float(val.detach()) == pytest.approx(1 - 9 / 25, abs=1e-6)
    val.backward()
    assert loss.projections["1"].weight.grad is not None
    with pytest.raises(BadInputError):
        loss([torch.zeros(1, 1, 2)], ht)  # layer 1 missing


def test_attention_mse_and_head_averaging():
    a_s = t([[[[1.0, 0.0], [0.5, 0.5]]]])  # [1, 1 head, 2, 2]
    a_t = t([[[[0.0, 1.0], [0.5, 0.5]]]])
    assert float(attention_loss([a_s], [a_t], {0: 0})) == pytest.approx(0.5, abs=1e-7)  # (1 + 1 + 0 + 0) / 4
    assert float(attention_loss([a_s], [a_t], {0: 0}, reduction="row_l2")) == pytest.approx(1.0, abs=1e-7)
    assert float(attention_loss([a_s], [a_t], {0: 0}, mask=torch.tensor([[0, 1]]))) == pytest.approx(0.0, abs=1e-7)
    # student 2 heads vs teacher 1 head: heads averaged -> student mean row 0 = (0.5, 0.5)
    a_s2 = t([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])
    assert float(attention_loss([a_s2], [a_t], {0: 0})) == pytest.approx((0.25 + 0.25) / 4, abs=1e-7)
    # layer map: student layer 0 <- teacher layer 1
    assert float(attention_loss([a_t], [a_s, a_t], {0: 1})) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(BadInputError):
        attention_loss([a_s], [a_t], {0: 0}, reduction="kl")


def test_self_distillation_and_born_again():
    shallow, deep, y = t([[1.0, 0.0]]), t([[0.0, 1.0]]), torch.tensor([1])
    expected = -math.log(SIG1) + 0.5 * (2 * SIG1 - 1) + 0.5 * (-math.log(1 - SIG1))
    assert float(self_distillation_loss([shallow, deep], y, 1.0, alpha=0.5)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(BadInputError):
        self_distillation_loss([deep], y, 1.0)
    net = torch.nn.Linear(2, 2)
    teacher = frozen_copy(net)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in net.parameters())


def test_layer_maps():
    assert every_other_layer_map(3, 6) == {0: 0, 1: 2, 2: 4, 3: 6}
    assert every_other_layer_map(3, 6, with_embeddings=False) == {0: 1, 1: 3, 2: 5}
    with pytest.raises(BadInputError):
        every_other_layer_map(4, 6)


# -- students ---------------------------------------------------------------------------------------------------


def test_cnn_shrink_param_counts():
    from deployer.distill.students import count_params, shrink
    from deployer.examples import mnist

    teacher = mnist.make_net()
    assert count_params(teacher) == 105866
    x = torch.zeros(1, 1, 28, 28)
    half, desc = shrink(teacher, "shrink:0.5", x)
    # conv 1->8: 80, conv 8->16: 1168, fc 16*49->32: 25120, fc 32->10: 330
    assert count_params(half) == 80 + 1168 + 25120 + 330 and desc["width"] == 0.5
    auto, desc = shrink(teacher, "shrink", x)
    assert count_params(auto) <= count_params(teacher) / 4 and desc["width"] == 0.45
    assert auto(x).shape == (1, 10)
    # initialised from the teacher's largest-L1 filters
    keep = torch.argsort(teacher.c1.weight.abs().sum((1, 2, 3)), descending=True)[:8].sort().values
    assert torch.equal(half.c1.weight, teacher.c1.weight[keep])
    for bad in ("shrink:0", "shrink:x", "prune"):
        with pytest.raises(BadInputError):
            shrink(teacher, bad, x)


def test_transformer_shrink_keeps_every_other_layer():
    transformers = pytest.importorskip("transformers")
    from deployer.distill.students import count_params, shrink

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    teacher.set_attn_implementation("eager")  # sdpa returns no attention maps
    student, desc = shrink(teacher, "shrink")
    assert desc["kept_teacher_layers"] == [1, 3, 5] and len(student.encoder.layer) == 3
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    per_layer = count_params(teacher.encoder.layer[0])
    assert count_params(student) == count_params(teacher) - 3 * per_layer
    for i, k in enumerate((1, 3, 5)):
        a, b = student.encoder.layer[i].state_dict(), teacher.encoder.layer[k].state_dict()
        assert all(torch.equal(a[n], b[n]) for n in a)
    ids = torch.tensor([[1, 2, 3, 0]])
    out = student(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0]]), output_attentions=True)
    assert len(out.attentions) == 3


# -- fake quantization ------------------------------------------------------------------------------------------


def test_fake_quant_matches_hand_computation():
    from deployer.distill.qat import FakeQuantWeight, activation_qparams, weight_scale

    w = t([[0.25, -1.0, 0.3], [2.0, 0.1, -0.3]]).requires_grad_()
    assert torch.allclose(weight_scale(w), t([1 / 127, 2 / 127]))
    q = FakeQuantWeight(8, per_channel=True, axis=0)(w)
    # row 0: scale 1/127: 0.25 -> 31.75 -> 32; 0.3 -> 38.1 -> 38; row 1: scale 2/127: 0.1 -> 6.35 -> 6; -0.3 -> -19.05 -> -19
    expected = t([[32 / 127, -1.0, 38 / 127], [2.0, 6 * 2 / 127, -19 * 2 / 127]])
    assert torch.allclose(q, expected, atol=1e-7)
    q.sum().backward()  # straight-through estimator: gradient 1 inside the range
    assert torch.equal(w.grad, torch.ones_like(w))
    qt = FakeQuantWeight(8, per_channel=False)(t([[0.25, -1.0], [2.0, 0.1]]))
    assert torch.allclose(qt, t([[16 * 2 / 127, -64 * 2 / 127], [2.0, 6 * 2 / 127]]), atol=1e-7)
    scale, zp = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == -64  # round(-128 + 1 / (4/255)) = round(-64.25)
    assert activation_qparams(0.5, 2.0) == (pytest.approx(2 / 255), -128)  # range widened to hold 0


# -- factories ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, words", [
    ("nocolon", "module:function"),
    ("a:b:c", "module:function"),
    ("no_such_module_xyz:f", "cannot import"),
    ("json:no_such_function", "no attribute"),
    ("json:__doc__", "not a function"),
    ("builtins:dict", "not a torch.nn.Module"),
    ("math:sqrt", "the factory raised"),
])
def test_factory_errors_are_one_line(spec, words):
    from deployer.distill.students import build_from_factory

    with pytest.raises(BadInputError) as e:
        build_from_factory(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


# -- training loop: determinism and resume -------------------------------------------------------------------------


def _toy_run(ckpt, resume=False, stop_at=None, epochs=3):
    from deployer.distill.train import LoopConfig, train_loop

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    calls = {"n": 0}

    def loss_fn(batch, labels):
        calls["n"] += 1
        if stop_at is not None and calls["n"] == stop_at:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(net(batch["x"]), labels)

    rec = train_loop(net, loss_fn, {"x": x}, y, [], LoopConfig(epochs=epochs, batch_size=8, lr=0.05, seed=3,
                                                                 checkpoint_every=1), ckpt, "k", resume)
    return net, rec


def test_resume_continues_where_interrupted(tmp_path):
    ckpt = tmp_path / "c" / "checkpoint.pt"
    full, _ = _toy_run(None)
    again, _ = _toy_run(None)
    assert torch.equal(full.weight, again.weight)  # deterministic
    with pytest.raises(KeyboardInterrupt):
        _toy_run(ckpt, stop_at=8)  # interrupted in epoch 2 (5 batches per epoch)
    assert ckpt.is_file()
    resumed, rec = _toy_run(ckpt, resume=True)
    assert rec.resumed_from == {"epoch": 1, "batch": 2}
    assert torch.allclose(resumed.weight, full.weight, atol=1e-6)
    from deployer.distill.train import load_checkpoint

    with pytest.raises(BadInputError):
        load_checkpoint(ckpt, "another-run")


# -- CLI: a user factory teacher on a data folder -------------------------------------------------------------------


def _user_setup(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent("""
        import torch

        def teacher():
            torch.manual_seed(1)
            return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

        def student(teacher):
            return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userpkg", None)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "x.npy", rng.normal(size=(60, 6)).astype(np.float32))
    np.save(data / "labels.npy", rng.integers(0, 3, 60))
    return data


def test_cli_distill_user_factory(tmp_path, monkeypatch, capsys):
    from deployer.cli import main

    data = _user_setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    code = main(["distill", "--teacher", "userpkg.models:teacher", "--student", "userpkg.models:student",
                 "--data", str(data), "--epochs", "2", "--qat-epochs", "1", "--temperature", "learn",
                 "--out", str(out), "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [".deployer-manifest.json", "distill_report.json", "student.onnx",
                                                     "student.pt"]
    assert rep["student"]["parameters"] == 6 * 8 + 8 + 8 * 3 + 3
    assert 3.0 <= rep["training"]["distill"]["final_temperature"] <= 10.0
    assert rep["training"]["qat"]["fake_quantized_modules"] == 2
    assert {"teacher_accuracy", "student_accuracy", "top1_agreement"} <= set(rep["fidelity"])
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    import deployer

    schema = json.loads((Path(deployer.__file__).parent / "schemas" / "distill-report.schema.json").read_text())
    jsonschema.validate(rep, schema)
    jsonschema.validate(json.loads((out / "distill_report.json").read_text()), schema)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # checkpoints and temp folders removed
    # existing output without --overwrite: exit 2, one line, untouched
    assert main(["distill", "--teacher", "userpkg.models:teacher", "--data", str(data), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--teacher", "nomodule_zz:f", "--data", "DATA"], "cannot import"),
    (["--teacher", "userpkg.models:teacher"], "needs --data"),
    (["--teacher", "example:nope"], "built-in teachers"),
    (["--teacher", "example:mnist", "--data", "example:minilm"], "its own data"),
    (["--teacher", "userpkg.models:teacher", "--data", "DATA", "--temperature", "hot"], "--temperature"),
    (["--teacher", "userpkg.models:teacher", "--data", "DATA", "--student", "shrink"], "shrink"),
])
def test_cli_distill_bad_input(tmp_path, monkeypatch, capsys, argv, words):
    from deployer.cli import main

    data = _user_setup(tmp_path, monkeypatch)
    argv = [str(data) if a == "DATA" else a for a in argv]
    assert main(["distill", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deploy: error:") and words in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_deploy_distill_needs_an_example(tmp_path, capsys):
    from deployer.cli import main

    assert main(["--model", str(tmp_path / "m.onnx"), "--distill", "shrink", "--target", "onnxruntime",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--distill works on the built-in examples" in capsys.readouterr().err


def test_transformer_distillation_loss_end_to_end():
    """The MiniLM path on a tiny BERT: shrink, hidden-state + attention + embedding losses, gradients."""
    transformers = pytest.importorskip("transformers")
    from deployer.distill.data import Source
    from deployer.distill.run import DistillOptions, _build_student, make_loss

    class Embed(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).float()
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    teacher = Embed(transformers.BertModel(cfg)).eval()  # sdpa: the loss switches both to eager attention
    ids = torch.randint(1, 50, (6, 8))
    mask = torch.ones(6, 8, dtype=torch.long)
    mask[:3, 5:] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    src = Source("tiny", "embedding", teacher, ["input_ids", "attention_mask"], ["embedding"], data, None, data, None,
                 [{"input_ids": ids[:1].numpy(), "attention_mask": mask[:1].numpy()}], "tiny")
    student, desc = _build_student("shrink", src, 0, freeze_word_embeddings=True)
    assert desc["kept_teacher_layers"] == [1, 3] and "frozen" in desc
    loss_fn, extra, ldesc = make_loss(src, student, DistillOptions())
    assert ldesc["hidden_state_map"] == {"student 0": "teacher 0", "student 1": "teacher 2", "student 2": "teacher 4"}
    assert ldesc["attention_map"] == {"student layer 0": "teacher layer 1", "student layer 1": "teacher layer 3"}
    loss = loss_fn(data, None)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    layer_grad = student.bert.encoder.layer[0].attention.self.query.weight.grad
    assert layer_grad is not None and float(layer_grad.abs().sum()) > 0
    assert student.bert.embeddings.word_embeddings.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    # the teacher's own layers give zero hidden/attention loss against a copy of itself
    same, _ = _build_student("shrink:1.0", src, 0)
    same_fn, _, _ = make_loss(src, same, DistillOptions())
    assert float(same_fn(data, None).detach()) == pytest.approx(0.0, abs=1e-5)
