"""Pruning stage (deployer.prune): channel pruning through a residual, a concat and a depthwise conv with each
criterion, rules files, the 2:4 pattern in torch weights, through fine-tuning, through INT8 lowering (with
AdaRound) into the strongly typed TensorRT graph, the report's pruning section, and bad input.

Tiny models built here; a full run (prune, fine-tune, deploy to tensorrt + onnxruntime) takes ~30 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deployer.errors import BadInputError
from deployer.prune.options import PruneOptions, load_rules
from deployer.prune.pattern import check_2to4, is_2to4, mask_2to4, weight_patterns

ROOT = Path(__file__).resolve().parents[1]


class ResConcat(nn.Module):
    """conv-bn -> residual block -> depthwise -> concat of two 1x1 convs -> 1x1 -> linear -> output linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2, self.c3 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.b2 = nn.BatchNorm2d(32)
        self.c4 = nn.Conv2d(32, 32, 1)
        self.fc, self.out = nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b0(self.c0(x)))
        x = x + torch.relu(self.b1(self.c1(x)))  # residual: c0 and c1 outputs must lose the same channels
        x = self.dw(x)  # depthwise: its channels follow its input's
        x = torch.relu(self.b2(torch.cat([self.c2(x), self.c3(x)], 1)))  # concat: c4's inputs split in two
        x = torch.relu(self.c4(x))
        return self.out(torch.relu(self.fc(x.mean((2, 3)))))


def make_net(seed: int = 0) -> ResConcat:
    torch.manual_seed(seed)
    net = ResConcat()
    with torch.no_grad():  # distinct BN scales so bn-scale has something to rank
        for bn in (net.b0, net.b1, net.b2):
            bn.weight.copy_(torch.rand(bn.num_features) + 0.1)
    return net.eval()


def _source(n: int = 200, seed: int = 0):  # type: ignore[no-untyped-def]
    from deployer.distill.data import Source

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    teacher = make_net(seed)
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        y = teacher(torch.from_numpy(x)).argmax(1)
    k = int(n * 0.7)
    return Source("tiny:ResConcat", "classification", teacher, ["x"], ["logits"], {"x": torch.from_numpy(x[:k])},
                  y[:k], {"x": torch.from_numpy(x[k:])}, y[k:], [{"x": x[i:i + 1]} for i in range(32)], "test split")


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "taylor"])
def test_channel_pruning_through_residual_concat_depthwise(criterion: str) -> None:
    from deployer.prune.structured import count_macs_params, prune_channels

    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    ref_macs, ref_params = count_macs_params(net, (x[:1],))
    loss = (lambda m: m(x).logsumexp(1).mean()) if criterion == "taylor" else None
    info = prune_channels(net, (x[:1],), PruneOptions(ratio=0.5, criterion=criterion), loss)
    assert net(x).shape == (2, 4)  # output unchanged; the model runs
    assert info["output_layer"] == "out" and net.out.out_features == 4
    # the residual group lost channels together, the depthwise conv followed, the concat consumer followed
    assert net.c0.out_channels == net.c1.out_channels == net.dw.in_channels == net.dw.out_channels < 16
    assert net.dw.groups == net.dw.out_channels
    assert net.c4.in_channels == net.c2.out_channels + net.c3.out_channels
    assert net.b0.num_features == net.c0.out_channels and net.b2.num_features == net.c4.in_channels
    if criterion != "bn-scale":  # bn-scale ranks only groups holding a BatchNorm (c0/c1 and c2/c3)
        assert net.fc.out_features < 32 and net.c4.out_channels < 32
    macs, params = count_macs_params(net, (x[:1],))
    assert macs < 0.6 * ref_macs and params < 0.6 * ref_params
    assert info["layers"]["c0"] == {"before": 16, "after": net.c0.out_channels}


def test_frozen_model_is_pruned_and_stays_frozen() -> None:
    from deployer.prune.structured import prune_channels

    net = make_net()
    for p in net.parameters():
        p.requires_grad_(False)
    prune_channels(net, (torch.randn(1, 3, 8, 8),), PruneOptions(ratio=0.5))
    assert net.c0.out_channels == 8 and not any(p.requires_grad for p in net.parameters())


def test_criteria_choose_different_channels() -> None:
    from deployer.prune.structured import prune_channels

    x = torch.randn(1, 3, 8, 8)
    kept = {}
    for crit in ("l1", "bn-scale"):
        net = make_net()
        b_before = net.c2.bias.detach().clone()
        prune_channels(net, (x,), PruneOptions(ratio=0.5, criterion=crit))
        kept[crit] = {int(i) for i in range(16) if bool((net.c2.bias.detach() == b_before[i]).any())}
        assert len(kept[crit]) == 8
    assert kept["l1"] != kept["bn-scale"]


def test_rules_file(tmp_path: Path) -> None:
    from deployer.prune.structured import prune_channels

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - match: 'c[23]'\n    ratio: 0.5\n  - match: fc\n    ratio: 0.25\ndefault: 0\n")
    parsed, default = load_rules(rules)
    assert [(r.match, r.ratio) for r in parsed] == [("c[23]", 0.5), ("fc", 0.25)] and default == 0
    net = make_net()
    prune_channels(net, (torch.randn(1, 3, 8, 8),), PruneOptions(rules=parsed, default=default))
    assert net.c0.out_channels == 16 and net.c1.out_channels == 16  # kept (ratio 0 by default)
    assert net.c2.out_channels == 8 and net.c3.out_channels == 8 and net.c4.in_channels == 16
    assert net.fc.out_features == 24 and net.c4.out_channels == 32
    js = tmp_path / "rules.json"
    js.write_text(json.dumps({"c4": 0.5}))
    assert [(r.match, r.ratio) for r in load_rules(js)[0]] == [("c4", 0.5)]
    for bad in ("rules: [{match: c1, ratio: 1.5}]", "rules: [{match: c1}]", "c1: yes", "rules: []\nextra: 1"):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(BadInputError):
            load_rules(tmp_path / "bad.yaml")


def test_2to4_mask_and_checker() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 16, 3, 3)).astype(np.float32)
    keep = mask_2to4(w, 1)
    assert keep.shape == w.shape and keep.mean() == 0.5
    sparse = w * keep
    assert is_2to4(sparse, 1) and not is_2to4(w, 1)
    assert not is_2to4(sparse, 0) or True  # the pattern is along input channels only
    # kept = the 2 largest |w| of each group of 4 input channels, at every (output channel, kernel position)
    g = np.abs(np.moveaxis(w, 1, -1)).reshape(-1, 4)
    gk = np.moveaxis(keep, 1, -1).reshape(-1, 4)
    assert np.all(np.sort(g, 1)[:, 2:].sum(1) == np.where(gk, g, 0).sum(1))
    assert not is_2to4(np.ones((8, 6), np.float32), 1)  # not a whole number of groups
    with pytest.raises(ValueError):
        mask_2to4(np.ones((8, 6), np.float32), 1)


def test_2to4_eligibility_and_masks_survive_finetuning() -> None:
    from deployer.prune import semi

    net = make_net()
    info = semi.apply_2to4(net)
    assert info["sparse_layers"] == ["c1", "c2", "c3", "c4", "fc"]  # c0: 3 inputs; dw: depthwise; out: 4 outputs
    assert "groups 16" in info["skipped"]["dw"] and "% 16" in info["skipped"]["out"]
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    net.train()
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
        opt.step()
    semi.bake_masks(net)
    assert all(semi.torch_pattern_holds(net, info["sparse_layers"]).values())
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in net.modules())


def test_adaround_keeps_exact_zeros() -> None:
    from deployer.adaround import rounded_weight

    w = np.array([[0.0, 0.3, 0.0, -0.7], [0.2, 0.0, 0.0, 0.5]], np.float32)
    q = rounded_weight(w, 0, np.ones_like(w, dtype=bool))  # every bit says "round up"
    assert np.all(q[w == 0] == 0) and np.all(q[w != 0] != 0)


@pytest.fixture(scope="module")
def pruned_deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run: 50% channels + 2:4, 1 epoch of distillation, deploy to tensorrt + onnxruntime with AdaRound."""
    from deployer.pipeline import DeployOptions
    from deployer.prune.run import deploy_with_prune

    out = tmp_path_factory.mktemp("prune") / "out"
    deploy_with_prune(None, out, DeployOptions(targets="tensorrt,onnxruntime", adaround=5.0),
                      PruneOptions(ratio=0.5, sparsity="2:4", epochs=1, threads=1), source=_source())
    return out


def test_2to4_pattern_in_int8_strongly_typed_graph(pruned_deploy: Path) -> None:
    lowered = onnx.load(str(pruned_deploy / "tensorrt" / "model_strongly_typed.onnx"))
    pats = {p.node: p for p in weight_patterns(lowered)}
    fp32 = check_2to4(onnx.load(str(pruned_deploy / "prune" / "pruned.onnx")))
    assert sorted(fp32["sparse_nodes"]) == ["/c4/Conv", "/fc/Gemm"]  # type: ignore[arg-type]
    for node in fp32["sparse_nodes"]:  # type: ignore[attr-defined]
        assert pats[node].dtype == "int8" and pats[node].sparse, node
    assert not pats["/c1/Conv"].sparse  # dense layers stay dense
    report = json.loads((pruned_deploy / "report.json").read_text())
    trt = report["targets"]["tensorrt"]
    assert trt["sparsity"]["ok"] and sorted(trt["sparsity"]["sparse_nodes"]) == ["/c4/Conv", "/fc/Gemm"]
    assert report["plan"] and json.loads((pruned_deploy / "plan.json").read_text())["rounding"]  # AdaRound ran
    script = (pruned_deploy / "tensorrt" / "build_engine.sh").read_text()
    assert "--sparsity=enable" in script and "--sparse-weights" in script


def test_report_pruning_section(pruned_deploy: Path) -> None:
    import jsonschema

    report = json.loads((pruned_deploy / "report.json").read_text())
    schema = json.loads((ROOT / "deployer" / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    p = report["pruning"]
    assert p["criterion"] == "l1" and p["ratio"] == 0.5 and p["sparse_layers"] == ["c4", "fc"]
    st = p["stages"]
    for name in ("original", "pruned", "finetuned"):
        for key in ("params", "macs", "size_bytes", "fidelity", "latency_ms"):
            assert st[name][key] is not None, (name, key)
    assert st["pruned"]["params"] < 0.5 * st["original"]["params"] and st["finetuned"]["macs"] < st["original"]["macs"]
    assert st["finetuned"]["effective_macs_2to4"] < st["finetuned"]["macs"]
    assert st["original"]["fidelity"]["top1_agreement"] == 1.0
    q = st["quantized"]
    assert set(q) == {"tensorrt", "onnxruntime"}
    assert 0.0 <= q["onnxruntime"]["fidelity"]["top1_agreement_vs_unpruned"] <= 1.0
    assert q["onnxruntime"]["latency_ms"] > 0 and q["tensorrt"]["latency_ms"] is None
    assert q["tensorrt"]["sparsity"]["ok"]
    sub = json.loads((pruned_deploy / "prune" / "pruning_report.json").read_text())
    assert sub["sparsity"]["torch_pattern_holds"] and sub["training"]["steps"] > 0


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{cwd or ''}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deployer.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["prune", "--model", "nosuch.mod:net", "--ratio", "1.5"], "--ratio 1.5"),
    (["prune", "--model", "nosuch.mod:net", "--ratio", "0"], "--ratio 0"),
    (["prune", "--model", "nosuch.mod:net", "--ratio", "0.3", "--criterion", "fisher"], "--criterion 'fisher'"),
    (["prune", "--model", "nosuch.mod:net"], "nothing to prune"),
    (["prune", "--model", "nosuch.mod:net", "--rules", "missing.yaml"], "missing.yaml"),
    (["--model", "mnist", "--prune", "-0.2", "--target", "onnxruntime"], "--prune -0.2"),
    (["--model", "mnist", "--prune", "0.3", "--prune-criterion", "x", "--target", "onnxruntime"], "--criterion 'x'"),
    (["--model", "mnist", "--sparsity", "1:4"], "--sparsity"),
])
def test_bad_input_one_line_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    r = _cli(*args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_deploy_prune_cli_user_factory(tmp_path: Path) -> None:
    (tmp_path / "tinynet.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom tests.test_prune import make_net\n\ndef net():\n    return make_net(1)\n"
        % str(ROOT))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    np.save(data / "x.npy", rng.normal(size=(80, 3, 8, 8)).astype(np.float32))
    np.save(data / "labels.npy", rng.integers(0, 4, 80))
    out = tmp_path / "p"
    r = _cli("prune", "--model", "tinynet:net", "--ratio", "0.3", "--criterion", "l2", "--data", str(data), "--out",
             str(out), "--epochs", "1", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".deployer-manifest.json", "pruned.onnx", "pruned.pt",
                                                     "pruning_report.json"]
    rep = json.loads((out / "pruning_report.json").read_text())
    assert rep == json.loads(r.stdout)
    assert rep["pruning"]["criterion"] == "l2" and "not_run" in rep["pruning"]["stages"]["quantized"]
    m = onnx.load(str(out / "pruned.onnx"))
    first = next(n for n in m.graph.node if n.op_type == "Conv")  # c0 (its BatchNorm folded in)
    conv0 = next(i for i in m.graph.initializer if i.name == first.input[1])
    assert conv0.dims[0] < 16  # fewer channels in the exported graph
    sd = torch.load(out / "pruned.pt", weights_only=True)
    assert sd["c0.weight"].shape[0] == conv0.dims[0]
    import onnxruntime as ort

    from deployer.prune.structured import load_pruned_state

    net = load_pruned_state(make_net(7), sd)  # a fresh unpruned instance takes the pruned weights
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], ref, atol=1e-4)


def test_recommend_batch_is_a_runnable_prune_command() -> None:
    from deployer.cli import build_parser
    from deployer.prune.cli import deploy_options_from
    from deployer.recommend import recommend

    r = recommend("cost", "batch", "mnist")
    assert r.technique == "distillation + pruning" and r.steps_outside == []
    assert r.argv[:3] == ["deploy", "--model", "mnist"] and "--prune" in r.argv
    opts = deploy_options_from(build_parser().parse_args(r.argv[1:]))
    assert opts is not None and opts.ratio == 0.3 and opts.criterion == "l1" and opts.epochs == 3
    user = recommend("cost", "batch", "pkg.models:net")
    assert user.steps_outside and user.steps_outside[0].startswith("deploy prune --model pkg.models:net --ratio 0.3")


@pytest.mark.real_model
def test_recommend_batch_runs_end_to_end_on_mnist(tmp_path: Path) -> None:
    """The recommended command, with a reduced budget (1 epoch, 100 held-out digits): about a minute."""
    from deployer.recommend import recommend

    argv = recommend("cost", "batch", "mnist").argv[1:]
    out = tmp_path / "out"
    r = _cli(*argv, "--out", str(out), "--prune-epochs", "1", "--prune-threads", "1", "--heldout-samples", "100",
             "--calib-samples", "64", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    st = report["pruning"]["stages"]
    assert st["finetuned"]["params"] < 0.7 * st["original"]["params"]
    assert st["quantized"]["onnxruntime"]["fidelity"]["label_accuracy"] > 0.85
    assert (out / "prune" / "pruned.onnx").is_file()
