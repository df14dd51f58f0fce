"""Observers against hand-computed values, the power-of-two histogram, merging and serialization."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.histogram import MIN_EXP, Histogram, range_exp
from calibration.observers import (OBSERVERS, ObserverParams, Statistics, TensorStats, kl_divergence, kl_search,
                                   reduce_range)

M = 0.9
SYM = ObserverParams(symmetric=True)


def stats_of(*batches: np.ndarray) -> TensorStats:
    s = TensorStats()
    for b in batches:
        s.update(np.asarray(b), M)
        s.samples += 1
    return s


# -- histogram grid ---------------------------------------------------------------------------------


def test_range_exp_is_smallest_power_of_two_strictly_above():
    assert range_exp(1.0) == 1  # 2**0 == 1 is not strictly above 1
    assert range_exp(0.99) == 0
    assert range_exp(3.0) == 2
    assert range_exp(0.0) == MIN_EXP


def test_histogram_hand_computed_bins():
    h = Histogram(bins=8)
    h.add(np.array([-1.5, -0.25, 0.0, 0.3, 1.9], np.float32))  # absmax 1.9 -> R = 2, width 0.5
    assert h.exp == 1 and h.width == 0.5
    # bins: [-2,-1.5) [-1.5,-1) [-1,-.5) [-.5,0) [0,.5) [.5,1) [1,1.5) [1.5,2)
    assert h.counts.tolist() == [0, 1, 0, 1, 2, 0, 0, 1]
    # |x| folds bins by mirror image: [-1.5, -1) lands in [1, 1.5)
    assert h.abs_counts().tolist() == [3, 0, 1, 1]


def test_histogram_widening_merges_bin_pairs_exactly():
    h = Histogram(bins=8)
    h.add(np.array([-1.5, -0.25, 0.0, 0.3, 1.9]))
    h.add(np.array([3.0]))  # R 2 -> 4, width 1
    assert h.exp == 2
    # bins of width 1 over [-4, 4): -1.5 -> [-2,-1); -0.25 -> [-1,0); 0, 0.3 -> [0,1); 1.9 -> [1,2); 3 -> [3,4)
    assert h.counts.tolist() == [0, 0, 1, 1, 2, 1, 0, 1]
    direct = Histogram(bins=8)
    direct.add(np.array([-1.5, -0.25, 0.0, 0.3, 1.9, 3.0]))
    assert direct == h


def test_histogram_size_is_fixed_whatever_the_number_of_samples():
    rng = np.random.default_rng(0)
    s = TensorStats()
    sizes = set()
    for i in range(200):
        s.update(rng.standard_normal(1000) * (1 + i), M)
        sizes.add(s.hist.counts.nbytes)
    assert sizes == {s.hist.bins * 8}
    assert s.hist.total == 200 * 1000


def test_histogram_counts_nonfinite_separately():
    h = Histogram(bins=8)
    h.add(np.array([-np.inf, 0.5, np.nan, 1.0]))
    assert h.nonfinite == 2 and h.total == 2


# -- merge == one pass ------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_two_shards_merge_into_one_pass(cut):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(500).astype(np.float32) * 10 ** rng.uniform(-2, 2) for _ in range(7)]
    one = Statistics({"t": stats_of(*batches)}, {"ema_momentum": M})
    a = Statistics({"t": stats_of(*batches[:cut])}, {"ema_momentum": M})
    b = Statistics({"t": stats_of(*batches[cut:])}, {"ema_momentum": M})
    merged = a.merge(b).tensors["t"]
    ref = one.tensors["t"]
    assert merged.hist == ref.hist  # histograms merge exactly
    assert (merged.min, merged.max, merged.batches, merged.samples) == (ref.min, ref.max, ref.batches, ref.samples)
    assert merged.ema_min == pytest.approx(ref.ema_min) and merged.ema_max == pytest.approx(ref.ema_max)
    for obs in OBSERVERS:
        assert reduce_range(merged, obs) == pytest.approx(reduce_range(ref, obs))


def test_save_load_round_trip_keeps_histograms(tmp_path):
    s = Statistics({"t": stats_of(np.linspace(-3, 5, 1001)), "dead": TensorStats()}, {"ema_momentum": M})
    p = tmp_path / "statistics.json"
    s.save(p)
    assert b"pickle" not in p.read_bytes() and p.stat().st_size < 10_000  # compact: zlib counts
    back = Statistics.load(p)
    assert back.tensors["t"] == s.tensors["t"]
    for obs in OBSERVERS:
        assert reduce_range(back.tensors["t"], obs) == reduce_range(s.tensors["t"], obs)


# -- each observer against a hand-computed value ----------------------------------------------------


def test_minmax_and_ema_hand_computed():
    s = stats_of(np.array([-1.0, 2.0]), np.array([-3.0, 1.0]))
    assert reduce_range(s, "minmax") == (-3.0, 2.0)
    assert reduce_range(s, "ema") == pytest.approx((0.9 * -1 + 0.1 * -3, 0.9 * 2 + 0.1 * 1))
    assert reduce_range(s, "minmax", SYM) == (-3.0, 3.0)


def test_percentile_uniform_hand_computed():
    # 20,001 evenly spaced values on [-1, 1]: the 99th percentile is 0.98, the 1st -0.98
    s = stats_of(np.linspace(-1.0, 1.0, 20001))
    w = s.hist.width  # 2**1 * 2 / 8192
    lo, hi = reduce_range(s, "percentile", ObserverParams(percentile=99.0))
    assert hi == pytest.approx(0.98, abs=2 * w) and lo == pytest.approx(-0.98, abs=2 * w)
    # symmetric: 98% of |x| lies below 0.98
    lo, hi = reduce_range(s, "percentile", ObserverParams(percentile=98.0, symmetric=True))
    assert hi == pytest.approx(0.98, abs=2 * w) and lo == -hi
    # 100% is the observed range
    assert reduce_range(s, "percentile", ObserverParams(percentile=100.0)) == pytest.approx((-1.0, 1.0), abs=w)


def test_percentile_gaussian_matches_quantile():
    x = np.random.default_rng(2).standard_normal(200_000)
    s = stats_of(x)
    _, hi = reduce_range(s, "percentile", ObserverParams(percentile=99.0))
    assert hi == pytest.approx(2.326, abs=0.03)  # Phi^-1(0.99)


def test_kl_divergence_hand_computed():
    hist = np.array([5, 5, 5, 5, 0, 0, 0, 1], float)
    # i = 4: P = [5,5,5,6]/21, Q = [5,5,5,5]/20 (no empty bins, no smoothing)
    expected = 3 * (5 / 21) * math.log((5 / 21) / 0.25) + (6 / 21) * math.log((6 / 21) / 0.25)
    assert kl_divergence(hist, 4, 4) == pytest.approx(expected)
    assert expected == pytest.approx(0.003301, abs=1e-6)
    # i = 5: P = [5,5,5,5,1]/21; groups [0,0,1,2,3], Q = [5,5,5,5,0]/20, smoothed: the empty bin gets
    # 1e-4 and the four others give 2.5e-5 each
    q = 0.25 - 1e-4 / 4
    expected5 = 4 * (5 / 21) * math.log((5 / 21) / q) + (1 / 21) * math.log((1 / 21) / 1e-4)
    assert kl_divergence(hist, 5, 4) == pytest.approx(expected5)
    # i = 8: groups of two bins, each spread over its non-empty bins -> Q == P
    assert kl_divergence(hist, 8, 4) == pytest.approx(0.0, abs=1e-12)
    assert kl_search(hist, 4, stride=1) == 8


def test_entropy_clips_gaussian_tails():
    # N(0, 1) plus three outliers at 40: the entropy threshold stays in the bulk (TensorRT-style
    # search starts at 128/2048 of the range, here 40/16 = 2.5), far below min/max
    x = np.concatenate([np.random.default_rng(3).standard_normal(1_000_000), [40.0, -40.0, 40.0]])
    s = stats_of(x)
    assert reduce_range(s, "minmax") == (-40.0, 40.0)
    lo, hi = reduce_range(s, "entropy", SYM)
    assert 2.5 <= hi <= 8.0 and lo == -hi
    lo, hi = reduce_range(s, "entropy")
    assert 2.5 <= hi <= 8.0 and -8.0 <= lo <= -2.5


def test_mse_two_point_distribution_hand_computed():
    # +-1 only: t = 1 puts both on the grid (zero error); any other t costs error
    s = stats_of(np.repeat([-1.0, 1.0], 5000))
    lo, hi = reduce_range(s, "mse", SYM)
    assert hi == pytest.approx(1.0, abs=2 * s.hist.width) and lo == -hi


def test_mse_laplace_matches_aciq():
    # Banner et al. (ACIQ): the MSE-optimal 8-bit clip of Laplace(0, b) is 9.89 b
    x = np.random.default_rng(4).laplace(0.0, 1.0, 1_000_000)
    s = stats_of(x)
    lo, hi = reduce_range(s, "mse", SYM)
    assert hi == pytest.approx(9.89, rel=0.05) and lo == -hi


def test_asymmetric_and_symmetric_differ_on_one_sided_data():
    x = np.random.default_rng(5).exponential(1.0, 200_000)  # never negative, like a ReLU output
    s = stats_of(x)
    for obs in ("percentile", "entropy", "mse"):
        lo, hi = reduce_range(s, obs)
        assert lo == 0.0 and 0 < hi <= s.max
    # asymmetric MSE spends 255 steps on [0, t], symmetric only 127: the asymmetric clip is larger
    assert reduce_range(s, "mse")[1] > reduce_range(s, "mse", SYM)[1]


def test_zero_range_tensor_reduces_to_zero():
    s = stats_of(np.zeros(100))
    for obs in OBSERVERS:
        assert reduce_range(s, obs) == (0.0, 0.0)
    assert Statistics({"z": s}).degenerate() == ["z"]


def test_percentile_param_validated():
    from deployer.errors import BadInputError

    with pytest.raises(BadInputError, match="percentile"):
        ObserverParams(percentile=0.0)


def test_entropy_does_not_degenerate_on_a_spike_at_zero():
    """The EfficientNet-Lite0 global-average-pool case: 55% exact zeros (dead ReLU channels) and a
    smooth tail to 5.7. Plain KL search (no floor) picks its first candidate -- 256 of the 1,454
    collapsed bins, 1.0 -- because merging the spike bin with its neighbours into one level costs more
    KL than clipping 10% of the values; the percentile floor keeps the threshold at or above the
    99.9th percentile."""
    rng = np.random.default_rng(0)
    n = 100_000
    x = np.concatenate([np.zeros(int(0.55 * n)), np.minimum(rng.exponential(0.6, n - int(0.55 * n)), 5.675)])
    x = x.astype(np.float32)
    s = stats_of(x)
    assert s.hist.exp == 3  # R = 8, 8192 bins of 1/512; positive side trimmed at 5.675 -> 2906 bins, merged by 2
    q999 = float(np.quantile(x, 0.999))
    lo, hi = reduce_range(s, "entropy", ObserverParams(entropy_floor=0.0))
    assert (lo, hi) == (0.0, 1.0)  # degenerate: 256 bins of 1/256
    assert float(np.mean(x > hi)) > 0.05  # clips more than 5% of the values
    lo, hi = reduce_range(s, "entropy")
    assert lo == 0.0 and q999 - 1 / 256 <= hi <= 5.675
    with pytest.raises(Exception, match="entropy floor"):
        ObserverParams(entropy_floor=101.0)


def test_network_outputs_and_logits_are_not_clipped():
    from onnx import TensorProto, helper, numpy_helper

    from calibration.collect import unclipped_tensors

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Reshape", ["logits", "shape"], ["r"]),
             helper.make_node("Softmax", ["r"], ["prob"]), helper.make_node("Relu", ["x"], ["feat"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 3]),
                           helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 4])],
                          [w, numpy_helper.from_array(np.array([1, 3], np.int64), "shape")])
    m = helper.make_model(g)
    assert unclipped_tensors(m) == {"prob", "feat", "r", "logits"}  # followed back through the Reshape
    m.graph.node[2].op_type = "Sigmoid"  # not a softmax: only the outputs keep their range
    assert unclipped_tensors(m) == {"prob", "feat"}


# -- auto: one observer per tensor ------------------------------------------------------------------


def _stats_3d(x: np.ndarray) -> TensorStats:
    s = TensorStats()
    s.update(x, M)
    s.observe_last_axis(x)
    s.samples += 1
    return s


def test_auto_keeps_outlier_channels_and_clips_sparse_spikes():
    from calibration.observers import auto_observer

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1, 64, 32))
    x[..., 5] *= 40.0  # one systematic outlier channel (transformer residual stream)
    st = _stats_3d(x)
    assert auto_observer(st) == ("minmax", "outlier channels")
    assert reduce_range(st, "auto") == reduce_range(st, "minmax")
    y = rng.normal(0, 1, (1, 256, 64))
    y[0, 17, 3] = 60.0  # one isolated spike, no channel structure
    sp = _stats_3d(y)
    assert auto_observer(sp) == ("percentile", "heavy tail")
    lo, hi = reduce_range(sp, "auto")
    assert hi < 10.0 and (lo, hi) == reduce_range(sp, "percentile")  # the spike is clipped
    z = _stats_3d(rng.normal(0, 1, (1, 256, 64)))
    assert auto_observer(z)[0] == "minmax"  # light tail: nothing worth clipping


def test_auto_follows_the_producer_for_bounded_activations():
    from calibration.observers import auto_observer

    rng = np.random.default_rng(1)
    relu = stats_of(np.maximum(rng.normal(0, 1, (4, 1000)), 0))
    assert auto_observer(relu, "Relu") == ("entropy", "non-negative")
    assert auto_observer(relu, "Clip") == ("minmax", "bounded activation")
    spiky = rng.normal(0, 1, (4, 50_000))
    spiky[0, :3] = 50.0  # a few isolated spikes: far above the 99.99th percentile
    signed = stats_of(spiky)
    assert auto_observer(signed, "Conv") == ("percentile", "heavy tail")
    assert auto_observer(signed, "Add", keep="residual stream") == ("minmax", "residual stream")


def test_auto_per_tensor_in_a_plan(tmp_path):
    """A recipe that says auto: the plan records how many tensors got each observer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from calibration.dataset import CalibrationSet
    from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan

    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (16, 16)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                           helper.make_node("Relu", ["h"], ["r"], name="relu"),
                           helper.make_node("MatMul", ["r", "w"], ["h2"], name="mm2"),
                           helper.make_node("MatMul", ["h2", "w"], ["y"], name="head")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    samples = []
    for _ in range(8):
        x = rng.normal(0, 1, (1, 8, 16)).astype(np.float32)
        x[..., 2] *= 30.0
        samples.append({"x": x})
    cal = CalibrationSet(samples)
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    stats = compute_statistics(inputs, DeployOptions(no_cache=True))
    recipe = tmp_path / "auto.json"
    recipe.write_text('{"base": "int8", "recovery": {"observer": "auto"}}')
    plan = make_plan(inputs, stats, DeployOptions(recipe=str(recipe)))
    assert plan.calibration["observer"] == "auto"
    chosen = plan.calibration["observer_params"]["chosen"]
    assert chosen.get("entropy") == 1 and sum(chosen.values()) == len(plan.ranges)  # the Relu output
    mm = make_plan(inputs, stats, DeployOptions(observer="minmax", recipe="int8"))
    assert plan.ranges["x"] == mm.ranges["x"]  # outlier channel: min/max kept
    assert plan.ranges["y"] == mm.ranges["y"]  # network output: min/max kept
    assert plan.ranges["h2"] == mm.ranges["h2"]  # the head's input: min/max kept
    assert plan.ranges["r"].max <= mm.ranges["r"].max
