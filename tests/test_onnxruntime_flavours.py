"""Kernel flavours of the onnxruntime target per CPU instruction set (deployer.cpu), --cpu, their graphs,
their exactness against the plan's Q/DQ arithmetic on tiny models, and the speed record (deployer.speed)
with the gate and report fields that read it. No timed assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from backends.base import LoweringContext, onnx_runner
from backends.onnxruntime.backend import OnnxRuntimeBackend, op_counts
from backends.onnxruntime.flavours import flavour_for, int32_bias, policy_for
from deployer.cpu import (CPU_CHOICES, ISAS, choose_flavour, detect, exact_on, isa_from_flags, parse_cpu,
                          parse_cpuinfo)
from deployer.errors import BadInputError
from deployer.gates import evaluate_gates, speed_ratio, speed_warning
from deployer.qdq import lower_qdq
from deployer.speed import aliases, alternate, bucketed_batches, compare_speed, Point
from tests.test_onnxruntime_backend import _ops, _ort_optimized, _outputs, setup

XEON = ("fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni "
        "amx_bf16 amx_tile amx_int8")
FLAGS = {  # /proc/cpuinfo flag sets -> the isa they mean
    "amx": set(XEON.split()),
    "avx512-vnni": set(XEON.split()) - {"amx_int8", "amx_tile", "amx_bf16"},
    "avx-vnni": {"avx2", "avx_vnni"},  # Alder Lake style: VNNI on 256-bit vectors only
    "avx512": {"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"},  # Skylake-SP
    "avx2": {"avx", "avx2", "fma"},  # the AVX2-only EPYC
    "x86-64": {"sse", "sse2", "sse4_2"},
}


# -- detection and choice --------------------------------------------------------------------------


@pytest.mark.parametrize("isa", sorted(FLAGS))
def test_isa_from_flags(isa: str) -> None:
    assert isa_from_flags(FLAGS[isa], "x86_64") == isa


def test_parse_cpuinfo_x86_and_arm() -> None:
    x86 = parse_cpuinfo(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: {XEON}\n\nprocessor\t: 1\n"
                        f"flags\t\t: sse\n", "x86_64")
    assert x86.isa == "amx" and x86.model == "Intel(R) Xeon(R)" and "avx512_vnni" in x86.flags
    assert "fpu" not in x86.flags  # only the int8-relevant flags are kept
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp sha3\nCPU implementer\t: 0x41\n", "aarch64")
    assert arm.isa == "arm64" and arm.flags == ("asimddp",)
    assert detect().isa in ISAS


# expected graph properties per isa (static mode): activation zero-point dtype, weight dtype, |w| max, per-channel
EXPECTED = {
    "amx": ("uint8", "int8", 127), "avx512-vnni": ("uint8", "int8", 127), "avx-vnni": ("uint8", "int8", 127),
    "avx512": ("uint8", "uint8", 127), "avx2": ("uint8", "uint8", 127), "x86-64": ("uint8", "uint8", 127),
    "arm64": ("int8", "int8", 127),
}


@pytest.mark.parametrize("isa", ISAS)
def test_flavour_graph_per_isa(isa: str) -> None:
    m, _, _, plan = setup("cnn")
    flavour = choose_flavour(isa)
    assert flavour.isa == isa and flavour.why and flavour.per_channel
    q, rec = lower_qdq(m, plan, policy_for(flavour))
    act_dtype, w_dtype, qmax = EXPECTED[isa]
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in _ops(q, "QuantizeLinear"):
        assert inits[n.input[2]].dtype == np.dtype(act_dtype)
    for node in rec.weights:
        w, zp = inits[f"{node}.weight_int8"], inits[f"{node}.weight_zero_point"]
        assert w.dtype == np.dtype(w_dtype) and inits[f"{node}.weight_scale"].shape == (w.shape[0],)
        centred = w.astype(np.int32) - (128 if w_dtype == "uint8" else 0)
        assert np.all(zp.astype(np.int32) == (128 if w_dtype == "uint8" else 0))
        assert int(np.abs(centred).max()) == qmax  # 8-bit weights: the largest channel value hits 127


def test_dynamic_flavours_and_reduce_range() -> None:
    for isa in ("avx2", "avx512"):  # vpmaddubsw: 16-bit pair sums -> 7-bit weights
        f = choose_flavour(isa, "dynamic")
        assert (f.name, f.reduce_range, f.weight_dtype) == ("u8s8-reduce-range", True, "int8")
        m, _, _, plan = setup("cnn")
        q, _ = lower_qdq(m, plan, policy_for(f))
        assert int(np.abs(numpy_helper.to_array(
            next(i for i in q.graph.initializer if i.name == "conv1.weight_int8"))).max()) == 63
    for isa in ("amx", "avx512-vnni", "avx-vnni", "arm64"):  # DynamicQuantizeLinear is uint8-only
        f = choose_flavour(isa, "dynamic")
        assert (f.name, f.reduce_range, f.activation_dtype) == ("u8s8", False, "uint8")
    assert choose_flavour("avx2").name == "u8u8" and choose_flavour("arm64").name == "s8s8"


def test_exact_on_host_rules() -> None:
    assert not exact_on(choose_flavour("amx"), "avx2") and exact_on(choose_flavour("amx"), "avx-vnni")
    assert not exact_on(choose_flavour("arm64"), "avx512") and exact_on(choose_flavour("arm64"), "arm64")
    assert all(exact_on(choose_flavour(i), h) for i in ("avx2", "avx512") for h in ISAS)
    assert exact_on(choose_flavour("avx2", "dynamic"), "avx2")


# -- --cpu -----------------------------------------------------------------------------------------


def test_parse_cpu() -> None:
    assert [parse_cpu(c) for c in CPU_CHOICES] == list(CPU_CHOICES)
    assert parse_cpu(None) == "auto" and parse_cpu("AVX512_VNNI") == "avx512-vnni" and parse_cpu("aarch64") == "arm64"
    with pytest.raises(BadInputError, match="--cpu 'sse9'.*use one of auto, avx2"):
        parse_cpu("sse9")


def test_cli_bad_cpu_is_one_line_exit_2_before_model_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deployer.cli import main

    # the model does not exist: had it been read first, the error would name the model instead
    rc = main(["--model", str(tmp_path / "missing.onnx"), "--target", "onnxruntime", "--cpu", "pentium",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--cpu 'pentium'" in err, err
    assert not (tmp_path / "out").exists()


def test_api_bad_cpu_refused_before_model_work(tmp_path: Path) -> None:
    import deployer

    with pytest.raises(BadInputError, match="--cpu 'z80'"):
        deployer.deploy(str(tmp_path / "missing.onnx"), targets="onnxruntime", cpu="z80", out_dir=tmp_path / "o")


def test_cpu_option_changes_only_the_lowering(tmp_path: Path) -> None:
    m, cal, held, plan = setup("cnn")
    arts = {}
    for cpu in ("avx2", "arm64"):
        d = tmp_path / cpu
        arts[cpu] = OnnxRuntimeBackend().lower(LoweringContext(m, plan, d, cal, {"cpu": cpu, "ort_throughput": False}))
    a2, arm = (onnx.load(str(arts[c].path)) for c in ("avx2", "arm64"))
    assert arts["avx2"].extra["kernel_flavour"]["name"] == "u8u8" and arts["arm64"].extra["kernel_flavour"]["isa"] == "arm64"
    assert arts["avx2"].extra["build_cpu"]["isa"] == detect().isa
    z = {c: {numpy_helper.to_array(i).dtype for i in g.graph.initializer if i.name.endswith("_zero_point")
             and not i.name.startswith(("conv", "fc"))} for c, g in (("avx2", a2), ("arm64", arm))}
    assert z == {"avx2": {np.dtype(np.uint8)}, "arm64": {np.dtype(np.int8)}}
    # same plan: the same tensors quantized with the same scales
    scales = [{i.name: float(numpy_helper.to_array(i)) for i in g.graph.initializer if i.name.endswith("_scale")
               and not i.name.startswith(("conv", "fc"))} for g in (a2, arm)]
    assert scales[0].keys() == scales[1].keys() and all(np.isclose(scales[0][k], scales[1][k]) for k in scales[0])
    if detect().isa != "arm64":
        assert any("build CPU" in n for n in arts["arm64"].notes)
    with pytest.raises(BadInputError, match="--cpu"):
        flavour_for({"cpu": "486"}, "static", "avx2")


# -- exactness: fused kernels vs the plan's Q/DQ arithmetic --------------------------------------------


def _one_lsb(plan_range: tuple[float, float]) -> float:
    lo, hi = plan_range
    return (max(hi, 0.0) - min(lo, 0.0)) / 255.0


@pytest.mark.parametrize("isa", ["amx", "avx2", "arm64"])
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_flavour_is_exact_against_the_plan(isa: str, name: str, tmp_path: Path) -> None:
    """The artifact as ONNX Runtime runs it (fused int8 kernels, all optimizations) against the plan's
    exact Q/DQ arithmetic (the same Q/DQ graph, optimizations off): within one 8-bit step of the output's
    plan range."""
    flavour = choose_flavour(isa)
    host = detect().isa
    if not exact_on(flavour, host):
        pytest.skip(f"{flavour.name} needs int32 dot products (VNNI/AMX/ARM); this CPU's path is {host}")
    m, cal, held, plan = setup(name)
    art = OnnxRuntimeBackend().lower(LoweringContext(m, plan, tmp_path, cal, {"cpu": isa, "ort_throughput": False}))
    assert art.run is not None
    model = onnx.load(str(art.path))
    fused = op_counts(_ort_optimized(model, tmp_path))
    if (isa == "arm64") == (host == "arm64"):  # ONNX Runtime fuses S8S8 Q/DQ Conv/MatMul on ARM only
        assert not {"Conv", "Gemm", "MatMul"} & set(fused), fused  # every Conv/Gemm/MatMul is an int8 kernel
    exact, _ = lower_qdq(m, plan, policy_for(flavour))  # the plan's arithmetic, float bias
    ref = _outputs(exact, held, optimize=False)
    out = np.concatenate([o[0] for o in art.run(list(held))])
    y = m.graph.output[0].name
    lsb = _one_lsb((plan.ranges[y].min, plan.ranges[y].max))
    err = float(np.max(np.abs(out - ref)))
    assert err <= lsb, (err, lsb)
    assert float(np.mean(np.abs(out - ref))) <= 0.25 * lsb


def test_transformer_adds_stay_float_cnn_residual_add_quantized(tmp_path: Path) -> None:
    """The placement rule (flavours.float_add): a residual Add feeding a Conv is quantized (QLinearAdd between
    QLinearConvs); a bias Add after a MatMul and an Add feeding LayerNormalization stay float, and the bias
    becomes int32 so that ONNX Runtime fuses the MatMul with static shapes too."""
    from onnx import TensorProto, helper

    m, _, _, plan = setup("cnn")
    q, rec = lower_qdq(m, plan, policy_for(choose_flavour("amx")))
    assert "c1" in rec.activations and not any(s["node"] == "add" for s in rec.skipped)
    m2, _, held, plan2 = setup("mlp")
    q2, rec2 = lower_qdq(m2, plan2, policy_for(choose_flavour("amx")))
    assert {s["node"] for s in rec2.skipped} >= {"fc1_bias", "fc2_bias"} and "m1" not in rec2.activations
    assert int32_bias(q2) == ["fc1_bias", "fc2_bias"]
    fused = op_counts(_ort_optimized(q2, tmp_path))  # static shapes: ONNX Runtime folds MatMul + Add into Gemm
    assert fused.get("QGemm", 0) + fused.get("MatMulIntegerToFloat", 0) == 2 and "Gemm" not in fused, fused
    ln = helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], name="ln", axis=-1)
    add = helper.make_node("Add", ["x", "r"], ["s"], name="residual")
    g = helper.make_graph([add, ln], "ln", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8])
                                             for n in ("x", "r")],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                          [numpy_helper.from_array(np.ones(8, np.float32), "g"),
                           numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    from deployer.graph import GraphView
    from backends.onnxruntime.flavours import float_add

    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert float_add(add, GraphView(model)) and not float_add(ln, GraphView(model))


def test_int32_bias_makes_the_classifier_gemm_fuse(tmp_path: Path) -> None:
    m, _, held, plan = setup("cnn")
    q, _ = lower_qdq(m, plan, policy_for(choose_flavour("avx2")))
    before = op_counts(_ort_optimized(q, tmp_path))
    assert before.get("Gemm") == 1 and "QGemm" not in before  # float bias: the Gemm stays FP32
    ref = _outputs(q, held, optimize=False)
    assert int32_bias(q) == ["fc"]
    after = op_counts(_ort_optimized(q, tmp_path))
    assert after.get("QGemm") == 1 and "Gemm" not in after, after
    bias = next(i for i in q.graph.initializer if i.name == "fc.bias_int32")
    assert bias.data_type == onnx.TensorProto.INT32
    y = m.graph.output[0].name
    diff = float(np.max(np.abs(_outputs(q, held, optimize=False) - ref)))  # bias rounding: < 1/100 of an output step
    assert diff < 0.01 * _one_lsb((plan.ranges[y].min, plan.ranges[y].max)), diff


# -- speed record, gate, report --------------------------------------------------------------------


def test_speed_record_shape_with_two_callables() -> None:
    def fast(threads: int):  # noqa: ANN202
        return lambda b: np.sum(b)

    def slow(threads: int):  # noqa: ANN202
        return lambda b: [np.sort(b) for _ in range(20)]

    data = [np.random.default_rng(i).random(2000) for i in range(6)]

    def batches(n: int) -> list[np.ndarray]:
        if n > 4:
            raise ValueError("only 6 samples")
        return [np.concatenate(data[i:i + n]) for i in range(0, len(data) - n + 1, n)]

    rec = compare_speed(slow, fast, batches, grid=(Point(2, 1), Point(8, 1)), seconds=0.05,
                        cpu_flags={"flags": ["avx2"], "isa": "avx2"}, same_cpu=True)
    assert set(rec) >= {"batch", "threads", "fp32_qps", "artifact_qps", "ratio", "cpu_flags", "load_average", "grid"}
    assert (rec["batch"], rec["threads"]) == (1, 1) and rec["same_cpu"] is True
    assert rec["ratio"] == pytest.approx(rec["artifact_qps"] / rec["fp32_qps"], rel=0.01)
    assert [(r["batch"], r["threads"]) for r in rec["grid"]] == [(1, 1), (2, 1)]
    assert rec["notes"] == ["batch 8: not measured (only 6 samples)"] and rec["calls"] >= 5
    al = aliases(rec)
    assert al["throughput_qps"]["speedup"] == rec["ratio"] and al["latency_ms"]["fp32"] == pytest.approx(
        1000.0 / rec["fp32_qps"], abs=1e-3)
    calls: list[str] = []
    alternate([lambda b: calls.append("a"), lambda b: calls.append("b")], [0], seconds=0.0, min_rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up, then strict alternation


def test_length_buckets_trim_padding() -> None:
    lengths = [5, 30, 7, 28, 6, 31, 8, 29]
    samples = []
    for n in lengths:
        mask = np.zeros((1, 32), np.int64)
        mask[0, :n] = 1
        samples.append({"input_ids": mask * 7, "attention_mask": mask})
    b = bucketed_batches(samples, 4, trim=True)
    assert [x["input_ids"].shape for x in b] == [(4, 8), (4, 31)]  # short texts together, each batch trimmed
    assert [x["attention_mask"].sum(axis=1).tolist() for x in b] == [[5, 6, 7, 8], [28, 29, 30, 31]]
    one = bucketed_batches(samples, 1, trim=True)
    assert [x["input_ids"].shape[1] for x in one] == lengths  # a query alone runs at its own length
    assert bucketed_batches(samples, 4)[0]["input_ids"].shape == (4, 32)  # no trim: padded as given
    with pytest.raises(ValueError):
        bucketed_batches(samples, 9)


def test_speed_gate_reads_speed_ratio_and_warns_when_int8_is_slower() -> None:
    speed = {"batch": 1, "threads": 1, "fp32_qps": 100.0, "artifact_qps": 60.0, "ratio": 0.6,
             "cpu_flags": {"isa": "avx2"}, "same_cpu": True, "int8": True}
    entry = {"fidelity": {"top1_agreement": 0.99, "task_accuracy_relative": 0.99}, "speed": speed,
             "latency_ms": {"fp32": 1.0, "artifact": 1.0}}
    assert speed_ratio(entry) == 0.6  # the speed record wins over an older latency field
    g = evaluate_gates(entry)["speed-per-fidelity"]
    assert g["status"] == "fail" and g["speedup"] == 0.6 and g["required_speedup"] == 2.0
    assert "slower than FP32" in (speed_warning(entry) or "") and "0.60x" in (speed_warning(entry) or "")
    assert speed_warning({**entry, "speed": {**speed, "ratio": 1.4}}) is None
    other = {**entry, "speed": {**speed, "same_cpu": False}}  # built for another CPU (--cpu)
    assert speed_warning(other) is None and evaluate_gates(other)["speed-per-fidelity"]["status"] == "not evaluated"
    assert speed_warning({**entry, "speed": {**speed, "int8": False}}) is None
    tflite = {"fidelity": {"top1_agreement": 1.0}, "latency_ms": {"fp32": 2.0, "artifact": 4.0}}
    assert speed_ratio(tflite) == 0.5 and speed_warning(tflite)  # targets with latency_ms only still count
    assert evaluate_gates({"fidelity": {"top1_agreement": 1.0}})["speed-per-fidelity"]["status"] == "not evaluated"


def test_report_html_shows_the_speed_warning_in_red(tmp_path: Path) -> None:
    from deployer.report_html import format_latency, render

    t = {"target": "onnxruntime", "artifact": "a.onnx", "size_bytes": {"artifact": 1}, "fidelity": {},
         "verified_by": "x", "notes": [], "kernel_flavour": {"name": "u8u8", "isa": "avx2"},
         "speed": {"batch": 1, "threads": 1, "fp32_qps": 10.0, "artifact_qps": 5.0, "ratio": 0.5},
         "speed_warning": "the INT8 artifact is slower than FP32 on this machine (0.50x)"}
    assert format_latency(t).startswith("5.0 samples/s vs FP32 10.0 (0.50x)") and "u8u8 for avx2" in format_latency(t)
    html = render({"targets": {"onnxruntime": t}, "schema_version": "1.0"}, tmp_path)
    assert '<td class="bad">5.0 samples/s' in html and "slower than FP32 on this machine (0.50x)" in html
    ok = render({"targets": {"onnxruntime": {**t, "speed_warning": None}}, "schema_version": "1.0"}, tmp_path)
    assert '<td class="bad">5.0' not in ok


def test_report_records_flavour_build_cpu_and_speed(tmp_path: Path) -> None:
    from deployer.cli import main
    from tests.test_onnxruntime_backend import _samples, cnn

    m = cnn()
    onnx.save(m, str(tmp_path / "cnn.onnx"))
    cal = tmp_path / "calib"
    cal.mkdir()
    for i, s in enumerate(_samples(m, 12, 3)):
        np.savez(cal / f"s{i:03d}.npz", **s)
    rc = main(["--model", str(tmp_path / "cnn.onnx"), "--calib", str(cal), "--target", "onnxruntime",
               "--out", str(tmp_path / "out"), "--quiet", "--cpu", "auto"])
    assert rc == 0
    t = json.loads((tmp_path / "out" / "report.json").read_text())["targets"]["onnxruntime"]
    assert t["kernel_flavour"]["name"] == choose_flavour(detect().isa).name and t["kernel_flavour"]["why"]
    assert t["build_cpu"]["isa"] == detect().isa and t["speed"]["cpu_flags"]["isa"] == detect().isa
    assert t["speed"]["ratio"] == t["throughput_qps"]["speedup"] and t["latency_ms"]["artifact"] > 0
    # measured; without a labelled task metric the seed gate is "not evaluated" (issue 21), with its reason
    gate = t["gates"]["speed-per-fidelity"]
    assert gate["status"] in ("pass", "fail") or "labelled" in gate["reason"], gate
    assert ("speed_warning" in t) == (t["speed"]["ratio"] < 1.0)


def test_run_deploy_refuses_bad_cpu_in_preflight(tmp_path: Path) -> None:
    from deployer.pipeline import DeployOptions, preflight

    opts = preflight(DeployOptions(targets="onnxruntime", backend_options={"cpu": "AMX"}), ["onnxruntime"])
    assert opts.backend_options["cpu"] == "amx"
    with pytest.raises(BadInputError, match="--cpu 'vax'"):
        preflight(DeployOptions(targets="onnxruntime", backend_options={"cpu": "vax"}), ["onnxruntime"])
