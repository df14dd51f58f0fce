"""Release gates: thresholds from the CLI, the API and a recipe file; statuses; enforcement; exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from deployer.deliver import TargetResult, mark_foreign_cpu
from deployer.errors import BadInputError, GateFailedError
from deployer.gates import (FAIL, NOT_EVALUATED, PASS, GateConfig, evaluate_gates, failed_enforced, parse_gates)
from deployer.recipe import load_gates
from tests.test_int4 import _mlp, _samples


def test_parse_gates_from_cli_api_and_recipe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert parse_gates(["cosine_mean=0.99", "sqnr_db=20", "speed-per-fidelity=3"]) == \
        {"cosine_mean": 0.99, "sqnr_db": 20.0, "speed-per-fidelity": 3.0}
    assert parse_gates({"top1_agreement": 0.97}) == {"top1_agreement": 0.97}
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"base": "int8", "gates": {"size-vs-recall": 0.02, "cosine_mean": 0.995}}))
    assert load_gates(str(recipe)) == {"size-vs-recall": 0.02, "cosine_mean": 0.995}
    assert load_gates("int8") == {}


@pytest.mark.parametrize("spec, words", [
    (["cosine_man=0.9"], ["unknown gate 'cosine_man'", "did you mean cosine_mean"]),
    (["speed_per_fidelity=2"], ["did you mean speed-per-fidelity"]),
    (["fidelity-floor=0.99"], ["--min-fidelity"]),
    (["cosine_mean"], ["NAME=VALUE"]),
    (["cosine_mean=high"], ["must be a number"]),
    (["size-vs-recall=5"], ["[0, 1]"]),
    (["speed-per-fidelity=0"], ["> 0"]),
])
def test_bad_gate_specs_are_one_line_errors(spec, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInputError) as e:
        parse_gates(spec)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_recipe_gates_must_be_an_object(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"gates": ["cosine_mean=0.9"]}))
    with pytest.raises(BadInputError, match="'gates' must be an object"):
        load_gates(str(recipe))
    recipe.write_text(json.dumps({"gates": {"cosine": 0.9}}))
    with pytest.raises(BadInputError, match="did you mean cosine_mean"):
        load_gates(str(recipe))


def test_fidelity_gates_compare_metric_keys() -> None:
    entry = {"fidelity": {"cosine_mean": 0.995, "sqnr_db": 18.0, "top1_agreement": 0.97}}
    g = evaluate_gates(entry, GateConfig({"cosine_mean": 0.99, "sqnr_db": 20.0, "task_accuracy_relative": 0.99}))
    assert g["cosine_mean"]["status"] == PASS and g["cosine_mean"]["value"] == 0.995
    assert g["sqnr_db"]["status"] == FAIL and g["sqnr_db"]["threshold"] == 20.0
    assert g["task_accuracy_relative"]["status"] == NOT_EVALUATED  # no labelled task metric on this model
    assert all(g[n]["enforced"] for n in ("cosine_mean", "sqnr_db", "task_accuracy_relative"))
    assert g["speed-per-fidelity"]["enforced"] is False  # a seed gate at its default
    assert failed_enforced(g) == ["sqnr_db"]
    # an output identical to FP32 has sqnr_db null: infinite, passes any threshold
    assert evaluate_gates({"fidelity": {"sqnr_db": None}}, GateConfig({"sqnr_db": 60}))["sqnr_db"]["status"] == PASS
    # nothing run here: every gate is "not evaluated", none fails
    g = evaluate_gates({"fidelity": {}}, GateConfig({"cosine_mean": 0.99}))
    assert {v["status"] for v in g.values()} == {NOT_EVALUATED}


def test_seed_gates_need_labels() -> None:
    """Without a labelled task metric the two seed gates are "not evaluated" (the README's default example:
    photos without labels), even with speed measured and a size reduction."""
    entry = {"fidelity": {"top1_agreement": 0.95, "cosine_mean": 0.99},
             "latency_ms": {"fp32": 10.0, "artifact": 20.0}, "size_bytes": {"fp32": 100, "artifact": 30}}
    g = evaluate_gates(entry)
    assert g["speed-per-fidelity"]["status"] == NOT_EVALUATED and "labelled" in g["speed-per-fidelity"]["reason"]
    assert g["size-vs-recall"]["status"] == NOT_EVALUATED


def test_speed_gate_fails_an_artifact_slower_than_fp32_even_without_loss() -> None:
    entry = {"fidelity": {"task_accuracy_relative": 1.0}, "speed": {"ratio": 0.5},
             "size_bytes": {"fp32": 100, "artifact": 30}}
    g = evaluate_gates(entry)["speed-per-fidelity"]
    assert g["status"] == FAIL and g["required_speedup"] == 1.0 and g["speedup"] == 0.5
    entry["speed"] = {"ratio": 1.3}
    assert evaluate_gates(entry)["speed-per-fidelity"]["status"] == PASS
    entry["fidelity"] = {"task_accuracy_relative": 0.99}  # 1% lost needs 2x at the default ratio
    assert evaluate_gates(entry)["speed-per-fidelity"]["status"] == FAIL
    assert evaluate_gates(entry, GateConfig({"speed-per-fidelity": 1.0}))["speed-per-fidelity"]["status"] == PASS


def test_speed_is_judged_only_on_the_cpu_the_artifact_was_built_for() -> None:
    res = TargetResult("tflite", "a.tflite", {"fp32": 100, "artifact": 30}, {"task_accuracy_relative": 1.0},
                       "here", [], {"latency_ms": {"fp32": 1.0, "artifact": 4.0}})
    mark_foreign_cpu(res, "arm", machine="x86_64")
    assert res.extra["latency_ms"]["same_cpu"] is False
    g = evaluate_gates(res.to_dict())["speed-per-fidelity"]
    assert g["status"] == NOT_EVALUATED and "(arm)" in g["reason"]
    res2 = TargetResult("tflite", "a.tflite", {}, {"task_accuracy_relative": 1.0}, "here", [],
                        {"latency_ms": {"fp32": 1.0, "artifact": 4.0}})
    mark_foreign_cpu(res2, "arm", machine="aarch64")
    assert evaluate_gates(res2.to_dict())["speed-per-fidelity"]["status"] == FAIL  # 4x slower on its own CPU


def test_size_gate_on_labelled_recall() -> None:
    entry = {"fidelity": {"cosine_mean": 0.99}, "size_bytes": {"fp32": 100, "artifact": 30},
             "labelled": {"fp32": {"recall": 0.80}, "artifact": {"recall": 0.78}}}
    assert evaluate_gates(entry)["size-vs-recall"]["status"] == PASS  # 2.5% <= 5%
    assert evaluate_gates(entry, GateConfig({"size-vs-recall": 0.02}))["size-vs-recall"]["status"] == FAIL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, list[dict[str, np.ndarray]]]:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("gates")
    onnx.save(_mlp(), d / "m.onnx")
    return str(d / "m.onnx"), _samples()


def test_user_gate_is_enforced_and_reported(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A threshold the user sets gates (exit 1 / GateFailedError after writing); one that holds passes."""
    from deployer import deploy

    model, samples = tiny
    res = deploy(model, samples, targets=["tensorrt"], out_dir=tmp_path / "ok", no_cache=True,
                 gates={"cosine_mean": 0.5})
    g = res.targets["tensorrt"].gates
    assert g["cosine_mean"]["status"] == PASS and g["cosine_mean"]["enforced"] is True
    assert g["speed-per-fidelity"]["status"] == NOT_EVALUATED  # no labels, not timed
    on_disk = json.loads((tmp_path / "ok" / "report.json").read_text())["targets"]["tensorrt"]["gates"]
    assert on_disk["cosine_mean"]["status"] == PASS
    with pytest.raises(GateFailedError) as e:
        deploy(model, samples, targets=["tensorrt"], out_dir=tmp_path / "bad", no_cache=True,
               gates={"cosine_mean": 1.01})
    assert (tmp_path / "bad" / "report.json").is_file()  # written first
    assert e.value.result.targets["tensorrt"].gates["cosine_mean"]["status"] == FAIL  # type: ignore[attr-defined]


def test_cli_gate_exit_codes(tiny, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from deployer.cli import main

    model, samples = tiny
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate(samples):
        np.savez(calib / f"{i}.npz", **s)
    base = ["--model", model, "--calib", str(calib), "--target", "tensorrt", "--no-cache", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a"), "--gate", "sqnr_db=1000"]) == 1
    assert main([*base, "--out", str(tmp_path / "b"), "--gate", "sqnr_db=5", "--gate", "cosine_mean=0.9"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "c"), "--gate", "cosin_mean=0.9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean cosine_mean" in err[0]
    assert not (tmp_path / "c").exists()


def test_unknown_target_fails_before_any_work(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from deployer import deploy

    with pytest.raises(BadInputError, match="did you mean 'tflite'"):
        deploy(str(tmp_path / "does-not-exist.onnx"), str(tmp_path / "nor-this"),
               targets=["tflte"], out_dir=tmp_path / "o")  # type: ignore[list-item]
