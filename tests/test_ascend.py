"""Ascend backend: checker, deploy form (with a NumPy oracle of its integer arithmetic), the ATC command,
and contract tests against an ``atc`` *stand-in* (a script that validates the arguments the way ATC's
documentation states them; it is not ATC and compiles nothing).

Tiny models are built in code (``test_qdq_backends``): conv, depthwise, gemm, matmul with a constant
weight, residual add, avgpool, a Sigmoid Ascend does not quantize, attention.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_qdq_backends import MODELS, Case, _model, _w, case, plan_of, samples

from backends.ascend.atc import (DEFAULT_SOC_VERSION, SOC_VERSIONS, AippConfig, atc_argv, load_data, shape_args)
from backends.ascend.backend import AscendBackend, mask_tensors
from backends.ascend.checker import check
from backends.ascend.deploy_form import pack_deq_scale, to_deploy_form, unpack_deq_scale
from backends.ascend.reference import run_deploy_form
from backends.base import LoweringContext, onnx_runner
from deployer.cli import main
from deployer.errors import BadInputError
from deployer.graph import GraphView
from deployer.shapes import parse_input_shapes

F = TensorProto.FLOAT


def lower(name: str, tmp: Path, recipe: str = "int8", **options):
    c = case(name)
    art = AscendBackend().lower(LoweringContext(c.model, plan_of(name, recipe), tmp, c.calib, options))
    return art, onnx.load(str(art.path)), onnx.load(str(art.path.parent / "model_deploy.onnx"))


def rules(findings) -> set[str]:
    return {f.rule for f in findings if f.severity == "error"}


# -- data files ------------------------------------------------------------------------------------


def test_data_files_state_cann_version_and_source():
    for name in ("soc_versions.json", "ops.json"):
        d = load_data(name)
        assert d["cann_version"] and d["source"]
    assert DEFAULT_SOC_VERSION in SOC_VERSIONS and "Ascend910B" in SOC_VERSIONS
    ops = load_data("ops.json")
    assert {"Conv", "Gemm", "MatMul", "Softmax", "LayerNormalization"} <= set(ops["onnx_ops"])
    assert set(ops["quantizable_ops"]) == {"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "Add"}


# -- checker ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lowered_tiny_models_pass_the_checker(tmp_path, name):
    art, m, _ = lower(name, tmp_path)
    assert rules(check(m)) == set()
    assert art.extra["checker_findings"] == [f.to_dict() for f in check(m)]


def _qdq(x: str, s: str, z: str, out: str, axis: int | None = None) -> list[onnx.NodeProto]:
    kw = {"axis": axis} if axis is not None else {}
    return [helper.make_node("QuantizeLinear", [x, s, z], [out + "_q"], name=out + "_Q", **kw),
            helper.make_node("DequantizeLinear", [out + "_q", s, z], [out], name=out + "_DQ", **kw)]


def _gemm_model(w_scale: np.ndarray, w_zp: np.ndarray, act_op: str = "Gemm", opset: int = 13,
                input_type: int = F) -> onnx.ModelProto:
    w = _w(1, (8, 4), 8)
    nodes = _qdq("x", "xs", "xz", "xdq") + _qdq("w", "ws", "wz", "wdq", axis=1 if w_scale.size > 1 else None)
    nodes.append(helper.make_node("Gemm", ["xdq", "wdq"], ["y"], name="gemm"))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
             numpy_helper.from_array(np.array(3, np.int8), "xz"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(w_zp, "wz")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", input_type, [2, 8])],
                          [helper.make_tensor_value_info("y", F, [2, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_gemm_per_channel_and_asymmetric_weight():
    m = _gemm_model(np.full(4, 0.01, np.float32), np.array([0, 1, 0, 0], np.int8))
    found = check(m)
    assert {"weight-per-channel", "weight-asymmetric"} <= rules(found)
    f = next(f for f in found if f.rule == "weight-per-channel")
    assert f.node == "gemm" and "per-tensor" in f.fix or "one scale" in f.fix
    assert rules(check(_gemm_model(np.array(0.01, np.float32), np.array(0, np.int8)))) == set()


def test_checker_opset_domain_and_input_type():
    m = _gemm_model(np.array(0.01, np.float32), np.array(0, np.int8), opset=10, input_type=TensorProto.FLOAT16)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    m.graph.node.append(helper.make_node("FusedGemm", ["y"], ["z"], name="contrib", domain="com.microsoft"))
    found = rules(check(m))
    assert {"opset-range", "foreign-domain", "input-not-fp32"} <= found


def test_checker_untied_dq_unsupported_op_not_quantizable_and_mask_scale():
    w = _w(2, (4, 3, 3, 3), 27)
    wq = np.clip(np.rint(w / 0.01), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], name="w_DQ")]
    nodes += _qdq("x", "xs", "xz", "xdq")
    nodes.append(helper.make_node("Conv", ["xdq", "wdq"], ["c"], name="conv"))
    nodes += _qdq("c", "bigs", "xz", "cdq")
    nodes.append(helper.make_node("Sigmoid", ["cdq"], ["s"], name="sigmoid"))
    nodes.append(helper.make_node("Gelu", ["s"], ["y"], name="gelu"))
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"), numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(np.array(3.0e36, np.float32), "bigs")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", F, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    found = check(m)
    assert {"qdq-untied", "op-not-quantizable", "op-unsupported", "scale-nonfinite"} <= rules(found)
    by_rule = {f.rule: f for f in found}
    assert by_rule["op-not-quantizable"].node == "sigmoid"
    assert by_rule["op-unsupported"].node == "gelu" and "CANN" in by_rule["op-unsupported"].source
    assert all(f.fix for f in found)


def test_checker_activation_matmul_and_weight_only():
    x = helper.make_tensor_value_info("x", F, [2, 4, 16])
    nodes = _qdq("x", "xs", "xz", "xa") + _qdq("x", "xs", "xz", "xb")
    nodes[2].name, nodes[3].name = "b_Q", "b_DQ"
    nodes.append(helper.make_node("MatMul", ["xa", "xb_t"], ["y"], name="act_mm"))
    nodes.insert(4, helper.make_node("Transpose", ["xb"], ["xb_t"], name="t", perm=[0, 2, 1]))
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz")]
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", F, None)], inits)
    found = rules(check(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])))
    assert "op-not-quantizable" in found  # Transpose input quantized
    w = _w(3, (16, 8), 16)
    nodes = _qdq("w", "ws", "wz", "wdq") + [helper.make_node("MatMul", ["x", "wdq"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz")]
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", F, None)], inits)
    assert "weight-only" in rules(check(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])))


def test_cli_check_target_ascend(tmp_path, capsys):
    art, m, _ = lower("residual", tmp_path)
    assert main(["check", "--target", "ascend", str(art.path)]) == 0
    bad = tmp_path / "bad.onnx"
    onnx.save(_gemm_model(np.full(4, 0.01, np.float32), np.array([0, 1, 0, 0], np.int8)), str(bad))
    capsys.readouterr()
    assert main(["check", "--target", "ascend", "--json", str(bad)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and {"weight-per-channel", "weight-asymmetric"} <= {f["rule"] for f in out["findings"]}
    assert all(f["node"] and f["fix"] for f in out["findings"])


# -- lowering: what gets quantized ------------------------------------------------------------------


def test_sigmoid_not_quantized_avgpool_and_add_are(tmp_path):
    _, m, dep = lower("avgpool", tmp_path)
    types = [n.op_type for n in dep.graph.node]
    assert "QuantizeLinear" not in types and "DequantizeLinear" not in types
    sig = next(n for n in dep.graph.node if n.name == "sigmoid")
    assert sig.input[0] == "a"  # float input, no AscendQuant in front of the Sigmoid
    pool = next(n for n in dep.graph.node if n.name == "pool")
    assert pool.input[0].endswith("_ascend_antiquant")


def attention_with_mask() -> onnx.ModelProto:
    """A tiny BERT-style attention: the mask path (1 - mask) * float-min is added to the scores."""
    d = 8
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Unsqueeze", ["mask", "ax"], ["m1"], name="m_unsq"),
        helper.make_node("Cast", ["m1"], ["m2"], name="m_cast", to=F),
        helper.make_node("Sub", ["one", "m2"], ["m3"], name="m_sub"),
        helper.make_node("Mul", ["m3", "fmin"], ["m4"], name="m_mul"),
        helper.make_node("Add", ["s", "m4"], ["sm"], name="mask_add"),
        helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["o"], name="pv"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual_add"),
    ]
    g = helper.make_graph(
        nodes, "attn_mask",
        [helper.make_tensor_value_info("x", F, [1, 4, d]), helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", F, [1, 4, d])],
        [numpy_helper.from_array(_w(40, (d, d), d), "wq"), numpy_helper.from_array(_w(41, (d, d), d), "wk"),
         numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fmin")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_attention_mask_path_gets_no_qdq(tmp_path):
    m = attention_with_mask()
    rng = np.random.default_rng(0)

    def sample():
        mask = np.ones((1, 4), np.int64)
        mask[0, rng.integers(2, 4):] = 0
        return {"x": rng.standard_normal((1, 4, 8)).astype(np.float32), "mask": mask}

    from calibration.dataset import CalibrationSet

    c = Case(m, CalibrationSet([sample() for _ in range(16)]), CalibrationSet([sample() for _ in range(4)]))
    assert {"m2", "m3", "m4"} <= mask_tensors(GraphView(m))
    try:
        plan = c.plan("mixed")
    except Exception as e:  # the core may refuse to record a -inf range at all: that is also safe
        pytest.skip(f"plan construction rejects the mask range: {e}")
    art = AscendBackend().lower(LoweringContext(m, plan, tmp_path, c.calib))
    q = onnx.load(str(art.path))
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {"m2", "m3", "m4", "s"}
    assert rules(check(q)) == set()
    ref = onnx_runner(m, optimize=False)(c.heldout)
    got = art.run(c.heldout)
    assert all(np.all(np.isfinite(o)) for s in got for o in s)
    cos = np.mean([float(np.dot(a[0].ravel(), b[0].ravel()) / np.linalg.norm(a[0]) / np.linalg.norm(b[0]))
                   for a, b in zip(ref, got)])
    assert cos > 0.98


# -- deploy form -----------------------------------------------------------------------------------


def test_pack_deq_scale_hand_computed():
    # float32 bits: 0.5 = 0x3F000000, 1.0 = 0x3F800000, 2**-10 = 0x3A800000
    packed = pack_deq_scale(np.array([0.5, 1.0, 2.0 ** -10], np.float32))
    assert packed.dtype == np.uint64
    assert [hex(int(v)) for v in packed] == ["0x3f000000", "0x3f800000", "0x3a800000"]
    # weight offset -3 (int8 0xFD) in bits 40-47: 0x0000FD00_00000000 | bits of 0.25 (0x3E800000)
    assert int(pack_deq_scale(0.25, -3)[0]) == 0x0000FD003E800000
    scale, off = unpack_deq_scale(np.array([0x0000FD003E800000], np.uint64))
    assert scale[0] == np.float32(0.25) and off[0] == -3
    # x_scale * w_scale as float32 (0.02 * 0.005 = 1e-4 -> 0x38D1B717)
    assert int(pack_deq_scale(np.float32(0.02) * np.float32(0.005))[0]) == 0x38D1B717


@pytest.mark.parametrize("name", ["conv_relu", "residual", "depthwise", "gemm", "matmul"])
def test_deploy_form_arithmetic_matches_qdq(tmp_path, name):
    """The NumPy oracle of the deploy form's int8/int32 arithmetic against the QDQ graph in ORT."""
    art, q, dep = lower(name, tmp_path)
    c = case(name)
    got = [run_deploy_form(dep, s) for s in c.heldout]
    want = art.run(c.heldout)
    params = json.loads((art.path.parent / "quant_params.json").read_text())
    layers = params["int8_layers"].values()
    worst_deq = max(max(layer["deq_scale"]) for layer in layers)
    tight = 8 * worst_deq + 1e-5  # bias rounding (half an accumulator LSB) plus float summation order
    g_all = np.concatenate([g_[0].ravel() for g_ in got])
    w_all = np.concatenate([w_[0].ravel() for w_ in want])
    diff = np.abs(g_all - w_all)
    if len(params["int8_layers"]) == 1:
        assert diff.max() <= tight + 1e-3 * np.abs(w_all).max()
    else:
        # a bias-rounding difference in one layer can flip the next layer's input rounding by one LSB
        max_x_scale = max(layer["x_scale"] for layer in layers)
        assert np.mean(diff <= tight + 1e-3 * np.abs(w_all)) >= 0.9
        assert diff.max() <= 4 * max_x_scale


def test_deploy_form_encoding(tmp_path):
    art, q, dep = lower("gemm", tmp_path)
    types = [n.op_type for n in dep.graph.node]
    assert types.count("AscendQuant") == 2 and types.count("AscendDequant") == 2
    inits = {i.name: i for i in dep.graph.initializer}
    for n in dep.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "AscendQuant":
            assert next(x for x in n.attribute if x.name == "offset").type == onnx.AttributeProto.FLOAT
            assert a["dst_type"] == 2 and a["scale"] > 0
        if n.op_type == "Gemm":
            assert a.get("transB", 0) == 0  # pre-transposed (K, N), as msModelSlim writes it
            assert inits[n.input[1]].data_type == TensorProto.INT8
            assert inits[n.input[2]].data_type == TensorProto.INT32
        if n.op_type == "AscendDequant":
            assert inits[n.input[1]].data_type == TensorProto.UINT64
    params = json.loads((art.path.parent / "quant_params.json").read_text())
    g = params["int8_layers"]["gemm_tb"]
    assert g["w_granularity"] == "per_tensor"
    assert np.isclose(g["deq_scale"][0], g["x_scale"] * g["w_scale"], rtol=1e-6)
    scale, off = unpack_deq_scale(np.array(g["deq_scale_uint64"], np.uint64))
    assert np.allclose(scale, g["deq_scale"]) and np.all(off == 0)


# -- the atc command --------------------------------------------------------------------------------


def test_atc_static():
    argv = atc_argv("model_deploy.onnx", "model", "Ascend310P3", {"x": [1, 3, 224, 224]})
    assert argv == ["atc", "--model=model_deploy.onnx", "--framework=5", "--output=model", "--soc_version=Ascend310P3",
                    "--input_shape=x:1,3,224,224", "--input_format=NCHW", "--precision_mode_v2=fp16"]


def test_atc_dynamic_batch():
    argv = atc_argv("m.onnx", "model", "Ascend910B", parse_input_shapes("x:1x3x224x224/4x3x224x224/16x3x224x224"))
    assert "--input_shape=x:-1,3,224,224" in argv and "--dynamic_batch_size=1,2,4,8,16" in argv
    assert not any(a.startswith(("--dynamic_dims", "--dynamic_image_size")) for a in argv)


def test_atc_dynamic_dims_shared_sequence_length():
    shapes = parse_input_shapes("input_ids:1x16/1x128/1x256,attention_mask:1x16/1x128/1x256")
    argv = atc_argv("m.onnx", "model", "Ascend310P3", shapes)
    assert "--input_shape=input_ids:1,-1;attention_mask:1,-1" in argv
    assert "--dynamic_dims=16,16;32,32;64,64;128,128;256,256" in argv
    assert "--input_format=ND" in argv


def test_atc_dynamic_dims_unrelated_ranges_and_image_size():
    sa = shape_args(parse_input_shapes("a:1x8/1x16/1x32,b:2x4/4x4/8x4"))
    assert sa.dynamic_option == "--dynamic_dims" and sa.profiles == "8,2;16,4;32,8" and sa.input_format == "ND"
    sa = shape_args(parse_input_shapes("x:1x3x224x224/1x3x320x320/1x3x448x448"))
    assert sa.dynamic_option == "--dynamic_image_size" and sa.profiles == "224,224;256,256;320,320;448,448"


def test_atc_rules_rejected():
    with pytest.raises(BadInputError, match="soc-version"):
        atc_argv("m.onnx", "model", "Ascend999", {"x": [1, 3, 8, 8]})
    with pytest.raises(BadInputError, match="precision"):
        atc_argv("m.onnx", "model", "Ascend310", {"x": [1, 3, 8, 8]}, precision_mode="int8")
    with pytest.raises(BadInputError, match="mixed"):
        atc_argv("m.onnx", "model", "Ascend310", {"x": [1, 3, 8, 8]}, modify_mixlist_file="m.json")
    # the smallest range still gives ATC its minimum of 2 profiles; the widest stays far below 100
    assert shape_args(parse_input_shapes("a:1x8/1x8/1x9")).profiles == "8;9"
    assert len(shape_args(parse_input_shapes("a:1x1/1x1/1x65536")).profiles.split(";")) == 17
    with pytest.raises(BadInputError, match="dynamic_dims"):
        atc_argv("m.onnx", "model", "Ascend310", parse_input_shapes("a:1x8/1x16/1x32"), insert_op_conf="aipp.cfg")


def test_precision_mode_keep_dtype_and_mixlist(tmp_path):
    import dataclasses

    from deployer.plan import Precision

    c = case("attention")
    plan = plan_of("attention", "mixed")
    nodes = dict(plan.nodes)
    nodes["o_proj"] = dataclasses.replace(nodes["o_proj"], precision=Precision.FP32, weight=None)
    plan = plan.with_nodes(nodes)
    art = AscendBackend().lower(LoweringContext(c.model, plan, tmp_path / "a", c.calib))
    d = art.path.parent
    assert (d / "keep_dtype.cfg").read_text().split() == ["OpName::o_proj"]
    assert art.extra["modify_mixlist"] == []
    art = AscendBackend().lower(LoweringContext(c.model, plan, tmp_path / "b", c.calib,
                                                {"precision_mode": "mixed_float16"}))
    d = art.path.parent
    mix = json.loads((d / "modify_mixlist.json").read_text())
    assert mix == {"white-list": {"to-add": ["MatMul", "Softmax"]}}
    script = (d / "atc.sh").read_text()
    assert "--precision_mode_v2=mixed_float16" in script and "--modify_mixlist=modify_mixlist.json" in script
    art = AscendBackend().lower(LoweringContext(c.model, plan, tmp_path / "c", c.calib, {"precision_mode": "origin"}))
    assert not (art.path.parent / "keep_dtype.cfg").exists() and any("origin" in n for n in art.notes)


def test_aipp_config(tmp_path):
    art, _, _ = lower("conv_relu", tmp_path, aipp=AippConfig((127.0,) * 3, (128.0,) * 3))
    cfg = (art.path.parent / "aipp.cfg").read_text()
    assert "mean_chn_0 : 127" in cfg and "var_reci_chn_2 : 0.007812500" in cfg and "src_image_size_w : 8" in cfg
    assert "--insert_op_conf=aipp.cfg" in (art.path.parent / "atc.sh").read_text()


# -- contract tests with an atc stand-in -----------------------------------------------------------

ATC_STAND_IN = r'''#!PYTHON
"""atc stand-in: validates the command line as CANN's ATC documents it, then writes a dummy .om.
It is NOT ATC: nothing is compiled."""
import json, os, sys
import onnx
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
def fail(msg):
    print("ATC stand-in: E10001: " + msg, file=sys.stderr); sys.exit(1)
if os.environ.get("ATC_STANDIN_FAIL"):
    fail("forced failure")
if args.get("framework") != "5": fail("--framework must be 5 for ONNX")
m = onnx.load(args["model"])
ops = {n.op_type for n in m.graph.node}
if ops & {"QuantizeLinear", "DequantizeLinear"}: fail("raw Q/DQ is not compiled; give the deploy form")
if len([i for i in m.opset_import if i.domain in ("", "ai.onnx")]) != 1: fail("one ai.onnx opset import")
socs = json.loads(os.environ["ATC_STANDIN_SOCS"])
if args.get("soc_version") not in socs: fail("unknown soc_version")
shape = args["input_shape"]
names = [p.rsplit(":", 1)[0] for p in shape.split(";")]
graph_inputs = [i.name for i in m.graph.input if i.name not in {x.name for x in m.graph.initializer}]
if names != graph_inputs: fail(f"input_shape names {names} != model inputs {graph_inputs}")
n_dyn = shape.count("-1")
dyn = [k for k in ("dynamic_batch_size", "dynamic_image_size", "dynamic_dims") if k in args]
if len(dyn) > 1: fail("dynamic options are mutually exclusive")
if n_dyn and not dyn: fail("-1 in input_shape needs a dynamic option")
if dyn:
    profiles = args[dyn[0]].split(";") if dyn[0] != "dynamic_batch_size" else args[dyn[0]].split(",")
    if not 2 <= len(profiles) <= 100: fail("2-100 profiles")
    if dyn[0] == "dynamic_dims":
        if args.get("input_format") != "ND": fail("dynamic_dims needs --input_format=ND")
        if "insert_op_conf" in args: fail("dynamic_dims excludes insert_op_conf")
        if any(len(p.split(",")) != n_dyn for p in profiles): fail("each profile needs one value per -1")
if args.get("precision_mode_v2", "fp16") not in ("fp16", "origin", "cube_fp16in_fp32out", "mixed_float16", "mixed_bfloat16"):
    fail("precision_mode_v2")
if "keep_dtype" in args:
    names = {n.name for n in m.graph.node}
    for line in open(args["keep_dtype"]).read().split():
        if not line.startswith("OpName::") or line[8:] not in names: fail(f"keep_dtype entry {line}")
if "modify_mixlist" in args and not args.get("precision_mode_v2", "").startswith("mixed_"): fail("mixlist mode")
open(args["output"] + ".om", "wb").write(b"stand-in")
print("ATC run success")
'''


@pytest.fixture
def atc_stand_in(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    p = bin_dir / "atc"
    p.write_text(ATC_STAND_IN.replace("#!PYTHON", "#!" + sys.executable), encoding="utf-8")
    p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ATC_STANDIN_SOCS", json.dumps(list(SOC_VERSIONS)))
    return p


@pytest.mark.parametrize("name", ["conv_relu", "gemm", "matmul", "avgpool", "attention"])
def test_atc_stand_in_accepts_our_command(tmp_path, atc_stand_in, name):
    art, _, _ = lower(name, tmp_path / "out", recipe="mixed", precision_mode="mixed_float16")
    assert art.extra["om"] == "model.om" and (art.path.parent / "model.om").exists()
    assert "ATC run success" in (art.path.parent / "atc.log").read_text()


def test_atc_stand_in_dynamic_batch(tmp_path, atc_stand_in):
    art, _, _ = lower("conv_relu", tmp_path / "out",
                      input_shapes=parse_input_shapes("x:1x3x8x8/2x3x8x8/8x3x8x8"))
    assert "--dynamic_batch_size=1,2,4,8" in art.extra["atc_command"]
    assert (art.path.parent / "model.om").exists()


def test_atc_stand_in_failure_is_reported(tmp_path, atc_stand_in, monkeypatch):
    """Contract test with the atc stand-in: a failing atc is reported (status, error with atc's output,
    atc.log) and the graphs are still written; the CLI turns it into exit 2."""
    monkeypatch.setenv("ATC_STANDIN_FAIL", "1")
    art, _, _ = lower("conv_relu", tmp_path / "out")
    step = art.extra["vendor_step"]
    assert step["status"] == "failed" and "atc failed" in step["error"]
    assert any(n.startswith("atc: FAILED") for n in art.notes)
    assert art.extra["om"] is None and (art.path.parent / "atc.log").is_file()


def test_atc_dynamic_dims_axes_with_different_ranges_step_in_lockstep():
    """Batch 1..4 and image 8..64: one power-of-two ladder per axis, from all-min to all-max (not only the
    two ends, which would leave every shape in between without a profile)."""
    from backends.ascend.atc import shape_args
    from deployer.shapes import ShapeRange

    sa = shape_args({"x": ShapeRange((1, 3, 8, 8), (4, 3, 64, 64), (4, 3, 64, 64))})
    assert sa.dynamic_option == "--dynamic_dims" and sa.input_shape == "x:-1,3,-1,-1"
    assert sa.profiles == "1,8,8;2,16,16;2,32,32;4,64,64"
