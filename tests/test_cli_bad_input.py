"""The ``deploy`` CLI on bad input: exit code 2, one ``deploy: error: ...`` line, no output left behind.

Runs the real CLI in-process (``deployer.cli.main``) and once through the installed console script.
The model is a tiny classifier built here with ``onnx.helper`` (1x3x8x8 -> Conv -> Relu ->
GlobalAveragePool -> Flatten -> Gemm -> 1x5); calibration samples are ``.npy`` files. Also covers one
successful TensorRT + Ascend run (no TensorFlow needed) and the ``deploy plan`` / ``--plan`` round trip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployer.cli import main

INPUT = "x"
SHAPE = (1, 3, 8, 8)
N_SAMPLES = 10


# -- fixtures -------------------------------------------------------------------------------------


def tiny_model() -> onnx.ModelProto:
    """1x3x8x8 float32 -> Conv(4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> 1x5."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "conv_w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "conv_b")
    gw = numpy_helper.from_array(rng.normal(0, 0.5, (5, 4)).astype(np.float32), "fc_w")
    gb = numpy_helper.from_array(rng.normal(0, 0.1, (5,)).astype(np.float32), "fc_b")
    nodes = [
        helper.make_node("Conv", [INPUT, "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[w, b, gw, gb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(p))
    return p


def write_calib(folder: Path, n: int = N_SAMPLES, shape: tuple[int, ...] = SHAPE, dtype: type = np.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        np.save(folder / f"{i:03d}.npy", rng.uniform(-1, 1, shape).astype(dtype))
    return folder


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    return write_calib(tmp_path / "calib")


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings that an aborted run could leave beside ``out``."""
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def assert_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path, *needles: str) -> str:
    """Run the CLI; expect exit 2, one single-line error naming the problem, and no output."""
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed and out.is_dir() else None
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("deploy: error: ")]
    assert len(errors) == 1, f"expected one error line, got:\n{err}"
    assert lines[-1] == errors[0], f"the error must be the last line, on one line:\n{err}"
    msg = errors[0]
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    if existed:
        assert out.exists() and (before is None or sorted(p.name for p in out.iterdir()) == before), \
            "an existing output was modified"
    else:
        assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], f"temporary output left behind: {leftovers(out)}"
    return msg


def deploy_args(model: Path | str, calib: Path | str | None, out: Path, *extra: str) -> list[str]:
    argv = ["--model", str(model), "--out", str(out), "--target", "tensorrt,ascend", "--quiet"]
    if calib is not None:
        argv += ["--calib", str(calib)]
    return argv + list(extra)


# -- the model argument ----------------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path, calib_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nope.onnx"
    assert_bad_input(deploy_args(missing, calib_dir, out), capsys, out, str(missing), "does not exist")


def test_model_is_a_directory(tmp_path: Path, calib_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path that cannot be read as a file (root reads chmod-000 files, so use a directory)."""
    out = tmp_path / "out"
    d = tmp_path / "model.onnx"
    d.mkdir()
    assert_bad_input(deploy_args(d, calib_dir, out), capsys, out, str(d), "not a file")


def test_unreadable_model_file(tmp_path: Path, model_path: Path, calib_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    model_path.chmod(0)
    try:
        if os.access(model_path, os.R_OK):
            pytest.skip("this user can read a chmod-000 file (root); covered by test_model_is_a_directory")
        assert_bad_input(deploy_args(model_path, calib_dir, out), capsys, out, str(model_path), "cannot be read")
    finally:
        model_path.chmod(0o644)


def test_model_not_onnx(tmp_path: Path, calib_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_bad_input(deploy_args(p, calib_dir, out), capsys, out, str(p), "not a valid ONNX")


def test_model_truncated(tmp_path: Path, model_path: Path, calib_dir: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    raw = model_path.read_bytes()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(raw[: len(raw) // 2])
    msg = assert_bad_input(deploy_args(p, calib_dir, out), capsys, out, str(p))
    assert any(k in msg for k in ("not a valid ONNX", "fails the ONNX checker")), msg


def test_model_fails_checker(tmp_path: Path, calib_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    m = tiny_model()
    m.graph.node[1].input[0] = "no_such_tensor"
    p = tmp_path / "broken.onnx"
    p.write_bytes(m.SerializeToString())
    assert_bad_input(deploy_args(p, calib_dir, out), capsys, out, str(p), "ONNX checker")


def test_unknown_model_name(tmp_path: Path, calib_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args("no-such-example", calib_dir, out), capsys, out, "no-such-example",
                     "built-in example")


# -- the calibration argument ----------------------------------------------------------------------


def test_calibration_missing_for_user_model(tmp_path: Path, model_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, None, out), capsys, out, "--calib")


def test_calibration_folder_missing(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, tmp_path / "nowhere", out), capsys, out, "nowhere", "does not exist")


def test_calibration_folder_empty(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_bad_input(deploy_args(model_path, empty, out), capsys, out, str(empty), "no .npy/.npz samples")


def test_calibration_wrong_name(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    d = tmp_path / "calib_npz"
    d.mkdir()
    for i in range(3):
        np.savez(d / f"{i}.npz", wrong=np.zeros(SHAPE, np.float32))
    assert_bad_input(deploy_args(model_path, d, out), capsys, out, "input names", "'wrong'", f"'{INPUT}'")


def test_calibration_wrong_shape(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    d = write_calib(tmp_path / "calib_shape", n=3, shape=(1, 3, 4, 4))
    assert_bad_input(deploy_args(model_path, d, out), capsys, out, f"'{INPUT}'", "shape", "[1, 3, 4, 4]",
                     "[1, 3, 8, 8]")


def test_calibration_wrong_dtype(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    d = write_calib(tmp_path / "calib_dtype", n=3, dtype=np.float64)
    assert_bad_input(deploy_args(model_path, d, out), capsys, out, f"'{INPUT}'", "float64", "float32")


def test_calibration_not_numpy(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    d = tmp_path / "calib_junk"
    d.mkdir()
    (d / "0.npy").write_bytes(b"this is not a numpy file")
    assert_bad_input(deploy_args(model_path, d, out), capsys, out, "0.npy")


def test_calibration_nan(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    d = write_calib(tmp_path / "calib_nan", n=3)
    a = np.load(d / "001.npy")
    a[0, 0, 0, 0] = np.nan
    np.save(d / "001.npy", a)
    assert_bad_input(deploy_args(model_path, d, out), capsys, out, "NaN")


# -- options and the output directory --------------------------------------------------------------


def test_unknown_target(tmp_path: Path, model_path: Path, calib_dir: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["--model", str(model_path), "--calib", str(calib_dir), "--out", str(out), "--target", "tensorrt,foo"]
    assert_bad_input(argv, capsys, out, "unknown target 'foo'", "deploy targets")


def test_unknown_observer(tmp_path: Path, model_path: Path, calib_dir: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--observer", "median"), capsys, out,
                     "unknown observer 'median'", "minmax")


def test_unknown_recipe(tmp_path: Path, model_path: Path, calib_dir: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--recipe", "int3"), capsys, out,
                     "unknown recipe 'int3'")


def test_unknown_soc_version(tmp_path: Path, model_path: Path, calib_dir: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--soc-version", "Ascend999"), capsys, out,
                     "Ascend999")


def test_existing_output_without_overwrite(tmp_path: Path, model_path: Path, calib_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(deploy_args(model_path, calib_dir, out), capsys, out, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_console_script_bad_input(tmp_path: Path, calib_dir: Path) -> None:
    """The installed ``deploy`` script maps a bad model to exit 2 and one error line."""
    script = Path(sys.executable).with_name("deploy")
    assert script.exists(), f"console script {script} is not installed (pip install -e .)"
    out = tmp_path / "out"
    missing = tmp_path / "nope.onnx"
    proc = subprocess.run([str(script), *deploy_args(missing, calib_dir, out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("deploy: error: model ") and "does not exist" in lines[-1], proc.stderr
    assert sum(ln.startswith("deploy: error: ") for ln in lines) == 1
    assert proc.stdout == ""
    assert not out.exists() and leftovers(out) == []


# -- success paths ---------------------------------------------------------------------------------


def test_tensorrt_ascend_run_report(tmp_path: Path, model_path: Path, calib_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["--model", str(model_path), "--calib", str(calib_dir), "--out", str(out),
               "--target", "tensorrt,ascend"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "deploy: error" not in captured.err
    assert "tensorrt" in captured.out and "ascend" in captured.out
    assert leftovers(out) == []
    assert (out / "plan.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert set(report["targets"]) == {"tensorrt", "ascend"}
    for name, t in report["targets"].items():
        for key in ("target", "artifact", "size_bytes", "fidelity", "verified_by", "notes"):
            assert key in t, f"targets.{name} lacks {key}"
        assert t["target"] == name
        assert (out / t["artifact"]).is_file()
        assert t["size_bytes"]["fp32"] > 0 and t["size_bytes"]["artifact"] > 0
        fid = t["fidelity"]
        assert 0.0 <= fid["top1_agreement"] <= 1.0
        assert set(fid["outputs"]) == {"y"}
        assert "ONNX Runtime" in t["verified_by"]
        assert isinstance(t["notes"], list)
    trt_notes = " ".join(report["targets"]["tensorrt"]["notes"])
    if importlib.util.find_spec("tensorrt") is None:
        assert "not built" in trt_notes and "build_engine.sh" in trt_notes, trt_notes
    assert (out / "tensorrt" / "build_engine.sh").is_file()
    asc_notes = " ".join(report["targets"]["ascend"]["notes"])
    if shutil.which("atc") is None:
        assert "not run" in asc_notes and "atc.sh" in asc_notes, asc_notes
    assert (out / "ascend" / "atc.sh").is_file()
    # 10 samples: 8 calibrate, 2 are held out for verification
    assert report["calibration"]["num_samples"] == 8
    assert report["data"]["heldout_samples"] == 2


def test_plan_round_trip(tmp_path: Path, model_path: Path, calib_dir: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(model_path), "--calib", str(calib_dir), "--out", str(plan), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    written = json.loads(plan.read_text())
    assert written["nodes"]["conv"]["precision"] == "int8"
    assert leftovers(plan) == []

    # an existing plan file is not overwritten
    assert_bad_input(["plan", "--model", str(model_path), "--calib", str(calib_dir), "--out", str(plan)], capsys,
                     plan, "--overwrite")
    assert json.loads(plan.read_text()) == written

    out = tmp_path / "out"
    rc = main(["--model", str(model_path), "--calib", str(calib_dir), "--plan", str(plan), "--out", str(out),
               "--target", "tensorrt", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert json.loads((out / "plan.json").read_text()) == written, "the lowered plan must be the given one"
    report = json.loads((out / "report.json").read_text())
    assert set(report["targets"]) == {"tensorrt"}
    assert not (out / "statistics.json").exists(), "--plan must not recalibrate"


def test_hand_edited_plan_unknown_node(tmp_path: Path, model_path: Path, calib_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model_path), "--calib", str(calib_dir), "--out", str(plan), "--quiet"]) == 0
    capsys.readouterr()
    data = json.loads(plan.read_text())
    data["nodes"]["conv_that_is_not_there"] = {"op_type": "Conv", "precision": "int8"}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--plan", str(edited)), capsys, out,
                     "conv_that_is_not_there", "not in the model")


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(extra_key=1), "unknown key"),
    (lambda d: d.update(schema_version="9.9"), "schema_version"),
    (lambda d: d["ranges"].update(y={"min": 1.0, "max": -1.0}), "min"),
    (lambda d: d["nodes"]["conv"].update(precision="int2"), "int2"),
])
def test_hand_edited_plan_invalid(tmp_path: Path, model_path: Path, calib_dir: Path,
                                  capsys: pytest.CaptureFixture[str], edit, needle: str) -> None:
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model_path), "--calib", str(calib_dir), "--out", str(plan), "--quiet"]) == 0
    capsys.readouterr()
    data = json.loads(plan.read_text())
    edit(data)
    plan.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--plan", str(plan)), capsys, out, "plan", needle)


def test_plan_not_json(tmp_path: Path, model_path: Path, calib_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{not json")
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--plan", str(plan)), capsys, out, "not valid JSON")


# -- known library bugs (strict xfail: they start failing once fixed; then drop the marker) ----------


def test_calibration_not_numpy_message(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    d = tmp_path / "calib_junk"
    d.mkdir()
    (d / "0.npy").write_bytes(b"this is not a numpy file")
    msg = assert_bad_input(deploy_args(model_path, d, out), capsys, out, "0.npy")
    assert "pickled" not in msg, msg


@pytest.mark.parametrize("n", ["0", "-1"])
def test_calib_samples_not_positive(tmp_path: Path, model_path: Path, calib_dir: Path,
                                    capsys: pytest.CaptureFixture[str], n: str) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--calib-samples", n), capsys, out, "--calib-samples")


def test_ema_momentum_out_of_range(tmp_path: Path, model_path: Path, calib_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--observer", "ema", "--ema-momentum", "2.0"), capsys,
                     out, "momentum")


def test_quiet_prints_nothing_even_from_native_libraries(tmp_path: Path, model_path: Path, calib_dir: Path) -> None:
    """``--quiet``: no TensorFlow / LiteRT (XNNPACK) / ONNX Runtime lines and no Python warnings reach the
    terminal on success (they are written from C++ to file descriptor 2); an error still does."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "deployer.cli", "--model", str(model_path), "--calib", str(calib_dir),
            "--target", "tflite", "--quiet"]
    ok = subprocess.run([*base, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr == "", (ok.stdout, ok.stderr[-500:])
    bad = subprocess.run([*base, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "exists" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("argv", [["--quiet", "--adaround", "abc"], ["--tflite-mode", "foo"],
                                  ["plan", "--quiet", "--observer"]])
def test_usage_errors_are_one_line_even_under_quiet(argv, capsys) -> None:  # type: ignore[no-untyped-def]
    from deployer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deploy: error: deploy") and "--help" in err[0], err
