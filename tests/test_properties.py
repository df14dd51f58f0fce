"""Property-based tests (hypothesis) for the plan parser and quantize/dequantize, beyond ``test_plan.py``.

``test_plan.py`` already checks round trips of in-range values; here:

- the plan parser: any valid plan survives JSON byte-identically; any mutation of a plan's JSON
  (a value replaced by arbitrary JSON, a key added or removed) either loads or raises
  :class:`PlanError`, never another exception; every accepted range has min <= max, finite, within float32.
- quantize/dequantize for *any* input: values far outside the range, infinities and subnormal
  ranges stay inside the integer range, scales are never zero and always finite in float32, and
  in-range values come back within half a scale step.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deployer.errors import PlanError
from deployer.plan import FLOAT32_MAX, Granularity, NodeDecision, Precision, QuantPlan, TensorRange, WeightScheme
from deployer.quant import MIN_SCALE, asymmetric_params, dequantize, per_channel_scales, quantize, symmetric_scale

F32_MAX = float(np.finfo(np.float32).max)
names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)
f32_floats = st.floats(min_value=-F32_MAX, max_value=F32_MAX, allow_nan=False, allow_infinity=False)


@st.composite
def ranges(draw) -> TensorRange:  # noqa: ANN001
    a, b = draw(f32_floats), draw(f32_floats)
    return TensorRange(min(a, b), max(a, b))


@st.composite
def plans(draw) -> QuantPlan:  # noqa: ANN001
    nodes = draw(st.dictionaries(names, st.builds(
        NodeDecision,
        op_type=st.sampled_from(["Conv", "Gemm", "MatMul", "Add", "Relu", "Softmax"]),
        precision=st.sampled_from(list(Precision)),
        weight=st.none() | st.builds(WeightScheme, bits=st.sampled_from([4, 8]),
                                     granularity=st.sampled_from(list(Granularity)),
                                     block_size=st.none() | st.integers(1, 256)),
        reason=st.text(max_size=20)), max_size=6))
    rngs = draw(st.dictionaries(names, ranges(), max_size=8))
    groups = draw(st.lists(st.lists(st.sampled_from(sorted(rngs)), min_size=2, max_size=3), max_size=2)) if rngs else []
    bias = draw(st.dictionaries(st.sampled_from(sorted(nodes)) if nodes else names,
                                st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=4), max_size=2))
    return QuantPlan(
        model={"sha256": "ab" * 32, "inputs": [{"name": "x", "shape": [1, 3], "dtype": "float32"}], "outputs": ["y"],
               "opset": 17},
        calibration={"sha256": "cd" * 32, "num_samples": draw(st.integers(1, 10_000)), "observer": "minmax",
                     "observer_params": {}},
        recipe={"name": "int8", "rules": []}, nodes=nodes, ranges=rngs, shared_scales=groups,
        provenance={"deployer": "0.1.0"}, bias_correction=bias,
    )


@settings(max_examples=150, deadline=None)
@given(plans())
def test_valid_plans_round_trip_byte_identical(plan: QuantPlan) -> None:
    text = plan.to_json()
    again = QuantPlan.from_dict(json.loads(text))
    assert again == plan
    assert again.to_json() == text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


BASE = QuantPlan(
    model={"sha256": "ab" * 32, "inputs": [], "outputs": ["y"], "opset": 17},
    calibration={"sha256": "cd" * 32, "num_samples": 4, "observer": "minmax", "observer_params": {}},
    recipe={"name": "int8", "rules": []},
    nodes={"conv": NodeDecision("Conv", Precision.INT8, WeightScheme()), "fc": NodeDecision("Gemm", Precision.FP16)},
    ranges={"x": TensorRange(-1.0, 1.0), "y": TensorRange(0.0, 0.0)},
    shared_scales=[["x", "y"]], provenance={"deployer": "0.1.0"}, bias_correction={"conv": [0.5, -0.5]},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_plan_json_loads_or_raises_plan_error(data: st.DataObject) -> None:
    d = json.loads(BASE.to_json())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(d)))
        action = data.draw(st.sampled_from(["replace", "add", "delete"]))
        if not path:
            if action == "replace":
                d = data.draw(json_values)
            continue
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        if action == "replace":
            parent[path[-1]] = data.draw(json_values)
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.pop(path[-1])
    snapshot = copy.deepcopy(d)
    try:
        plan = QuantPlan.from_dict(d)
    except PlanError as e:
        assert str(e).startswith("plan:") and "\n" not in str(e), str(e)
        return
    for r in plan.ranges.values():  # whatever was accepted honours the range invariants
        assert math.isfinite(r.min) and math.isfinite(r.max) and r.min <= r.max
        assert abs(r.min) <= FLOAT32_MAX and abs(r.max) <= FLOAT32_MAX
    json.loads(plan.to_json())
    if d == snapshot:  # from_dict must not have edited its input
        return
    raise AssertionError("from_dict mutated its argument")


# -- quantize / dequantize for any input -------------------------------------------------------------

any_float = st.floats(allow_nan=False, allow_infinity=True, width=64)


@settings(max_examples=300, deadline=None)
@given(ranges(), st.lists(any_float, min_size=1, max_size=32))
def test_asymmetric_any_input_stays_in_int8(r: TensorRange, xs: list[float]) -> None:
    scale, zp = asymmetric_params(r.min, r.max)
    assert scale > 0 and math.isfinite(scale) and np.isfinite(np.float32(scale)) and np.float32(scale) > 0
    assert -128 <= zp <= 127
    q = quantize(np.array(xs, np.float64), scale, zp)
    assert q.dtype == np.int32 and q.min() >= -128 and q.max() <= 127
    back = dequantize(q, scale, zp)
    assert np.all(np.isfinite(back.astype(np.float64)) | (np.abs(back) == np.inf))


@settings(max_examples=300, deadline=None)
@given(ranges(), st.lists(any_float, min_size=1, max_size=32))
def test_symmetric_any_input_stays_in_int8(r: TensorRange, xs: list[float]) -> None:
    scale = symmetric_scale(r.min, r.max)
    assert scale >= MIN_SCALE and np.isfinite(np.float32(scale)) and np.float32(scale) > 0
    q = quantize(np.array(xs, np.float64), scale, 0, -127, 127)
    assert q.min() >= -127 and q.max() <= 127
    # in-range values come back within half a step
    amax = max(abs(r.min), abs(r.max))
    inside = np.array([x for x in xs if abs(x) <= amax], np.float64)
    if inside.size:
        err = np.abs(dequantize(quantize(inside, scale, 0, -127, 127), scale).astype(np.float64) - inside)
        assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-7 * np.abs(inside) + 1e-30)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e-30, allow_subnormal=True), st.floats(0, 1e-30, allow_subnormal=True))
def test_tiny_and_subnormal_ranges_get_a_positive_scale(a: float, b: float) -> None:
    lo, hi = -a, b
    assert symmetric_scale(lo, hi) == MIN_SCALE
    s, zp = asymmetric_params(lo, hi)
    assert s == MIN_SCALE and -128 <= zp <= 127


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6),
       st.sampled_from([0.0, 1e-45, 1e-20, 1.0, 1e20, 3e38]), st.integers(0, 2**32 - 1))
def test_per_channel_scales_any_magnitude(channels: int, k: int, magnitude: float, seed: int) -> None:
    w = (np.random.default_rng(seed).uniform(-1, 1, (channels, k)) * magnitude).astype(np.float32)
    s = per_channel_scales(w, 0)
    assert np.all(s > 0) and np.all(np.isfinite(s)) and s.dtype == np.float32
    q = quantize(w, s, 0, -127, 127, axis=0)
    assert q.min() >= -127 and q.max() <= 127


def test_regression_schema_version_not_a_string() -> None:
    """Found by the mutation property: a list as schema_version raised TypeError (unhashable) in migrate."""
    d = json.loads(BASE.to_json())
    for bad in ([], {}, 1.0, True):
        d["schema_version"] = bad
        try:
            QuantPlan.from_dict(d)
        except PlanError as e:
            assert "schema_version" in str(e)
        else:
            raise AssertionError(f"schema_version {bad!r} accepted")


def test_regression_smoothing_not_an_object() -> None:
    """Found by the mutation property: ``"smoothing": null`` raised AttributeError in QuantPlan.__post_init__."""
    d = json.loads(BASE.to_json())
    for bad in (None, [], 3):
        d["smoothing"] = bad
        try:
            QuantPlan.from_dict(d)
        except PlanError as e:
            assert "smoothing" in str(e)
        else:
            raise AssertionError(f"smoothing {bad!r} accepted")


# -- issue 22: for any output folder state, deploy leaves it as it was or replaces only what it wrote --------

import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

OUTPUT_STATES = ("absent", "empty", "ours", "ours+foreign", "ours+nested_foreign", "foreign", "a_file",
                 "read_only_ours", "symlink_to_ours")


@pytest.fixture(scope="module")
def deploy_inputs() -> object:
    """A tiny model, its calibration folder and one deploy output of it (copied into each example)."""
    import onnx

    from deployer.cli import main
    from test_cli_bad_input import tiny_model, write_calib

    with tempfile.TemporaryDirectory(prefix="deployer-prop-") as d:
        root = Path(d)
        onnx.save(tiny_model(), str(root / "m.onnx"))
        calib = write_calib(root / "calib", n=6)
        ours = root / "ours"
        assert main(_argv(root / "m.onnx", calib, ours, False)) == 0
        yield root / "m.onnx", calib, ours


def _argv(model: Path, calib: Path, out: Path, overwrite: bool) -> list[str]:
    return ["--model", str(model), "--calib", str(calib), "--out", str(out), "--target", "tensorrt", "--quiet",
            "--no-cache", "--no-bias-correction", *(["--overwrite"] if overwrite else [])]


def _snapshot(path: Path) -> dict[str, tuple[str, bytes | str, int]] | None:
    if not path.exists() and not path.is_symlink():
        return None
    entries = [path] if path.is_symlink() or not path.is_dir() else [path, *sorted(path.rglob("*"))]
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for p in entries:
        st = p.lstat()
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
        body: bytes | str = os.readlink(p) if kind == "link" else p.read_bytes() if kind == "file" else b""
        out[str(p.relative_to(path))] = (kind, body, st.st_mode)
    return out


def _make_state(state: str, out: Path, ours: Path, foreign_name: str) -> None:
    if state == "absent":
        return
    if state == "empty":
        out.mkdir()
    elif state == "a_file":
        out.write_text("my file")
    elif state == "foreign":
        out.mkdir()
        (out / foreign_name).write_text("mine")
        (out / "plan.json").write_text("{}")  # looks like an output, but deploy did not write it
    elif state == "symlink_to_ours":
        shutil.copytree(ours, out.with_name("target"))
        out.symlink_to(out.with_name("target"))
    else:
        shutil.copytree(ours, out)
        if state == "ours+foreign":
            (out / foreign_name).write_text("mine")
        elif state == "ours+nested_foreign":
            (out / "tensorrt" / foreign_name).write_text("mine")
        elif state == "read_only_ours":
            for p in [out, *out.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)


def _every_state(f):  # noqa: ANN001, ANN202 - each state once with --overwrite, besides the random draws
    for state in OUTPUT_STATES:
        f = example(state=state, overwrite=True, foreign_name="thesis.docx")(f)
    return f


@_every_state
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(state=st.sampled_from(OUTPUT_STATES), overwrite=st.booleans(),
       foreign_name=st.sampled_from(["thesis.docx", "notes.txt", ".hidden", "report.json.bak", "z"]))
def test_deploy_leaves_an_output_as_it_was_or_replaces_only_what_it_wrote(deploy_inputs: object, state: str,
                                                                         overwrite: bool, foreign_name: str) -> None:
    from deployer.cli import main
    from deployer.output_dir import MANIFEST

    model, calib, ours = deploy_inputs  # type: ignore[misc]
    with tempfile.TemporaryDirectory(prefix="deployer-state-") as d:
        out = Path(d) / "out"
        _make_state(state, out, ours, foreign_name)
        before = _snapshot(out)
        old_manifest = (json.loads((out / MANIFEST).read_text()) if state != "a_file" and (out / MANIFEST).is_file()
                        else None)
        try:
            rc = main(_argv(model, calib, out, overwrite))
            after = _snapshot(out)
        finally:
            for p in [Path(d), *Path(d).rglob("*")]:
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
        assert rc in (0, 2), rc
        assert sorted(x.name for x in Path(d).iterdir() if x.name.startswith(".out.tmp")) == []
        if rc == 2:
            assert after == before, f"{state}: a refused deploy changed the output"
            return
        # replaced: what was there before was empty or exactly what deploy had written
        assert state in ("absent", "empty", "ours") and (state == "absent" or overwrite), state
        if old_manifest is not None:
            old = set(before or {}) - {".", MANIFEST}
            assert old <= set(old_manifest["files"]) | set(old_manifest["dirs"])
        new = json.loads((out / MANIFEST).read_text())
        assert set(after or {}) - {".", MANIFEST} == set(new["files"]) | set(new["dirs"])
