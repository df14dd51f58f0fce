"""The statistics cache: a second run on the same inputs skips the model; the observer re-reduces."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration import cache, collect
from calibration.cache import cache_dir, cached_statistics
from calibration.dataset import CalibrationSet
from deployer.model_io import model_sha256
from deployer.pipeline import DeployOptions, plan_only


def tiny_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), helper.make_node("Relu", ["mm"], ["y"], name="relu")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def samples(n: int = 6, seed: int = 1) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    return CalibrationSet([{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(n)], "test")


@pytest.fixture()
def runs(monkeypatch, tmp_path):
    """Point the cache at a temp dir and count model runs (calls of ONNX Runtime's session.run)."""
    import onnxruntime as ort

    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    counter = {"run": 0}
    real = ort.InferenceSession.run

    def counting(self, *a, **k):
        counter["run"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    return counter


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv(cache.ENV_VAR)
    assert cache_dir().parts[-2:] == ("deployer", "statistics")


def test_second_run_skips_the_model(runs):
    m, cs = tiny_model(), samples()
    first, hit1 = cached_statistics(m, cs, model_sha256(m))
    assert not hit1 and runs["run"] == len(cs)
    second, hit2 = cached_statistics(m, cs, model_sha256(m))
    assert hit2 and runs["run"] == len(cs)  # no new model run
    assert second.tensors == first.tensors
    # other data, other settings: recalibrate
    cached_statistics(m, samples(seed=2), model_sha256(m))
    assert runs["run"] == 2 * len(cs)
    cached_statistics(m, cs, model_sha256(m), ema_momentum=0.5)
    assert runs["run"] == 3 * len(cs)


def test_no_cache_bypasses(runs, tmp_path):
    m, cs = tiny_model(), samples()
    cached_statistics(m, cs, model_sha256(m), use_cache=False)
    assert not (tmp_path / "cache").exists()  # nothing written
    cached_statistics(m, cs, model_sha256(m))
    _, hit = cached_statistics(m, cs, model_sha256(m), use_cache=False)
    assert not hit and runs["run"] == 3 * len(cs)


def test_pipeline_changing_observer_rereduces_without_running_the_model(runs, tmp_path):
    m, cs = tiny_model(), samples(10)
    plans = {}
    for obs in ("minmax", "entropy", "percentile", "mse", "ema"):
        plans[obs] = plan_only(m, cs, tmp_path / f"{obs}.json", DeployOptions(observer=obs))
        if obs == "minmax":
            after_first = runs["run"]
    assert after_first > 0
    assert runs["run"] == after_first  # four more plans, no more model runs
    assert plans["minmax"].calibration["sha256"] == plans["mse"].calibration["sha256"]
    mm, pct = plans["minmax"].ranges["mm"], plans["percentile"].ranges["mm"]
    assert pct.min >= mm.min and pct.max <= mm.max
    for obs in ("entropy", "percentile", "mse"):  # the network output keeps its min/max range
        out = plans[obs].ranges["y"]
        assert (out.min, out.max) == (plans["minmax"].ranges["y"].min, plans["minmax"].ranges["y"].max)
    plan_only(m, cs, tmp_path / "again.json", DeployOptions(observer="entropy", no_cache=True))
    assert runs["run"] > after_first


def test_unreadable_cache_entry_is_ignored(runs):
    m, cs = tiny_model(), samples()
    cached_statistics(m, cs, model_sha256(m))
    for f in cache_dir().glob("*.json"):
        f.write_text("{not json")
    _, hit = cached_statistics(m, cs, model_sha256(m))
    assert not hit


def test_collect_is_called_once_per_new_key(runs, monkeypatch):
    calls = []
    real = collect.collect_statistics
    monkeypatch.setattr(collect, "collect_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    m, cs = tiny_model(), samples()
    for _ in range(3):
        cached_statistics(m, cs, model_sha256(m))
    assert len(calls) == 1
