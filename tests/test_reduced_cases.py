"""Issue 22's reduced public bug cases deploy on every QDQ target (exit 0 with a report; a refusal does not count).

Each case (:mod:`reduced_models`: float16 and bfloat16 MatMul-Relu-MatMul, mixed-dtype inputs, grouped
Conv, ConvTranspose with groups 1 and 2, Gemm biases ``[N]``, ``[1, N]`` and scalar) goes through the
real CLI for tensorrt, ascend and onnxruntime at once. Before the fix: float16 gave an ``InvalidGraph``
traceback (tensorrt, onnxruntime) or a refusal (ascend), the Ascend deploy form raised a broadcast
``ValueError`` (grouped ConvTranspose) and a ``TypeError`` (Gemm bias ``[1, N]``).

Also: every node left in float is in the report's ``float_nodes`` with a reason, and the Ascend deploy
form's integer arithmetic (:mod:`backends.ascend.reference`) matches its fake-quant graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deployer.cli import main
from reduced_models import CASE_NAMES, QDQ_TARGETS, case, write_samples


def deploy_case(tmp_path: Path, name: str, *extra: str) -> tuple[int, str, dict, Path]:
    model, shapes = case(name)
    onnx.save(model, str(tmp_path / "m.onnx"))
    calib = write_samples(tmp_path / "calib", shapes)
    out = tmp_path / "out"
    rc = main(["--model", str(tmp_path / "m.onnx"), "--calib", str(calib), "--out", str(out),
               "--target", ",".join((*QDQ_TARGETS, "tflite")), "--quiet", "--no-cache", *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return rc, str(calib), report, out


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reduced_case_deploys_on_every_target(tmp_path: Path, name: str, capsys) -> None:
    rc, _, report, out = deploy_case(tmp_path, name)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err
    assert set(report["targets"]) == {*QDQ_TARGETS, "tflite"}  # every target (issue 22's goal)
    for t, entry in report["targets"].items():
        sq = entry["fidelity"]["sqnr_db"]
        assert sq is None or sq > 25, (t, sq)  # the worst output: a real INT8 artifact, close to FP32
        assert isinstance(entry["float_nodes"], list), t
        for f in entry["float_nodes"]:
            assert set(f) == {"node", "op", "precision", "reason"} and f["reason"], f
    if name in ("float16_mlp", "bfloat16_mlp", "mixed_dtype"):
        source = "bfloat16" if name == "bfloat16_mlp" else "float16"
        for t, entry in report["targets"].items():
            assert any(f"stored in {source}" in n for n in entry["notes"]), (t, entry["notes"])
        assert json.loads((out / "plan.json").read_text())["model"]["source_precision"]["source_precision"] == source


def test_onnxruntime_lists_its_float_convtranspose(tmp_path: Path) -> None:
    """The issue's case: onnxruntime left a ConvTranspose float in model_int8_static.onnx with no note."""
    rc, _, report, out = deploy_case(tmp_path, "convtranspose_group2")
    assert rc == 0
    ort = report["targets"]["onnxruntime"]
    assert [(f["node"], f["op"], f["precision"]) for f in ort["float_nodes"]] == [("conv", "ConvTranspose", "fp32")]
    assert "ConvTranspose" in ort["float_nodes"][0]["reason"]
    assert any("left in float" in n for n in ort["notes"])
    lowered = onnx.load(str(out / "onnxruntime" / "model_int8_static.onnx"))
    conv = next(n for n in lowered.graph.node if n.name == "conv")
    producers = {o: n.op_type for n in lowered.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in conv.input)  # the listed node really is float
    for t in ("tensorrt", "ascend"):  # these quantize it: nothing listed
        assert report["targets"][t]["float_nodes"] == [], t


def test_float_nodes_name_what_the_plan_keeps_in_float(tmp_path: Path) -> None:
    """``--recipe fp16`` keeps every node in FP16: tensorrt runs them in FP16, onnxruntime as FP32 islands."""
    rc, _, report, _ = deploy_case(tmp_path, "float16_mlp", "--recipe", "fp16")
    assert rc == 0
    for t, precision in (("tensorrt", "fp16"), ("ascend", "fp16"), ("onnxruntime", "fp32")):
        fl = report["targets"][t]["float_nodes"]
        assert [f["node"] for f in fl] == ["mm1", "relu", "mm2"], (t, fl)
        assert {f["precision"] for f in fl} == {precision} and all("plan keeps it" in f["reason"] for f in fl)


def test_float16_plan_keeps_fp16_where_the_recipe_keeps_float(tmp_path: Path) -> None:
    """A float16 source: nodes the recipe leaves in float are FP16 in the plan (the target keeps them in
    FP16 where it can); INT8 nodes stay INT8."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"base": "int8", "rules": [{"match": {"op_type": "Relu"}, "precision": "fp32"}]}))
    rc, _, report, out = deploy_case(tmp_path, "float16_mlp", "--recipe", str(rules))
    assert rc == 0
    nodes = json.loads((out / "plan.json").read_text())["nodes"]
    assert nodes["relu"]["precision"] == "fp16" and "kept in FP16" in nodes["relu"]["reason"]
    assert nodes["mm1"]["precision"] == "int8"
    trt = report["targets"]["tensorrt"]["float_nodes"]
    assert [(f["node"], f["precision"]) for f in trt] == [("relu", "fp16")]


@pytest.mark.parametrize("name", ["convtranspose_group2", "gemm_bias_1n", "gemm_bias_n", "gemm_bias_scalar"])
def test_ascend_deploy_form_bias_and_scales(tmp_path: Path, name: str) -> None:
    """int32 bias = round(b / (x_scale * w_scale)) per output channel, one weight scale per kernel channel
    shared by the groups (ConvTranspose), whatever the bias shape."""
    rc, _, _, out = deploy_case(tmp_path, name)
    assert rc == 0
    params = json.loads((out / "ascend" / "quant_params.json").read_text())["int8_layers"]
    layer = params["conv" if name.startswith("conv") else "fc"]
    qdq = onnx.load(str(out / "ascend" / "model_qdq.onnx"))  # its bias carries the plan's bias correction
    bias_name = next(n for n in qdq.graph.node if n.name in ("conv", "fc")).input[2]
    b = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == bias_name)).astype(np.float64)
    n_out = 6 if name.startswith("conv") else 5
    deq = np.asarray(layer["deq_scale"], dtype=np.float64)
    assert deq.shape == (n_out,)
    np.testing.assert_array_equal(layer["bias_int32"], np.rint(np.broadcast_to(b.reshape(-1), (n_out,)) / deq))
    if name == "convtranspose_group2":
        ws = np.asarray(layer["w_scale"])
        np.testing.assert_array_equal(ws[:3], ws[3:])  # channel j of every group uses weight scale j


@pytest.mark.parametrize("name", ["gemm_bias_1n", "gemm_bias_scalar"])
def test_ascend_deploy_form_runs_like_its_fake_quant_graph(tmp_path: Path, name: str) -> None:
    from backends.ascend.reference import run_deploy_form
    from backends.base import onnx_runner

    rc, calib, _, out = deploy_case(tmp_path, name)
    assert rc == 0
    deploy = onnx.load(str(out / "ascend" / "model_deploy.onnx"))
    qdq = onnx_runner(onnx.load(str(out / "ascend" / "model_qdq.onnx")), optimize=False)
    for f in sorted(Path(calib).glob("*.npy"))[:4]:
        x = np.load(f)
        got = run_deploy_form(deploy, {"x": x})[0]
        want = qdq([{"x": x}])[0][0]
        scale = float(np.max(np.abs(want))) / 127
        np.testing.assert_allclose(got, want, atol=2 * scale)


def test_ascend_refuses_a_per_row_gemm_bias_in_one_line(tmp_path: Path) -> None:
    """A Gemm bias that differs per row (M > 1) cannot be an int32 per-channel bias: a clean refusal."""
    from backends.ascend.deploy_form import _bias_vector
    from deployer.errors import UnsupportedModelError

    node = onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")
    with pytest.raises(UnsupportedModelError, match="differs per row"):
        _bias_vector(node, np.zeros((2, 5)), 5)
    np.testing.assert_array_equal(_bias_vector(node, np.float32(0.5), 3), [0.5, 0.5, 0.5])
