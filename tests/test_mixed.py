"""Recipes (rule matching), the mixed-precision search (termination, determinism) and release gates."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.dataset import CalibrationSet
from deployer.errors import BadInputError
from deployer.gates import FAIL, NA, PASS, evaluate_gates, failed
from deployer.mixed import (DEFAULT_SIMULATION_POLICY, Evaluator, int8_mac_fraction, node_macs, relative_metric, search,
                            with_precision)
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan
from deployer.plan import Precision
from deployer.recipe import decide, load_rules


def _mlp(widths: list[int], seed: int = 0) -> onnx.ModelProto:
    """x[1, w0] -> (MatMul + Add + Relu) per layer -> logits; one layer with a huge outlier weight."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        w = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
        if i == 1:
            w[0, 0] = 60.0  # an outlier weight: output channel 0 of this layer gets a huge range
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"y{i}"], name=f"add{i}"))
        last = i == len(widths) - 2
        if not last:
            nodes.append(helper.make_node("Relu", [f"y{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"y{i}" if last else f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, widths[0]])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, widths[-1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def setup() -> tuple[onnx.ModelProto, Inputs, object]:
    m = _mlp([16, 32, 32, 10])
    rng = np.random.default_rng(1)
    cal = CalibrationSet([{"x": rng.normal(size=(1, 16)).astype(np.float32)} for _ in range(48)])
    inputs = Inputs(m, cal, cal, "classification", "test", "same")
    opts = DeployOptions(bias_correction=False)
    plan = make_plan(inputs, compute_statistics(inputs, DeployOptions(no_cache=True)), opts)
    return m, inputs, plan


# -- recipes ------------------------------------------------------------------------------------


def test_presets_mark_nodes(setup) -> None:  # type: ignore[no-untyped-def]
    m, _, _ = setup
    _, rules = load_rules("int8")
    nodes = decide(m, rules)
    assert {d.precision for d in nodes.values()} == {Precision.INT8}
    assert nodes["fc0"].weight is not None and nodes["add0"].weight is None
    _, rules = load_rules("fp16")
    assert {d.precision for d in decide(m, rules).values()} == {Precision.FP16}


def test_user_rules_last_match_wins(tmp_path, setup) -> None:  # type: ignore[no-untyped-def]
    m, _, _ = setup
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"base": "int8", "rules": [
        {"match": {"op_type": ["MatMul"], "name": "^fc[12]$"}, "precision": "fp16", "label": "keep fc1/fc2"},
        {"match": {"name": "^fc2$"}, "precision": "fp32", "label": "fc2 in fp32"},
    ]}))
    name, rules = load_rules(str(f))
    nodes = decide(m, rules)
    assert name == "int8+r.json"
    assert nodes["fc0"].precision == Precision.INT8
    assert nodes["fc1"].precision == Precision.FP16 and nodes["fc1"].reason == "keep fc1/fc2"
    assert nodes["fc2"].precision == Precision.FP32
    yml = tmp_path / "r.yaml"
    yml.write_text("base: int8\nrules:\n  - match: {scope: fc0}\n    precision: fp16\n")
    assert decide(m, load_rules(str(yml))[1])["fc0"].precision == Precision.FP16


@pytest.mark.parametrize("bad", [
    {"rules": [{"match": {"colour": "red"}, "precision": "fp16"}]},
    {"rules": [{"match": {}, "precision": "int3"}]},
    {"rules": [{"match": {"name": "("}, "precision": "fp16"}]},
    {"base": "int2", "rules": []},
    {"base": "int8", "rules": [], "rulez": []},
    {"rules": [{"match": {}, "precision": "fp32", "weight_bits": 3}]},
])
def test_bad_rules_are_refused(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "r.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(BadInputError):
        load_rules(str(f))


def test_mixed_preset_puts_attention_in_fp16() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 8])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["s"], name="qk"),
                           helper.make_node("Softmax", ["s"], ["y"], name="sm", axis=-1)], "att", [a, b], [y])
    nodes = decide(helper.make_model(g), load_rules("mixed")[1])
    assert nodes["qk"].precision == Precision.FP16 and nodes["sm"].precision == Precision.FP16


# -- search -------------------------------------------------------------------------------------


def _search(setup, target: float, budget: int):  # type: ignore[no-untyped-def]
    m, inputs, plan = setup
    ev = Evaluator(m, list(inputs.calibration)[:24], DEFAULT_SIMULATION_POLICY, relative_metric("embedding"))
    return search(plan, m, ev, target=target, budget=budget)


def test_search_meets_target_with_few_layers(setup) -> None:  # type: ignore[no-untyped-def]
    r = _search(setup, target=0.995, budget=24)
    assert r.stopped_on == "target"
    assert r.metric >= 0.995
    # fc1's outlier weight makes its output channel 0 huge: fc2, whose int8 input carries that range,
    # is the most sensitive layer
    assert r.sensitivity and r.sensitivity[0]["layer"] == "fc2"
    assert r.kept[0] == "fc2" and len(r.kept) < 3, r.kept
    assert r.plan.precision_of("fc2") == Precision.FP16
    assert 0.0 < r.int8_mac_fraction < 1.0


def test_search_stops_on_budget_and_is_deterministic(setup) -> None:  # type: ignore[no-untyped-def]
    r1 = _search(setup, target=1.01, budget=2)  # unreachable target
    r2 = _search(setup, target=1.01, budget=2)
    assert r1.stopped_on == "budget"
    n_layers = 3
    assert r1.evaluations <= 1 + n_layers + 2  # base + sensitivity + budget
    assert r1.kept == r2.kept and r1.metric == r2.metric


def test_macs_counted(setup) -> None:  # type: ignore[no-untyped-def]
    m, _, plan = setup
    macs = node_macs(m)
    assert macs == {"fc0": 16 * 32, "fc1": 32 * 32, "fc2": 32 * 10}
    assert int8_mac_fraction(plan, macs) == 1.0


# -- gates --------------------------------------------------------------------------------------


def test_speed_gate_fails_when_speed_does_not_pay_for_fidelity() -> None:
    entry = {"fidelity": {"top1_agreement": 0.97, "task_accuracy_relative": 0.97},
             "latency_ms": {"fp32": 10.0, "artifact": 5.0}, "size_bytes": {"fp32": 100, "artifact": 30}}
    g = evaluate_gates(entry)
    assert g["speed-per-fidelity"]["status"] == FAIL  # 3 points lost need 6x, got 2x
    assert failed(g) == ["speed-per-fidelity"]
    entry["latency_ms"] = {"fp32": 10.0, "artifact": 1.5}
    assert evaluate_gates(entry)["speed-per-fidelity"]["status"] == PASS


def test_failed_gate_sets_exit_code_only_when_enforced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Gates are always evaluated and reported; a failed one gives exit 1 only under --enforce-gates."""
    from deployer import deploy
    from deployer.commands import exit_code_for_report
    from tests.test_int4 import _mlp, _samples

    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    res = deploy(str(path), _samples(), targets="tensorrt", out_dir=tmp_path / "o", no_cache=True)
    gates = res.report["targets"]["tensorrt"]["gates"]
    assert gates and all(g["enforced"] is False for n, g in gates.items() if n != "fidelity-floor")
    assert gates["fidelity-floor"]["enforced"] is True  # the floor is always enforced
    failing = {"targets": {"t": {"gates": {"speed-per-fidelity": {"status": FAIL, "enforced": False}}}}}
    assert exit_code_for_report(failing) == 0
    failing["targets"]["t"]["gates"]["speed-per-fidelity"]["enforced"] = True
    assert exit_code_for_report(failing) == 1


def test_recall_gate() -> None:
    entry = {"fidelity": {"top1_agreement": 0.99}, "size_bytes": {"fp32": 100, "artifact": 30},
             "labelled": {"fp32": {"recall": 0.80}, "artifact": {"recall": 0.74}}}
    g = evaluate_gates(entry)
    assert g["size-vs-recall"]["status"] == FAIL  # 7.5% relative loss > 5%
    assert g["speed-per-fidelity"]["status"] == NA  # no speed measured
    entry["labelled"]["artifact"]["recall"] = 0.79
    assert evaluate_gates(entry)["size-vs-recall"]["status"] == PASS
    del entry["labelled"]
    assert evaluate_gates(entry)["size-vs-recall"]["status"] == NA


def test_search_prunes_layers_the_target_does_not_need(setup) -> None:  # type: ignore[no-untyped-def]
    """After the prefix search, each kept layer is given back to INT8 when the target still holds, so
    no single kept layer can be removed without missing the target (ample budget)."""
    m, inputs, plan = setup
    ev = Evaluator(m, list(inputs.calibration)[:24], DEFAULT_SIMULATION_POLICY, relative_metric("embedding"))
    r = search(plan, m, ev, target=0.995, budget=24)
    assert r.stopped_on == "target" and r.kept
    for name in r.kept:
        rest = [k for k in r.kept if k != name]
        if rest:
            assert ev(with_precision(plan, rest, Precision.FP16, "t", m))[0] < 0.995, name
