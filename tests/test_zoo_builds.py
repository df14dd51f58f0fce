"""The benchmark zoo's cheapest entries build offline, run in ONNX Runtime, and their task metrics are
perfect for FP32 against itself and drop for perturbed outputs (so the metric can fail)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.zoo import ZOO, build, common

pytestmark = pytest.mark.real_model
CHEAP = ("ppocr_cls", "magika", "mtcnn_onet")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[common.ZooModel, common.Outputs]]:
    cache = tmp_path_factory.mktemp("zoo-cache")
    out = {}
    for name in CHEAP:
        m = build(name, str(cache))
        out[name] = (m, common.run_onnx(m.onnx_path, m.heldout))
    return out


def test_registry_has_twelve_or_more_entries() -> None:
    assert len(ZOO) >= 12


@pytest.mark.parametrize("name", CHEAP)
def test_entry_runs_and_fp32_is_perfect(zoo: dict, name: str) -> None:  # type: ignore[type-arg]
    m, ref = zoo[name]
    assert m.name == name and m.onnx_path.exists()
    assert len(m.calibration) >= 16 and len(m.heldout) >= 16
    assert set(m.heldout[0]) == set(m.calibration[0])
    assert all(k in common.OUTPUT_KINDS for k in m.outputs.values())
    assert len(ref[0]) == len(m.outputs)
    assert all(np.isfinite(a).all() for o in ref for a in o)
    self_metric = m.task_metric(ref, ref)
    assert m.passes(self_metric), self_metric
    for k, (op, _) in m.passing.items():
        assert self_metric[k] == (1.0 if op == ">=" else 0.0) or k.endswith("_db"), (k, self_metric[k])


@pytest.mark.parametrize("name", CHEAP)
def test_metric_fails_for_perturbed_outputs(zoo: dict, name: str) -> None:  # type: ignore[type-arg]
    m, ref = zoo[name]
    rng = np.random.default_rng(0)
    bad = [[a[..., ::-1].copy() + rng.normal(0, float(np.std(a)) + 1e-3, a.shape).astype(a.dtype) for a in o]
           for o in ref]
    assert not m.passes(m.task_metric(ref, bad))


def test_calibration_and_heldout_are_disjoint(zoo: dict) -> None:  # type: ignore[type-arg]
    for m, _ in zoo.values():
        cal = {next(iter(s.values())).tobytes() for s in m.calibration}
        assert not any(next(iter(s.values())).tobytes() in cal for s in m.heldout), m.name
