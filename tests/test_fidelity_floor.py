"""The fidelity floor (issue 18): every output judged, a floor by default, escalation per target scored on
the target's own artifact, verdicts and exit codes; reduced cases built in code (tests/models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deployer.cli import main
from deployer.escalate import relative_score
from deployer.judge import FidelityFloor, below_floor, judge, output_kind
from deployer.errors import BadInputError
from models import outlier_matmul, scores_and_boxes, write_outlier_samples, write_samples

QDQ = "tensorrt,onnxruntime"


def _run(*args: str) -> int:
    return main([*args, "--quiet"])


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, int]:
    """One default deploy of the outlier model on two QDQ targets (shared by the tests below)."""
    d = tmp_path_factory.mktemp("outlier")
    model = outlier_matmul(d / "m.onnx")
    calib = write_outlier_samples(d / "calib", 30)
    out = d / "out"
    rc = _run("--model", str(model), "--calib", str(calib), "--target", QDQ, "--out", str(out))
    return model, calib, out, rc


def test_below_the_floor_each_target_escalates_on_its_own_artifact(outlier: tuple[Path, Path, Path, int]) -> None:
    """Full INT8 gives SQNR ~0 dB; each target keeps mm1 in FP16, verified on held-out samples, and ships."""
    _, _, out, rc = outlier
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for t in QDQ.split(","):
        entry = report["targets"][t]
        floor = entry["fidelity_floor"]
        assert floor["escalated"] is True and floor["before"]["sqnr_db"] < 5.0, floor
        assert floor["escalation"]["kept"] == ["mm1"], floor
        assert floor["escalation"]["evaluations"] <= 13
        assert entry["verdict"]["ships"] is True and floor["passed"] is True
        assert entry["fidelity"]["sqnr_db"] >= 20.0 and entry["gates"]["fidelity-floor"]["status"] == "pass"
        target_plan = json.loads((out / t / "plan.json").read_text())
        assert target_plan["nodes"]["mm1"]["precision"] == "fp16"
    shared = json.loads((out / "plan.json").read_text())
    assert shared["nodes"]["mm1"]["precision"] == "int8"  # the shared plan is never changed


def test_a_given_plan_is_never_escalated_and_a_miss_exits_1(outlier: tuple[Path, Path, Path, int],
                                                           tmp_path: Path) -> None:
    model, calib, out, _ = outlier
    dest = tmp_path / "again"
    rc = _run("--model", str(model), "--calib", str(calib), "--target", "tensorrt", "--out", str(dest),
              "--plan", str(out / "plan.json"))
    assert rc == 1
    entry = json.loads((dest / "report.json").read_text())["targets"]["tensorrt"]
    assert entry["verdict"]["ships"] is False and "not escalated" in entry["verdict"]["reason"]
    assert entry["fidelity_floor"]["escalated"] is False
    assert entry["gates"]["fidelity-floor"]["status"] == "fail"
    assert not (dest / "tensorrt" / "plan.json").exists()


def test_an_unreachable_floor_marks_does_not_ship_and_exits_1(tmp_path: Path) -> None:
    model = scores_and_boxes(tmp_path / "head.onnx")
    calib = write_samples(tmp_path / "calib", {"x": (1, 3, 8, 8)}, 30)
    out = tmp_path / "out"
    rc = _run("--model", str(model), "--calib", str(calib), "--target", "onnxruntime", "--out", str(out),
              "--min-fidelity", "sqnr_db=300")
    assert rc == 1
    entry = json.loads((out / "report.json").read_text())["targets"]["onnxruntime"]
    assert entry["verdict"]["ships"] is False and "after escalation" in entry["verdict"]["reason"]
    assert entry["fidelity_floor"]["floor"] == {"cosine": 0.99, "sqnr_db": 300.0, "top1_agreement": 0.97}
    assert entry["fidelity_floor"]["escalation"]["stopped_on"] == "budget"


def test_every_output_is_judged_with_its_kind_and_the_summary_is_the_worst(tmp_path: Path) -> None:
    model = scores_and_boxes(tmp_path / "head.onnx")
    calib = write_samples(tmp_path / "calib", {"x": (1, 3, 8, 8)}, 30)
    out = tmp_path / "out"
    assert _run("--model", str(model), "--calib", str(calib), "--target", "tensorrt", "--out", str(out)) == 0
    fid = json.loads((out / "report.json").read_text())["targets"]["tensorrt"]["fidelity"]
    outs = fid["outputs"]
    assert outs["scores"]["kind"] == "class_scores" and "top1_agreement" in outs["scores"]
    assert outs["boxes"]["kind"] == "regression" and "top1_agreement" not in outs["boxes"]
    assert outs["boxes"]["metric"] == "sqnr_db" and outs["boxes"]["max_abs_error"] >= 0
    assert fid["sqnr_db"] == min(o["sqnr_db"] for o in outs.values())
    assert fid["cosine_mean"] == min(o["cosine"] for o in outs.values())
    assert fid["samples"] == 6 and outs["scores"]["samples"] == 6
    assert "ci95" in outs["scores"] and "warning" in fid  # fewer than 30 held-out samples


def test_output_kinds_from_names_values_and_task() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((5, 4))
    probs /= probs.sum(1, keepdims=True)
    seq = rng.random((5, 7, 6))
    seq /= seq.sum(-1, keepdims=True)
    shapes = {"x": (1, 4, 16), "h0": (1, 1, 8)}
    assert output_kind("hn", rng.standard_normal((5, 1, 8)), 1, "generic", shapes) == "state"
    assert output_kind("state_out", rng.standard_normal((5, 8)), 1, "generic", shapes) == "state"
    assert output_kind("probs", probs, 0, "generic", shapes) == "class_scores"
    assert output_kind("ctc", seq, 0, "generic", shapes) == "sequence"
    assert output_kind("heat", rng.random((5, 1, 8, 8)), 0, "generic", shapes) == "map"
    assert output_kind("boxes", rng.standard_normal((5, 4)), 1, "generic", shapes) == "regression"
    assert output_kind("logits", rng.standard_normal((5, 10)), 0, "classification", shapes) == "class_scores"


def test_a_one_element_output_is_judged_by_sqnr_not_a_cosine_of_one() -> None:
    """Regression (issue 18): a one-element output's cosine is 1.0 whenever the signs agree."""
    ref = [[np.array([[2.0]], np.float32)] for _ in range(10)]
    out = [[np.array([[2.0 + (0.9 if i % 2 else -0.9)]], np.float32)] for i in range(10)]
    fid = judge(ref, out, ["score"], "generic")
    rec = fid["outputs"]["score"]
    assert rec["kind"] == "regression" and rec["cosine"] == pytest.approx(1.0)
    assert rec["sqnr_db"] < 10 and relative_score(fid) < 0.9
    assert below_floor(fid, FidelityFloor()) == [f"score: SQNR {rec['sqnr_db']:.1f} dB < 20.0 dB"]


def test_sequence_outputs_get_step_agreement() -> None:
    rng = np.random.default_rng(1)
    p = rng.random((4, 9, 5))
    p /= p.sum(-1, keepdims=True)
    q = p.copy()
    q[0, 0] = q[0, 0][::-1]  # one step of one sample changes its arg-max
    fid = judge([[x[None]] for x in p], [[x[None]] for x in q], ["ctc"], "generic")
    rec = fid["outputs"]["ctc"]
    assert rec["kind"] == "sequence"
    expected = 1 - int(np.argmax(p[0, 0]) != np.argmax(q[0, 0])) / 36
    assert rec["step_agreement"] == pytest.approx(expected, abs=1e-6)


def test_min_fidelity_parsing() -> None:
    assert FidelityFloor.parse("cosine=0.995,sqnr_db=25") == FidelityFloor(0.995, 25.0)
    assert FidelityFloor.parse("top1_agreement=0.9").top1_agreement == 0.9
    assert FidelityFloor.parse(0.98) == FidelityFloor(cosine=0.98)
    assert FidelityFloor.parse({"sqnr_db": 10}) == FidelityFloor(sqnr_db=10.0)
    for bad in ("psnr=3", "cosine=abc", "cosine=2", "top1_agreement=1.5"):
        with pytest.raises(BadInputError):
            FidelityFloor.parse(bad)


def test_bad_min_fidelity_and_heldout_with_eval_refused_before_model_work(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no-such-model.onnx")  # never opened: the option check comes first
    out = tmp_path / "out"
    assert main(["--model", missing, "--calib", str(tmp_path), "--target", "tensorrt", "--out", str(out),
                 "--min-fidelity", "psnr=3"]) == 2
    assert "--min-fidelity" in capsys.readouterr().err
    assert main(["--model", missing, "--calib", str(tmp_path), "--target", "tensorrt", "--out", str(out),
                 "--heldout", str(tmp_path), "--eval", str(tmp_path)]) == 2
    assert "--heldout and --eval" in capsys.readouterr().err
    assert not out.exists()


def test_heldout_dir_replaces_the_held_out_split(tmp_path: Path) -> None:
    model = scores_and_boxes(tmp_path / "head.onnx")
    calib = write_samples(tmp_path / "calib", {"x": (1, 3, 8, 8)}, 12)
    held = write_samples(tmp_path / "held", {"x": (1, 3, 8, 8)}, 7, seed=5)
    out = tmp_path / "out"
    assert _run("--model", str(model), "--calib", str(calib), "--heldout", str(held), "--target", "onnxruntime",
                "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["onnxruntime"]["fidelity"]["samples"] == 7


def test_a_target_that_cannot_deliver_fails_alone(tmp_path: Path) -> None:
    """With several targets, one target that cannot deliver (here tflite under --strict, whose int8 DIV
    stays float) is reported failed with its own code while the others deliver; the run's code is the worst."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Abs", ["h"], ["a"], name="abs"),
             helper.make_node("Add", ["a", "one"], ["den"], name="add"),
             helper.make_node("Div", ["h", "den"], ["y"], name="div")]
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    g = helper.make_graph(nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w, one])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model = tmp_path / "div.onnx"
    model.write_bytes(m.SerializeToString())
    calib = write_samples(tmp_path / "calib", {"x": (1, 8)}, 20)
    out = tmp_path / "out"
    rc = _run("--model", str(model), "--calib", str(calib), "--target", "tensorrt,tflite", "--out", str(out),
              "--strict")
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["tensorrt"]["verdict"]["ships"] is True
    failed = report["targets"]["tflite"]
    assert failed["verdict"]["ships"] is False and failed["error"]["exit_code"] == 1
    assert "--strict" in failed["error"]["message"]
    assert (out / "tensorrt").is_dir() and not (out / "tflite").exists()


def test_an_unknown_soc_version_is_refused_before_model_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "never-read.onnx"), "--calib", str(tmp_path), "--target", "tensorrt,ascend",
                 "--out", str(out), "--soc-version", "Ascend999"]) == 2
    assert "Ascend999" in capsys.readouterr().err and not out.exists()



def test_top1_floor_is_judged_only_on_enough_samples() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((40, 5))
    out = ref.copy()
    out[:3] = out[:3][:, ::-1] * 1.001  # three of 40 samples change their arg-max: agreement 0.925
    rows = lambda a: [[x[None]] for x in a]  # noqa: E731
    fid = judge(rows(ref), rows(out), ["logits"], "classification")
    assert any("top-1 agreement 0.925" in m for m in below_floor(fid, FidelityFloor(cosine=-1.0, sqnr_db=-100.0)))
    few = judge(rows(ref[:10]), rows(out[:10]), ["logits"], "classification")  # 10 samples: too coarse to gate
    assert below_floor(few, FidelityFloor(cosine=-1.0, sqnr_db=-100.0)) == []
