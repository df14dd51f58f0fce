"""Ray runs (``--ray``): sharded calibration byte-identical to one process, the batch of deploys, the
retry of a killed worker. One local Ray (2 CPUs) is started for the module and shut down after."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.collect import collect_statistics
from calibration.dataset import CalibrationSet, load_folder
from calibration.observers import OBSERVERS
from calibration.partial import shard_bounds
from deployer import distributed
from deployer.model_io import input_specs
from deployer.pipeline import DeployOptions, Inputs, make_plan



def conv_matmul_model(seed: int = 0) -> onnx.ModelProto:
    """x (1,3,8,8) -> Conv 3->8 -> Relu -> NHWC reshape (1,64,8) -> MatMul 8x16 -> ReduceMean -> Softmax.

    Conv inputs get per-channel sums, the MatMul input per-last-axis sums, the Relu output is
    non-negative (entropy under ``auto``), the Softmax input keeps min/max under clipping observers."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "m"),
             numpy_helper.from_array(np.array([1, 64, 8], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["rs"]),
             helper.make_node("MatMul", ["rs", "m"], ["mm"]),
             helper.make_node("ReduceMean", ["mm"], ["rm"], axes=[1], keepdims=0),
             helper.make_node("Softmax", ["rm"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "conv_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def write_calibration(folder: Path, n: int) -> Path:
    """``n`` samples with a per-sample scale (ranges change from batch to batch, so the EMA moves)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        x = (rng.normal(0, 1, (1, 3, 8, 8)) * (0.5 + (i % 7) / 3)).astype(np.float32)
        np.savez(folder / f"{i:04d}.npz", x=x)
    return folder


@pytest.fixture(scope="module")
def local_ray() -> object:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = distributed.connect("local")
    yield info
    distributed.shutdown()


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> CalibrationSet:
    model = conv_matmul_model()
    return load_folder(write_calibration(tmp_path_factory.mktemp("calib"), 44), input_specs(model))


def _saved(stats: object, path: Path) -> bytes:
    stats.save(path)  # type: ignore[attr-defined]
    return path.read_bytes()


def test_shard_bounds_cut_at_batch_boundaries() -> None:
    assert shard_bounds(44, 3, 8) == [(0, 16), (16, 32), (32, 44)]
    assert shard_bounds(5, 4, 8) == [(0, 5)]
    b = shard_bounds(1024, 16, 8)
    assert len(b) == 16 and all((s % 8, e - s) == (0, 64) for s, e in b)


def test_sharded_statistics_and_plans_are_byte_identical(local_ray: object, calib: CalibrationSet,
                                                         tmp_path: Path) -> None:
    model = conv_matmul_model()
    one = collect_statistics(model, calib)
    parts: list[distributed.Partial] = []
    sharded = distributed.sharded_statistics(model, calib, "local", shards=3, partials=parts)
    assert len(parts) == 3 and [p.samples for p in parts] == [16, 16, 12]
    assert _saved(one, tmp_path / "a.json") == _saved(sharded, tmp_path / "b.json")
    # the closed-form merge of the same shards is not exact for float sums: the in-order fold is needed
    t = one.tensors["x"]
    assert t.batches == 6 and t.channel_sum is not None and t.ema_min != t.min
    inputs = Inputs(model, calib, calib, "classification", "test", "test")
    for observer in OBSERVERS:
        opts = DeployOptions(observer=observer, bias_correction=True)
        make_plan(inputs, one, opts).save(tmp_path / f"{observer}-1.json")
        make_plan(inputs, sharded, opts).save(tmp_path / f"{observer}-k.json")
        assert (tmp_path / f"{observer}-1.json").read_bytes() == (tmp_path / f"{observer}-k.json").read_bytes(), observer
    # the observers really differ on this data (the test would not notice a plan that ignores them)
    ranges = {o: json.loads((tmp_path / f"{o}-1.json").read_text())["ranges"]["c"] for o in OBSERVERS}
    assert len({json.dumps(r, sort_keys=True) for r in ranges.values()}) >= 3


def test_in_memory_set_is_spilled_and_identical(local_ray: object, calib: CalibrationSet, tmp_path: Path) -> None:
    model = conv_matmul_model()
    mem = CalibrationSet([calib[i] for i in range(20)], name="memory")
    assert not mem.reads_files
    a = collect_statistics(model, mem)
    b = distributed.sharded_statistics(model, mem, "local", shards=2)
    assert _saved(a, tmp_path / "a.json") == _saved(b, tmp_path / "b.json")


def _kill_first_time(marker: str, *args: object) -> distributed.Partial:
    """A shard task that kills its own worker process the first time it runs (the marker file
    records that), then computes normally when Ray retries it."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
    return distributed.calibrate_shard(*args)  # type: ignore[arg-type]


def test_killed_worker_is_retried_and_result_identical(local_ray: object, calib: CalibrationSet,
                                                       tmp_path: Path) -> None:
    model = conv_matmul_model()
    model_path = tmp_path / "m.onnx"
    onnx.save(model, str(model_path))
    bounds = shard_bounds(len(calib), 2, 8)
    marker = tmp_path / "killed-once"
    args = [(str(marker) if i == 1 else str(tmp_path / "never-killed"),  # only shard 1 dies
             str(model_path), calib[a:b], a, None, 8, 8192, 4096, 1) for i, (a, b) in enumerate(bounds)]
    (tmp_path / "never-killed").write_text("")
    import sys

    import ray.cloudpickle

    # this test module is not importable on the workers (pytest put tests/ on the driver's path only)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    parts = distributed.task_map(_kill_first_time, args, "local")
    assert marker.exists()  # the first attempt of shard 1 ran and died
    from calibration.partial import Fold

    fold = Fold(0.9, 8)
    for p in parts:
        fold.add_partial(p)
    assert _saved(fold.result(), tmp_path / "k.json") == _saved(collect_statistics(model, calib), tmp_path / "1.json")


def test_without_ray_the_same_map_runs_here(calib: CalibrationSet, tmp_path: Path) -> None:
    model = conv_matmul_model()
    a = distributed.sharded_statistics(model, calib, None, shards=4)
    assert _saved(a, tmp_path / "a.json") == _saved(collect_statistics(model, calib), tmp_path / "b.json")


# -- deploy batch ----------------------------------------------------------------------------------


def _manifest(tmp: Path) -> Path:
    onnx.save(conv_matmul_model(), str(tmp / "m.onnx"))
    write_calibration(tmp / "calib", 20)
    (tmp / "calib-other").mkdir()
    np.savez(tmp / "calib-other" / "0.npz", image=np.zeros((1, 3, 8, 8), np.float32))  # not the model's input name
    text = """
defaults:
  targets: [onnxruntime]
entries:
  - {name: ok, model: m.onnx, calib: calib}
  - {name: wrong-input, model: m.onnx, calib: calib-other}
  - {name: missing, model: nowhere.onnx, calib: calib}
"""
    (tmp / "batch.yaml").write_text(text)
    return tmp / "batch.yaml"


def _codes(summary: dict[str, object]) -> dict[str, int]:
    return {r["name"]: r["exit_code"] for r in summary["entries"]}  # type: ignore[index,union-attr]


def test_batch_sequential_and_on_ray(local_ray: object, tmp_path: Path) -> None:
    from deployer.batch import run_batch
    from deployer.cli import main

    manifest = _manifest(tmp_path)
    rc = main(["batch", str(manifest), "--out", str(tmp_path / "seq"), "--quiet"])
    seq = json.loads((tmp_path / "seq" / "summary.json").read_text())
    assert rc == 2 and seq["exit_code"] == 2  # the highest entry code
    assert _codes(seq) == {"ok": 0, "wrong-input": 2, "missing": 2}  # the failures did not stop the others
    assert seq["entries"][0]["verdicts"]["onnxruntime"]["ships"] is True and seq["entries"][0]["error"] is None
    assert "image" in seq["entries"][1]["error"] and "nowhere.onnx" in seq["entries"][2]["error"]
    page = (tmp_path / "seq" / "index.html").read_text()
    assert 'href="ok/report.html"' in page and "nowhere.onnx" in page and (tmp_path / "seq" / "ok" / "report.html").is_file()
    assert not (tmp_path / "seq" / "missing").exists() and not (tmp_path / "seq" / "wrong-input").exists()

    on_ray = run_batch(manifest, tmp_path / "ray", cluster="local")
    assert _codes(on_ray) == _codes(seq) and on_ray["ray"]["workers"] == 2
    for name in ("ok",):  # the same plan, byte for byte, from a Ray worker
        assert (tmp_path / "ray" / name / "plan.json").read_bytes() == (tmp_path / "seq" / name / "plan.json").read_bytes()


def test_batch_refuses_a_bad_manifest_before_running(tmp_path: Path) -> None:
    from deployer.cli import main

    (tmp_path / "bad.yaml").write_text("entries:\n  - {model: m.onnx, colour: red}\n")
    assert main(["batch", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


# -- the search and AdaRound on Ray ------------------------------------------------------------------


def _plan_and_samples(calib: CalibrationSet) -> tuple[onnx.ModelProto, object]:
    from deployer.model_io import canonicalize

    model = canonicalize(conv_matmul_model())  # node names, as the pipeline gives them
    stats = collect_statistics(model, calib)
    return model, make_plan(Inputs(model, calib, calib, "classification", "test", "test"), stats, DeployOptions())


def test_sensitivity_and_adaround_on_ray_equal_sequential(local_ray: object, calib: CalibrationSet) -> None:
    import math

    from deployer.adaround import AdaRoundConfig, compute_rounding
    from deployer.escalate import layer_order
    from deployer.mixed import DEFAULT_SIMULATION_POLICY, Evaluator, relative_metric, sensitivity

    model, plan = _plan_and_samples(calib)
    samples = [calib[i] for i in range(8)]
    seq = layer_order(plan, model, samples)  # type: ignore[arg-type]
    assert len(seq) == 2 and all(r["sqnr_db"] is not None for r in seq)
    assert layer_order(plan, model, samples, cluster="local") == seq  # type: ignore[arg-type]
    ev_seq = Evaluator(model, samples, DEFAULT_SIMULATION_POLICY, relative_metric("classification"))
    ev_ray = Evaluator(model, samples, DEFAULT_SIMULATION_POLICY, relative_metric("classification"))
    rows = sensitivity(plan, model, ev_seq)  # type: ignore[arg-type]
    assert sensitivity(plan, model, ev_ray, cluster="local") == rows  # type: ignore[arg-type]
    assert ev_seq.evaluations == ev_ray.evaluations == 2

    cfg = AdaRoundConfig(samples=8, iterations=60, time_budget_s=math.inf, seed=3)
    a = compute_rounding(model, plan, calib, cfg)  # type: ignore[arg-type]
    b = compute_rounding(model, plan, calib, cfg, cluster="local")  # type: ignore[arg-type]
    c = compute_rounding(model, plan, calib, cfg)  # type: ignore[arg-type]
    assert len(a.bits) == 2 and sorted(a.bits) == sorted(b.bits)
    for n in a.bits:
        assert np.array_equal(a.bits[n], b.bits[n]) and np.array_equal(a.bits[n], c.bits[n]), n
    assert a.summary["flipped_fraction"] > 0  # learned rounding moved some weights away from nearest
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert strip(a.summary) == strip(b.summary)


def test_cli_plan_with_ray_is_byte_identical(local_ray: object, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    from deployer.cli import main

    onnx.save(conv_matmul_model(), str(tmp_path / "m.onnx"))
    write_calibration(tmp_path / "calib", 40)
    common = ["plan", "--model", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "--no-cache",
              "--observer", "ema", "--adaround-iters", "30", "--fidelity-target", "0.999", "--search-budget", "4"]
    assert main([*common, "--out", str(tmp_path / "one.json")]) == 0
    capfd.readouterr()
    assert main([*common, "--out", str(tmp_path / "ray.json"), "--ray"]) == 0
    err = capfd.readouterr().err
    assert "ray: " in err and ", 2 workers, 2 shards" in err
    one, on_ray = (tmp_path / "one.json").read_bytes(), (tmp_path / "ray.json").read_bytes()
    assert one == on_ray and b'"adaround"' in one and b'"rounding"' in one


def test_ray_flag_without_ray_installed_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--ray`` without the package: exit 3 with the install command. The one-machine path never
    imports ray (a subprocess where importing it fails still plans)."""
    import subprocess
    import sys

    onnx.save(conv_matmul_model(), str(tmp_path / "m.onnx"))
    write_calibration(tmp_path / "calib", 10)
    args = ["plan", "--model", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "--no-cache", "--quiet"]
    code = ("import sys; sys.modules['ray'] = None; from deployer.cli import main; "
            f"rc = main({[*args, '--out', str(tmp_path / 'p.json')]!r}); "
            f"rc2 = main({[*args, '--out', str(tmp_path / 'q.json'), '--ray']!r}); print(rc, rc2)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.stdout.split() == ["0", "3"], res.stderr[-2000:]
    assert "pip install" in res.stderr and "[ray]" in res.stderr
    assert (tmp_path / "p.json").is_file() and not (tmp_path / "q.json").exists()


def test_a_shard_pickles_paths_not_samples(calib: CalibrationSet) -> None:
    import pickle

    shard = calib[8:40]
    _ = [s for s in shard]  # reading caches the last .npz in the loader: it must not travel
    copy = pickle.loads(pickle.dumps(shard))
    assert shard.reads_files and copy._load._last is None  # type: ignore[attr-defined]
    assert len(pickle.dumps(shard)) < 32 * 768 / 2  # less than half the samples' bytes: paths only
    assert np.array_equal(copy[3]["x"], calib[11]["x"])
    mem = CalibrationSet([calib[0]])
    assert not mem.reads_files
