"""Calibration: observers, mergeable statistics, folder loading and collection on a tiny ONNX model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from calibration.collect import collect_statistics, float_activations
from calibration.dataset import CalibrationSet, InputSpec, from_iterable, load_folder
from calibration.observers import Statistics, TensorStats, reduce_range
from deployer.errors import BadInputError

M = 0.9


def ema(values: list[float], m: float = M) -> float:
    e = values[0]
    for v in values[1:]:
        e = m * e + (1 - m) * v
    return e


# -- TensorStats ------------------------------------------------------------------------------------

BATCHES = [
    np.array([[0.5, -1.0], [2.0, 0.0]]),
    np.array([-3.0, 1.0, 0.25]),
    np.array([[[-0.5]], [[4.0]]]),
    np.array([-2.0, 0.5]),
    np.array([1.0, 1.5]),
]


def test_minmax_observer_hand_computed():
    s = TensorStats()
    for b in BATCHES:
        s.update(b, M)
    assert (s.min, s.max) == (-3.0, 4.0)
    assert s.batches == 5
    assert reduce_range(s, "minmax") == (-3.0, 4.0)


def test_ema_first_batch_initialises():
    s = TensorStats()
    s.update(BATCHES[0], M)
    assert (s.ema_min, s.ema_max) == (-1.0, 2.0)
    s.update(BATCHES[1], M)
    # ema = m * ema + (1 - m) * batch
    assert s.ema_min == pytest.approx(0.9 * -1.0 + 0.1 * -3.0)
    assert s.ema_max == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)


def test_ema_observer_hand_computed():
    s = TensorStats()
    for b in BATCHES:
        s.update(b, M)
    mins = [-1.0, -3.0, -0.5, -2.0, 1.0]
    maxs = [2.0, 1.0, 4.0, 0.5, 1.5]
    assert s.ema_min == pytest.approx(ema(mins))
    assert s.ema_max == pytest.approx(ema(maxs))
    lo, hi = reduce_range(s, "ema")
    assert (lo, hi) == pytest.approx((ema(mins), ema(maxs)))


def test_empty_batch_is_ignored():
    s = TensorStats()
    s.update(np.zeros((0, 3)), M)
    assert s.batches == 0 and s.ema_min is None


def test_reduce_range_includes_zero():
    pos = TensorStats()
    pos.update(np.array([1.0, 3.0]), M)
    assert reduce_range(pos, "minmax") == (0.0, 3.0)
    assert reduce_range(pos, "ema") == (0.0, 3.0)
    neg = TensorStats()
    neg.update(np.array([-5.0, -2.0]), M)
    assert reduce_range(neg, "minmax") == (-5.0, 0.0)
    assert reduce_range(neg, "ema") == (-5.0, 0.0)


def test_reduce_range_unknown_observer():
    s = TensorStats()
    s.update(np.array([1.0]), M)
    with pytest.raises(BadInputError, match="unknown observer"):
        reduce_range(s, "kl")


def test_ema_without_ema_values_falls_back_to_minmax():
    s = TensorStats(min=-1.0, max=2.0)
    assert reduce_range(s, "ema") == (-1.0, 2.0)


# -- Statistics.merge ------------------------------------------------------------------------------


def _stats(batches: list[np.ndarray], name: str = "t") -> Statistics:
    s = TensorStats()
    for b in batches:
        s.update(b, M)
        s.samples += 1
    return Statistics({name: s}, {"ema_momentum": M})


def test_merge_minmax_exact():
    one = _stats(BATCHES).tensors["t"]
    for cut in range(1, len(BATCHES)):
        merged = _stats(BATCHES[:cut]).merge(_stats(BATCHES[cut:])).tensors["t"]
        assert (merged.min, merged.max) == (one.min, one.max)
        assert merged.batches == one.batches and merged.samples == one.samples


def test_merge_ema_single_batch_shard_equals_one_pass():
    one = _stats(BATCHES).tensors["t"]
    merged = _stats(BATCHES[:-1]).merge(_stats(BATCHES[-1:])).tensors["t"]
    assert merged.ema_min == pytest.approx(one.ema_min)
    assert merged.ema_max == pytest.approx(one.ema_max)


# Regression: merge used w*a + (1-w)*b, exact only when `other` held one batch (one pass gives
# w*a + b - w*b_first); fixed by keeping the first batch's min/max (ema_first_*).
@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_merge_ema_equals_one_pass(cut):
    one = _stats(BATCHES).tensors["t"]
    merged = _stats(BATCHES[:cut]).merge(_stats(BATCHES[cut:])).tensors["t"]
    assert merged.ema_min == pytest.approx(one.ema_min)
    assert merged.ema_max == pytest.approx(one.ema_max)


def test_merge_disjoint_tensors_and_empty_shard():
    a = _stats(BATCHES[:2], "a")
    b = _stats(BATCHES[2:], "b")
    m = a.merge(b)
    assert set(m.tensors) == {"a", "b"}
    assert m.tensors["a"] == a.tensors["a"] and m.tensors["b"] == b.tensors["b"]
    assert m.tensors["a"] is not a.tensors["a"]  # a copy, not shared state
    empty = Statistics({"t": TensorStats()}, {"ema_momentum": M})
    full = _stats(BATCHES)
    for merged in (empty.merge(full), full.merge(empty)):
        t = merged.tensors["t"]
        assert (t.min, t.max) == (-3.0, 4.0)
        assert (t.ema_min, t.ema_max) == (full.tensors["t"].ema_min, full.tensors["t"].ema_max)


def test_statistics_save_load_round_trip(tmp_path):
    s = _stats(BATCHES)
    s.tensors["dead"] = TensorStats()
    p = tmp_path / "stats.json"
    s.save(p)
    back = Statistics.load(p)
    assert back.settings == s.settings
    assert back.tensors["t"] == s.tensors["t"]
    # re-reduce with another observer without re-running the model
    assert reduce_range(back.tensors["t"], "ema") == reduce_range(s.tensors["t"], "ema")


# -- load_folder ------------------------------------------------------------------------------------

SPEC = [InputSpec("x", (1, 3, 4, 4), np.dtype(np.float32))]
SPEC2 = [InputSpec("a", (1, 2), np.dtype(np.float32)), InputSpec("ids", (1, 3), np.dtype(np.int64))]


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 4, 4)).astype(np.float32)


def test_load_npy_single_input(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", _x(i))
    (tmp_path / "README.txt").write_text("ignored")
    cs = load_folder(tmp_path, SPEC)
    assert len(cs) == 3
    for i, s in enumerate(cs):
        assert set(s) == {"x"}
        np.testing.assert_array_equal(s["x"], _x(i))
    assert cs.name == str(tmp_path)


def test_load_npz_keyed_by_input_name(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"s{i}.npz", a=np.full((1, 2), i, np.float32), ids=np.arange(3, dtype=np.int64)[None])
    cs = load_folder(tmp_path, SPEC2)
    assert len(cs) == 2
    assert cs[1]["a"].tolist() == [[1.0, 1.0]] and cs[1]["ids"].dtype == np.int64


def test_load_stacked_samples(tmp_path):
    stack = np.stack([_x(i) for i in range(4)])  # (4, 1, 3, 4, 4): rank + 1 -> 4 samples
    np.save(tmp_path / "a_stack.npy", stack)
    np.save(tmp_path / "b_single.npy", _x(9))
    cs = load_folder(tmp_path, SPEC)
    assert len(cs) == 5
    np.testing.assert_array_equal(cs[2]["x"], _x(2))
    np.testing.assert_array_equal(cs[4]["x"], _x(9))


def test_load_stacked_npz(tmp_path):
    np.savez(tmp_path / "s.npz", a=np.zeros((3, 1, 2), np.float32), ids=np.zeros((3, 1, 3), np.int64))
    assert len(load_folder(tmp_path, SPEC2)) == 3


def test_load_subfolders_per_input(tmp_path):
    for n, arr in (("a", np.ones((1, 2), np.float32)), ("ids", np.ones((1, 3), np.int64))):
        (tmp_path / n).mkdir()
        for i in range(2):
            np.save(tmp_path / n / f"{i}.npy", arr)
    assert len(load_folder(tmp_path, SPEC2)) == 2


def test_sha256_is_content_hash(tmp_path):
    a = CalibrationSet([{"x": _x(0)}, {"x": _x(1)}])
    b = CalibrationSet([{"x": _x(0)}, {"x": _x(1)}], name="other")
    c = CalibrationSet([{"x": _x(1)}, {"x": _x(0)}])
    assert a.sha256() == b.sha256() != c.sha256()


def test_error_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_folder(tmp_path / "nope", SPEC)


def test_error_empty_folder(tmp_path):
    with pytest.raises(BadInputError, match="no .npy/.npz samples"):
        load_folder(tmp_path, SPEC)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match="no .npy/.npz samples"):
        load_folder(tmp_path, SPEC)


def test_error_pickled_npy(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match="pickled"):
        load_folder(tmp_path, SPEC)


def test_error_pickled_npz(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object))
    with pytest.raises(BadInputError, match="pickled"):
        load_folder(tmp_path, SPEC)


def test_error_wrong_input_name(tmp_path):
    np.savez(tmp_path / "s.npz", y=_x(0))
    with pytest.raises(BadInputError, match="input names"):
        load_folder(tmp_path, SPEC)


def test_error_bare_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((1, 2), np.float32))
    with pytest.raises(BadInputError, match="bare .npy"):
        load_folder(tmp_path, SPEC2)


def test_error_wrong_shape(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((1, 3, 5, 4), np.float32))
    with pytest.raises(BadInputError, match="shape"):
        load_folder(tmp_path, SPEC)


def test_error_wrong_dtype(tmp_path):
    np.save(tmp_path / "s.npy", _x(0).astype(np.float64))
    with pytest.raises(BadInputError, match="float64"):
        load_folder(tmp_path, SPEC)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_nan(tmp_path, bad):
    x = _x(0)
    x[0, 1, 2, 3] = bad
    np.save(tmp_path / "s.npy", x)
    with pytest.raises(BadInputError, match="NaN or Inf"):
        load_folder(tmp_path, SPEC)


def test_error_corrupt_file(tmp_path):
    (tmp_path / "s.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(BadInputError):
        load_folder(tmp_path, SPEC)


def test_error_inconsistent_stacking(tmp_path):
    np.savez(tmp_path / "s.npz", a=np.zeros((3, 1, 2), np.float32), ids=np.zeros((1, 3), np.int64))
    with pytest.raises(BadInputError, match="stacked"):
        load_folder(tmp_path, SPEC2)


def test_from_iterable_arrays_and_errors():
    cs = from_iterable([_x(0), _x(1)], SPEC)
    assert len(cs) == 2 and set(cs[0]) == {"x"}
    with pytest.raises(BadInputError, match="no samples"):
        from_iterable([], SPEC)
    with pytest.raises(BadInputError, match="dicts keyed by input name"):
        from_iterable([np.zeros((1, 2), np.float32)], SPEC2)


# -- collect_statistics on Conv -> Relu ------------------------------------------------------------

W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
B = np.array([0.1, -0.2, 0.3, -0.4], np.float32)


def conv_relu_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["y"], name="relu"),
    ]
    g = helper.make_graph(
        nodes, "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m)
    return m


def np_conv(x: np.ndarray) -> np.ndarray:
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))  # (1, C, H, W, 3, 3)
    return np.einsum("nchwij,ocij->nohw", win, W.astype(np.float64)) + B[None, :, None, None]


def test_float_activations_lists_inputs_and_node_outputs():
    assert float_activations(conv_relu_model()) == ["x", "conv_out", "y"]


def test_collect_statistics_matches_numpy():
    rng = np.random.default_rng(1)
    samples = [{"x": (rng.standard_normal((1, 3, 6, 6)) * (1 + i)).astype(np.float32)} for i in range(5)]
    stats = collect_statistics(conv_relu_model(), samples, ema_momentum=M, ema_batch=2)
    assert set(stats.tensors) == {"x", "conv_out", "y"}
    assert stats.settings == {"ema_momentum": M, "ema_batch": 2}
    conv = [np_conv(s["x"]) for s in samples]
    relu = [np.maximum(c, 0) for c in conv]
    xs = [s["x"] for s in samples]
    for name, vals in (("x", xs), ("conv_out", conv), ("y", relu)):
        t = stats.tensors[name]
        assert t.min == pytest.approx(min(float(v.min()) for v in vals), abs=1e-5)
        assert t.max == pytest.approx(max(float(v.max()) for v in vals), abs=1e-5)
        assert t.samples == 5 and t.batches == 3
        # EMA over batches of 2 samples: [0, 1], [2, 3], [4]
        chunks = [vals[0:2], vals[2:4], vals[4:5]]
        bmin = [min(float(v.min()) for v in c) for c in chunks]
        bmax = [max(float(v.max()) for v in c) for c in chunks]
        assert t.ema_min == pytest.approx(ema(bmin), abs=1e-5)
        assert t.ema_max == pytest.approx(ema(bmax), abs=1e-5)
    assert reduce_range(stats.tensors["y"], "minmax")[0] == 0.0


def test_collect_statistics_skip_and_progress():
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    calls = []
    stats = collect_statistics(conv_relu_model(), samples, skip={"conv_out"}, ema_batch=2,
                               progress=lambda d, t: calls.append((d, t)))
    assert set(stats.tensors) == {"x", "y"}
    assert calls == [(2, 3), (3, 3)]


def test_collect_sharded_merge_matches_one_pass_minmax():
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(6)]
    model = conv_relu_model()
    one = collect_statistics(model, samples, ema_batch=2)
    merged = collect_statistics(model, samples[:4], ema_batch=2).merge(collect_statistics(model, samples[4:], ema_batch=2))
    for name in one.tensors:
        assert (merged.tensors[name].min, merged.tensors[name].max) == (one.tensors[name].min, one.tensors[name].max)
        # the second shard holds one EMA batch: the merge is exact there
        assert merged.tensors[name].ema_max == pytest.approx(one.tensors[name].ema_max)
        assert merged.tensors[name].ema_min == pytest.approx(one.tensors[name].ema_min)


# -- lazy sets and streaming -----------------------------------------------------------------------


def test_load_folder_is_lazy_and_hashes_like_the_in_memory_set(tmp_path):
    for i in range(4):
        np.save(tmp_path / f"s{i}.npy", _x(i))
    cs = load_folder(tmp_path, SPEC)
    assert cs.is_lazy and len(cs) == 4
    eager = CalibrationSet([{"x": _x(i)} for i in range(4)])
    assert cs.sha256() == eager.sha256()
    np.testing.assert_array_equal(cs[-1]["x"], _x(3))
    view = cs[1:3]
    assert view.is_lazy and len(view) == 2 and view.sha256() == eager[1:3].sha256()
    np.save(tmp_path / "s0.npy", _x(9))  # read on access: the file's current content
    np.testing.assert_array_equal(cs[0]["x"], _x(9))


def test_lazy_set_select_shuffled_and_fingerprint():
    loads = []

    def load(i: int) -> dict[str, np.ndarray]:
        loads.append(i)
        return {"x": _x(i)}

    cs = CalibrationSet.lazy(10, load, "gen", fingerprint="gen v1 seed 0 n 10")
    assert loads == []  # nothing produced up front
    h = cs.sha256()
    assert loads == [] and h == CalibrationSet.lazy(10, load, "gen", fingerprint="gen v1 seed 0 n 10").sha256()
    assert h != CalibrationSet.lazy(10, load, "gen", fingerprint="gen v1 seed 1 n 10").sha256()
    a, b = cs.shuffled(3), cs.shuffled(3)
    assert [s["x"][0, 0, 0, 0] for s in a] == [s["x"][0, 0, 0, 0] for s in b]
    assert a.sha256() == b.sha256() != h and cs.shuffled(4).sha256() != a.sha256()
    first3 = cs.shuffled(3)[:3]
    order = np.random.default_rng(3).permutation(10)[:3]
    loads.clear()
    assert [float(s["x"][0, 0, 0, 0]) for s in first3] == [float(_x(int(i))[0, 0, 0, 0]) for i in order]
    assert loads == [int(i) for i in order]  # only those three were produced
    with pytest.raises(IndexError):
        cs.select([10])


def test_lazy_validation_on_access_names_the_sample():
    def load(i: int) -> dict[str, np.ndarray]:
        x = _x(i)
        if i == 2:
            x[0, 0, 0, 0] = np.nan
        return {"x": x}

    cs = CalibrationSet.lazy(4, load, "gen")
    cs.validate(SPEC, full=False)  # sample 0 only
    with pytest.raises(BadInputError, match="sample 2 .*NaN"):
        list(cs)
    with pytest.raises(BadInputError, match="sample 2 .*NaN"):
        CalibrationSet.lazy(4, load, "gen").validate(SPEC)


def test_from_iterable_generator_factory_and_sequence_are_lazy():
    def factory():
        return ({"x": _x(i)} for i in range(5))

    cs = from_iterable(factory, SPEC)
    assert cs.is_lazy and len(cs) == 5
    np.testing.assert_array_equal(cs[3]["x"], _x(3))
    np.testing.assert_array_equal(cs[1]["x"], _x(1))  # restarts the generator
    assert cs.sha256() == CalibrationSet([{"x": _x(i)} for i in range(5)]).sha256()
    seq = from_iterable([_x(0), _x(1)], SPEC)
    assert seq.is_lazy and set(seq[1]) == {"x"}


def test_collect_statistics_streams_a_lazy_set():
    """Samples are produced on access and dropped: never more than a few alive, whatever N."""
    import gc
    import weakref

    alive: list[weakref.ref] = []
    peak = [0]
    rng_seeds = range(40)

    def load(i: int) -> dict[str, np.ndarray]:
        x = (np.random.default_rng(rng_seeds[i]).standard_normal((1, 3, 6, 6)) * (1 + i % 3)).astype(np.float32)
        alive.append(weakref.ref(x))
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return {"x": x}

    lazy = CalibrationSet.lazy(40, load, "gen")
    stats = collect_statistics(conv_relu_model(), lazy, ema_batch=4)
    assert peak[0] <= 3  # the sample being run, the one being reduced, the new one
    eager = collect_statistics(conv_relu_model(), [load(i) for i in range(40)], ema_batch=4)
    for n in stats.tensors:
        assert stats.tensors[n] == eager.tensors[n]
