"""The bad-input matrix (issue 10): each case is one test with its expected one-line error and exit code.

Extends ``tests/test_cli_bad_input.py`` (whose cases are not repeated here: missing/unreadable/random
/truncated model, checker failure, missing/empty calibration folder, wrong calibration name/shape/
float64 dtype, NaN, unknown target/observer/recipe/SoC, existing output without ``--overwrite``,
plan with unknown key / schema version / min > max / unknown precision / unknown node, plan not JSON).

Here: corrupt ONNX through ``plan`` and ``check``; external data escaping the model's folder (relative,
absolute, symlink) or missing; corrupt initializer payloads; models ONNX accepts but ONNX Runtime
cannot load or run; no inputs; dynamic dims without shapes; pickled ``.npz``/``.npy``; Inf; zero
samples; plans with explicit scales, zero ranges, foreign tensors, wrong op types, bad bias
corrections; output paths that are files, under files, unwritable, or directories; ``--overwrite``
replacing atomically; SIGTERM/SIGINT leaving nothing behind; PyTorch checkpoints loaded only with
``weights_only=True``; the ``atc`` runner's contract with a stand-in executable.

Every CLI case asserts: the exit code, exactly one ``deploy: error:`` line (the last line), the words
that name the problem, no traceback, no output created or modified, no ``.NAME.tmp-*`` left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployer.cli import main
from deployer.errors import BadInputError, ExternalToolError
from test_cli_bad_input import INPUT, SHAPE, assert_bad_input, leftovers, tiny_model, write_calib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(p))
    return p


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    return write_calib(tmp_path / "calib", n=6)


def plan_args(model: Path | str, calib: Path | str, out: Path, *extra: str) -> list[str]:
    return ["plan", "--model", str(model), "--calib", str(calib), "--out", str(out), "--quiet", "--no-cache", *extra]


def deploy_args(model: Path | str, calib: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--calib", str(calib), "--out", str(out), "--target", "tensorrt", "--quiet",
            "--no-cache", *extra]


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


# -- corrupt ONNX ----------------------------------------------------------------------------------


def test_model_bit_flipped(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    raw = bytearray(model_path.read_bytes())
    for i in range(8, len(raw), 97):
        raw[i] ^= 0x5A
    p = tmp_path / "flipped.onnx"
    p.write_bytes(bytes(raw))
    out = tmp_path / "plan.json"
    msg = assert_bad_input(plan_args(p, calib_dir, out), capsys, out, str(p))
    assert any(k in msg for k in ("not a valid ONNX", "ONNX checker", "corrupt", "ONNX Runtime")), msg


def test_check_truncated_model(tmp_path: Path, model_path: Path, capsys) -> None:
    raw = model_path.read_bytes()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(raw[: len(raw) // 3])
    assert_bad_input(["check", "--target", "tensorrt", str(p)], capsys, tmp_path / "none", str(p))


def test_corrupt_initializer_payload(tmp_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before (ValueError from numpy_helper in the TensorRT checker): raw_data longer than its
    dims need (onnx.checker only catches a payload that is too short)."""
    m = tiny_model()
    m.graph.initializer[2].raw_data = m.graph.initializer[2].raw_data + b"\0" * 8
    p = save(m, tmp_path / "corrupt_init.onnx")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "initializer 'fc_w'", "corrupt")
    assert_bad_input(["check", "--target", "tensorrt", str(p)], capsys, tmp_path / "none", "fc_w", "corrupt")


def test_model_name_not_utf8(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before (UnicodeDecodeError in canonicalize): protobuf hands a non-UTF-8 proto2 string back as bytes."""
    raw = model_path.read_bytes()
    i = raw.index(b"\x1a\x04relu")  # NodeProto.name (field 3, length 4) = "relu"
    p = tmp_path / "latin1.onnx"
    p.write_bytes(raw[:i + 2] + b"r\xe1lu" + raw[i + 6:])
    for argv, out in ((plan_args(p, calib_dir, tmp_path / "plan.json"), tmp_path / "plan.json"),
                      (["check", "--target", "tensorrt", str(p)], tmp_path / "none")):
        assert_bad_input(argv, capsys, out, "not valid UTF-8")


def test_model_onnx_runtime_cannot_load(tmp_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before (onnxruntime InvalidGraph escaped from calibration): int8 weight into a float Gemm."""
    m = tiny_model()
    w = m.graph.initializer[2]
    w.CopyFrom(numpy_helper.from_array(np.ones((5, 4), np.int8), "fc_w"))
    p = save(m, tmp_path / "typed_wrong.onnx")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "ONNX Runtime cannot load")


def test_model_fails_at_run_time(tmp_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before (onnxruntime Fail escaped from calibration): a Gemm bias that does not broadcast."""
    m = tiny_model()
    m.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.zeros((3,), np.float32), "fc_b"))
    p = save(m, tmp_path / "bad_bias.onnx")
    out = tmp_path / "plan.json"
    msg = assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "ONNX Runtime")
    assert "Traceback" not in msg


def test_model_attribute_out_of_range(tmp_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before: Conv pads of the wrong length pass onnx.checker, ONNX Runtime refuses them."""
    m = tiny_model()
    conv = m.graph.node[0]
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1]))
    p = save(m, tmp_path / "pads.onnx")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "ONNX Runtime", "pads")


# -- external data -----------------------------------------------------------------------------------


def external_model(folder: Path, location: str) -> Path:
    """The tiny model with its weights in external data, then every location rewritten."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "m.onnx"
    onnx.save(tiny_model(), str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    out = folder / "rewritten.onnx"
    out.write_bytes(m.SerializeToString())
    return out


def test_external_data_relative_traversal(tmp_path: Path, calib_dir: Path, capsys) -> None:
    secret = tmp_path / "outside.data"
    secret.write_bytes(b"\0" * 4096)
    p = external_model(tmp_path / "model", "../outside.data")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "'../outside.data'", "path traversal")
    assert_bad_input(["check", "--target", "tensorrt", str(p)], capsys, tmp_path / "none", "path traversal")


def test_external_data_absolute_path(tmp_path: Path, calib_dir: Path, capsys) -> None:
    p = external_model(tmp_path / "model", "/etc/passwd")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "/etc/passwd", "outside the model's folder")


def test_external_data_symlink_escapes(tmp_path: Path, calib_dir: Path, capsys) -> None:
    secret = tmp_path / "outside.data"
    secret.write_bytes(b"\0" * 4096)
    p = external_model(tmp_path / "model", "link.data")
    (tmp_path / "model" / "link.data").symlink_to(secret)
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "'link.data'", "path traversal")


def test_external_data_missing(tmp_path: Path, calib_dir: Path, capsys) -> None:
    p = external_model(tmp_path / "model", "gone.data")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "'gone.data'", "missing")


# -- model shape ----------------------------------------------------------------------------------


def test_model_without_inputs(tmp_path: Path, calib_dir: Path, capsys) -> None:
    const = numpy_helper.from_array(np.ones((1, 5), np.float32))
    g = helper.make_graph([helper.make_node("Constant", [], ["y"], name="c", value=const)], "noin", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = save(m, tmp_path / "noin.onnx")
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(p, calib_dir, out), capsys, out, "no inputs")


# -- calibration data -----------------------------------------------------------------------------


def test_calibration_npz_with_pickled_objects(tmp_path: Path, model_path: Path, capsys) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    np.savez(d / "0.npz", x=np.array([{"payload": 1}], dtype=object))
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(model_path, d, out), capsys, out, "0.npz", "pickled", "never loads")


def test_calibration_npy_with_pickled_objects(tmp_path: Path, model_path: Path, capsys) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    np.save(d / "0.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(model_path, d, out), capsys, out, "0.npy", "pickled")


def test_calibration_inf(tmp_path: Path, model_path: Path, capsys) -> None:
    d = write_calib(tmp_path / "inf", n=3)
    a = np.load(d / "002.npy")
    a[0, 1, 2, 3] = -np.inf
    np.save(d / "002.npy", a)
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(model_path, d, out), capsys, out, "sample 2", f"'{INPUT}'", "Inf")


def test_calibration_zero_samples(tmp_path: Path, model_path: Path, capsys) -> None:
    d = tmp_path / "zero"
    d.mkdir()
    np.save(d / "stack.npy", np.zeros((0, *SHAPE), np.float32))  # a stack of no samples
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(model_path, d, out), capsys, out, str(d), "no .npy/.npz samples")


def test_calibration_integer_dtype(tmp_path: Path, model_path: Path, capsys) -> None:
    d = write_calib(tmp_path / "ints", n=3, dtype=np.int64)
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(model_path, d, out), capsys, out, "int64", "float32")


def test_calibration_wrong_rank(tmp_path: Path, model_path: Path, capsys) -> None:
    d = write_calib(tmp_path / "rank", n=3, shape=(3, 8, 8))
    out = tmp_path / "plan.json"
    assert_bad_input(plan_args(model_path, d, out), capsys, out, "shape", "[3, 8, 8]")


# -- hand-edited plans ----------------------------------------------------------------------------


@pytest.fixture
def plan_file(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> Path:
    p = tmp_path / "plan.json"
    assert main(plan_args(model_path, calib_dir, p)) == 0
    capsys.readouterr()
    return p


@pytest.mark.parametrize("edit, needles", [
    pytest.param(lambda d: d["ranges"]["y"].update(scale=-0.5), ("unknown key", "scale"), id="explicit-negative-scale"),
    pytest.param(lambda d: d["ranges"]["y"].update(scale=0.0), ("unknown key", "scale"), id="explicit-zero-scale"),
    pytest.param(lambda d: d["ranges"].update(ghost={"min": 0.0, "max": 1.0}), ("'ghost'", "not in the model"),
                 id="range-of-foreign-tensor"),
    pytest.param(lambda d: d["nodes"]["conv"].update(op_type="Gemm"), ("'conv'", "is Conv in the model"),
                 id="op-type-differs"),
    pytest.param(lambda d: d["bias_correction"].update(ghost=[0.0]), ("'ghost'", "not in the model"),
                 id="bias-correction-foreign-node"),
    pytest.param(lambda d: d["bias_correction"].update(conv=["x"]), ("bias_correction", "finite"),
                 id="bias-correction-not-numbers"),
    pytest.param(lambda d: d["ranges"].update(y={"min": 0.0, "max": 1e39}), ("float32",), id="range-beyond-float32"),
    pytest.param(lambda d: d.update(schema_version="0.1"), ("schema_version", "'0.1'"), id="old-schema-version"),
    pytest.param(lambda d: d["nodes"]["conv"].update(unknown=True), ("unknown key", "node"), id="unknown-node-key"),
    pytest.param(lambda d: d["ranges"].update(y={"min": "nan", "max": 1.0}), ("numbers",), id="range-as-string"),
])
def test_hand_edited_plan(tmp_path: Path, model_path: Path, calib_dir: Path, plan_file: Path, capsys,
                          edit, needles) -> None:
    data = json.loads(plan_file.read_text())
    edit(data)
    plan_file.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--plan", str(plan_file)), capsys, out, "plan", *needles)


def test_plan_top_level_list(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    p = tmp_path / "plan.json"
    p.write_text("[1, 2, 3]")
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--plan", str(p)), capsys, out, "top level")


def test_plan_file_missing(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--plan", str(tmp_path / "nope.json")), capsys, out,
                     "cannot read")


def test_plan_zero_range_is_clamped_not_zero(tmp_path: Path, model_path: Path, calib_dir: Path, plan_file: Path,
                                             capsys) -> None:
    """Decision: a range with min == max == 0 is valid (a dead tensor); its scale is clamped to MIN_SCALE,
    so every Q/DQ scale in the lowered graph stays positive and finite."""
    from deployer.quant import MIN_SCALE

    data = json.loads(plan_file.read_text())
    for r in data["ranges"].values():
        r.update(min=0.0, max=0.0)
    plan_file.write_text(json.dumps(data))
    out = tmp_path / "out"
    rc = main(deploy_args(model_path, calib_dir, out, "--plan", str(plan_file)))
    # every range 0: the artifact is valid but answers garbage, so the fidelity floor fails it (exit 1, report
    # written, a given plan is never escalated)
    assert rc == 1, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["tensorrt"]["verdict"]["ships"] is False
    assert "given plan is not escalated" in report["targets"]["tensorrt"]["verdict"]["reason"]
    m = onnx.load(str(out / report["targets"]["tensorrt"]["artifact"]))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    scales = [inits[n.input[1]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
              and n.input[1] in inits]
    assert scales, "no Q/DQ nodes lowered"
    for s in scales:
        assert np.all(np.isfinite(s)) and np.all(s >= np.float32(MIN_SCALE)), s


# -- the output path ------------------------------------------------------------------------------


def test_output_is_a_file_with_overwrite(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before: NotADirectoryError from shutil.rmtree on the existing file."""
    out = tmp_path / "out"
    out.write_text("mine")
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--overwrite"), capsys, out, str(out),
                     "not a directory")
    assert out.read_text() == "mine"


def test_output_under_a_file(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out), capsys, out, "cannot write")


def test_output_not_writable(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    out = Path("/proc/deployer-test-out")  # not writable even for root
    assert_bad_input(deploy_args(model_path, calib_dir, out), capsys, out, "cannot write", "writable --out")


def test_plan_output_under_a_file(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before: NotADirectoryError from writing the temporary plan file."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "plan.json"
    assert_bad_input(plan_args(model_path, calib_dir, out), capsys, out, "cannot write the plan")


def test_plan_output_not_writable(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before: FileNotFoundError from writing into /proc."""
    out = Path("/proc/deployer-plan.json")
    assert_bad_input(plan_args(model_path, calib_dir, out), capsys, out, "cannot write the plan")


def test_plan_output_is_a_directory(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    """Crashed before: IsADirectoryError from os.replace onto a directory (with --overwrite)."""
    out = tmp_path / "plans"
    out.mkdir()
    assert_bad_input(plan_args(model_path, calib_dir, out, "--overwrite"), capsys, out, "is a directory")


def test_overwrite_replaces_and_leaves_nothing(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    """A second ``--overwrite`` onto the tool's own output replaces it (files it wrote, listed in the
    manifest, and nothing else)."""
    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out)) == 0, capsys.readouterr().err
    (out / "plan.json").write_text("{}")  # stale content in a file the tool wrote
    assert main(deploy_args(model_path, calib_dir, out, "--overwrite")) == 0, capsys.readouterr().err
    assert json.loads((out / "plan.json").read_text())["nodes"] and (out / ".deployer-manifest.json").is_file()
    assert leftovers(out) == []


def test_interrupt_between_renames_restores_previous_output(tmp_path: Path, monkeypatch) -> None:
    """``--overwrite`` moves the old output aside, renames the new one in, then deletes the old: an
    interrupt between the two renames brings the old output back (nothing lost)."""
    import deployer.pipeline as pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    (out / "plan.json").write_text("{}")
    pipeline.write_manifest(out)  # an earlier deploy output
    real_replace = os.replace
    calls = []

    def replace(src, dst):  # noqa: ANN001, ANN202
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("signal 15")
        return real_replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with pipeline.atomic_output(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "keep.txt").read_text() == "previous" and not (out / "new.txt").exists()
    assert leftovers(out) == []


def test_error_inside_atomic_output_leaves_nothing(tmp_path: Path) -> None:
    from deployer.pipeline import atomic_output

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=False) as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not out.exists() and leftovers(out) == []


# -- interrupts (real signals to a real process) -----------------------------------------------------

SLOW_DEPLOY = textwrap.dedent("""
    import signal, sys, time
    # a job started in the background by a non-interactive shell inherits SIGINT ignored (POSIX), and
    # Python then installs no KeyboardInterrupt handler; restore the interactive default
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import backends.tensorrt.backend as b
    real = b.TensorRTBackend.lower
    def slow(self, ctx):
        art = real(self, ctx)
        (ctx.out_dir / "READY").write_text("lowered")  # the temporary directory now holds artifacts
        time.sleep(120)
        return art
    b.TensorRTBackend.lower = slow
    from deployer.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_leaves_no_partial_artifacts(tmp_path: Path, model_path: Path, calib_dir: Path, sig) -> None:
    """The real CLI in a subprocess, held inside lowering (artifacts already in the temporary
    directory); a signal then must leave no output directory and no temporary sibling."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DEPLOY, *deploy_args(model_path, calib_dir, out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any((t / "READY").exists() for t in leftovers(out)):
            assert proc.poll() is None, f"deploy ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the temporary output never appeared"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + int(sig), (proc.returncode, err[-500:])  # as a shell reports a signal
    assert "Traceback" not in err, err
    assert "interrupted" in err.strip().splitlines()[-1], err
    assert not out.exists(), "an interrupted run created the output directory"
    assert leftovers(out) == [], f"temporary output left behind: {leftovers(out)}"


# -- PyTorch checkpoints (weights_only=True) ---------------------------------------------------------

torch = pytest.importorskip("torch")


class _Evil:
    """Unpickling this would run a command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _linear() -> object:
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize("payload", ["object", "inside-state-dict"])
def test_torch_checkpoint_with_pickled_object_is_refused(tmp_path: Path, payload: str) -> None:
    from deployer.model_io import load_torch_checkpoint

    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.pt"
    evil = _Evil(marker)
    torch.save(evil if payload == "object" else {"weight": evil}, ckpt)
    with pytest.raises(BadInputError) as ei:
        load_torch_checkpoint(ckpt, _linear)
    msg = str(ei.value)
    assert "pickled objects" in msg and str(ckpt) in msg and "\n" not in msg, msg
    assert not marker.exists(), "code from the checkpoint ran"


def test_torch_checkpoint_corrupt(tmp_path: Path) -> None:
    from deployer.model_io import load_torch_checkpoint

    good = tmp_path / "good.pt"
    torch.save(_linear().state_dict(), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(BadInputError, match="not a readable PyTorch checkpoint"):
        load_torch_checkpoint(bad, _linear)
    with pytest.raises(BadInputError, match="does not exist"):
        load_torch_checkpoint(tmp_path / "missing.pt", _linear)


def test_torch_checkpoint_wrong_weights(tmp_path: Path) -> None:
    from deployer.model_io import load_torch_checkpoint

    ckpt = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(5, 5)}, ckpt)
    with pytest.raises(BadInputError, match="does not fit the module") as ei:
        load_torch_checkpoint(ckpt, _linear)
    assert "\n" not in str(ei.value)


def test_torch_checkpoint_state_dict_loads(tmp_path: Path) -> None:
    from deployer.model_io import load_torch_checkpoint

    src = _linear()
    ckpt = tmp_path / "ok.pt"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    m = load_torch_checkpoint(ckpt, _linear)
    assert torch.equal(m.weight, src.weight) and torch.equal(m.bias, src.bias)


# -- external commands: the atc runner's contract (stand-in executables) ----------------------------


def stand_in(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_contract_atc_failure_carries_output(tmp_path: Path) -> None:
    from backends.ascend.atc import run_atc

    exe = stand_in(tmp_path / "bin", "atc", 'echo "ATC start"; echo "E10001: bad soc_version" >&2; exit 3\n')
    with pytest.raises(ExternalToolError) as ei:
        run_atc([str(exe), "--model=m.onnx", "--output=model"], tmp_path)
    msg = str(ei.value)
    assert "exit 3" in msg and "E10001: bad soc_version" in msg and "\n" not in msg, msg


def test_contract_atc_timeout(tmp_path: Path) -> None:
    from backends.ascend.atc import run_atc

    exe = stand_in(tmp_path / "bin", "atc", "sleep 30\n")
    t0 = time.monotonic()
    with pytest.raises(ExternalToolError, match="did not finish within 1 s"):
        run_atc([str(exe), "--output=model"], tmp_path, timeout_s=1)
    assert time.monotonic() - t0 < 20


def test_contract_atc_not_startable(tmp_path: Path) -> None:
    from backends.ascend.atc import run_atc

    exe = tmp_path / "bin" / "atc"
    exe.parent.mkdir()
    exe.write_text("not executable")
    exe.chmod(0o644)
    with pytest.raises(ExternalToolError, match="could not be started"):
        run_atc([str(exe), "--output=model"], tmp_path)


def test_contract_atc_runs_without_a_shell(tmp_path: Path) -> None:
    """Arguments reach atc verbatim: shell syntax in a path is not interpreted."""
    from backends.ascend.atc import run_atc

    marker = tmp_path / "INJECTED"
    exe = stand_in(tmp_path / "bin", "atc", 'printf "%s\\n" "$@" > args.txt; touch model.om\n')
    argv = [str(exe), f"--model=m.onnx; touch {marker}", "--output=model"]
    assert run_atc(argv, tmp_path).name == "model.om"
    assert not marker.exists()
    assert (tmp_path / "args.txt").read_text().splitlines() == argv[1:]


def test_contract_deploy_with_failing_atc_on_path(tmp_path: Path, model_path: Path, calib_dir: Path, capsys,
                                                  monkeypatch) -> None:
    """Contract test (an ``atc`` stand-in, not CANN): the whole CLI with a failing ``atc`` on PATH exits 2,
    and atc's output is captured into the report (vendor_step, notes) and atc.log beside the graphs,
    which stay valid. It does not prove what real ATC accepts."""
    stand_in(tmp_path / "bin", "atc", 'echo "E19999: stand-in atc refuses" >&2; exit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    argv = ["--model", str(model_path), "--calib", str(calib_dir), "--out", str(out), "--target", "ascend", "--quiet",
            "--no-cache"]
    assert main(argv) == 2
    report = json.loads((out / "report.json").read_text())
    step = report["targets"]["ascend"]["vendor_step"]
    assert step["status"] == "failed" and "E19999: stand-in atc refuses" in step["error"]
    assert "E19999" in (out / "ascend" / "atc.log").read_text()
    assert any(n.startswith("atc: FAILED") for n in report["targets"]["ascend"]["notes"])
    assert (out / "ascend" / "model_deploy.onnx").is_file()


def test_contract_no_shell_and_timeouts_everywhere() -> None:
    """Every external command in the library runs without a shell, from an argument list, with a
    timeout: no ``shell=True``, ``os.system``, ``os.popen``, ``subprocess.call/check_output/Popen``;
    every ``subprocess.run`` passes ``timeout=``."""
    import ast

    offenders = []
    for src in sorted(p for d in ("deployer", "backends", "calibration") for p in (REPO / d).rglob("*.py")):
        tree = ast.parse(src.read_text(encoding="utf-8"), str(src))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            where = f"{src.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if "shell" in kw and not (isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False):
                offenders.append(f"{where} shell=")
            if name in ("os.system", "os.popen", "subprocess.call", "subprocess.check_call",
                        "subprocess.check_output", "subprocess.Popen", "subprocess.getoutput"):
                offenders.append(f"{where} {name}")
            if name == "subprocess.run":
                if "timeout" not in kw:
                    offenders.append(f"{where} subprocess.run without timeout")
                if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                    offenders.append(f"{where} subprocess.run with a string command")
    assert not offenders, offenders


def test_refused_output_never_recalibrates(tmp_path: Path, model_path: Path, calib_dir: Path, capsys,
                                          monkeypatch) -> None:
    """An existing output directory is refused before any calibration; the statistics cache lives
    outside the output directory (DEPLOYER_CACHE_DIR), so it survives the refusal."""
    import deployer.pipeline as pipeline

    assert main(["plan", "--model", str(model_path), "--calib", str(calib_dir), "--out", str(tmp_path / "p.json"),
                 "--quiet"]) == 0
    cache = Path(os.environ["DEPLOYER_CACHE_DIR"])
    cached = sorted(cache.rglob("*"))
    assert cached, "the plan run wrote no statistics cache"
    out = tmp_path / "out"
    out.mkdir()

    def no_calibration(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("calibration ran although the output directory is refused")

    monkeypatch.setattr(pipeline, "compute_statistics", no_calibration)
    monkeypatch.setattr(pipeline, "load_inputs", no_calibration)
    assert_bad_input(["--model", str(model_path), "--calib", str(calib_dir), "--out", str(out), "--target", "tensorrt"],
                     capsys, out, "exists", "--overwrite")
    assert sorted(cache.rglob("*")) == cached and not any(out.rglob("*"))


def test_existing_plan_file_refused_before_calibration(tmp_path: Path, model_path: Path, calib_dir: Path, capsys,
                                                       monkeypatch) -> None:
    """``deploy plan`` refuses an existing ``--out`` before calibrating (it used to calibrate first)."""
    import deployer.pipeline as pipeline

    out = tmp_path / "plan.json"
    out.write_text("{}")

    def no_calibration(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("calibration ran although the plan file is refused")

    monkeypatch.setattr(pipeline, "load_inputs", no_calibration)
    assert_bad_input(plan_args(model_path, calib_dir, out), capsys, out, "exists", "--overwrite")
    assert out.read_text() == "{}"


# -- found by a fresh-eyes user run (session 1) --------------------------------------------------------


def test_overwrite_refuses_a_folder_holding_the_inputs(tmp_path: Path, model_path: Path, calib_dir: Path,
                                                      capsys) -> None:
    """--out pointing at a folder that contains the model/calibration data must never replace it."""
    import shutil

    box = tmp_path / "box"
    box.mkdir()
    shutil.copy(model_path, box / "model.onnx")
    shutil.copytree(calib_dir, box / "calib")
    (box / "precious.txt").write_text("keep me")
    rc = main(["--model", str(box / "model.onnx"), "--calib", str(box / "calib"), "--out", str(box), "--overwrite",
               "--target", "tensorrt", "--quiet", "--no-cache"])
    assert rc == 2
    assert "contains the input" in capsys.readouterr().err
    assert (box / "precious.txt").read_text() == "keep me" and (box / "model.onnx").is_file()


def test_overwrite_refuses_a_foreign_folder(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc = main(["--model", str(model_path), "--calib", str(calib_dir), "--out", str(other), "--overwrite",
               "--target", "tensorrt", "--quiet", "--no-cache"])
    assert rc == 2 and "not a deploy output" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_out_cannot_be_the_current_directory(tmp_path: Path, model_path: Path, calib_dir: Path, capsys,
                                             monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for out in (".", ""):
        rc = main(["--model", str(model_path), "--calib", str(calib_dir), "--out", out, "--overwrite",
                   "--target", "tensorrt", "--quiet", "--no-cache"])
        assert rc == 2 and "current directory" in capsys.readouterr().err


def test_binary_file_as_plan_is_a_clean_error(tmp_path: Path, model_path: Path, capsys) -> None:
    rc = main(["inspect", str(model_path)])
    assert rc == 2 and "not a text (JSON) file" in capsys.readouterr().err


def test_verify_unloadable_artifact_is_a_clean_error(tmp_path: Path, model_path: Path, calib_dir: Path,
                                                    capsys) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x08\x01garbage" * 10)
    rc = main(["verify", str(bad), "--data", str(calib_dir), "--reference", str(model_path),
               "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be loaded for verification" in err and "Traceback" not in err


# -- issue 22: the second bad-input round ---------------------------------------------------------------


def snapshot(path: Path) -> dict[str, tuple[str, bytes | str, int]] | None:
    """Every entry under ``path`` (itself included) with its kind, content or link target, and mode bits."""
    if not path.exists() and not path.is_symlink():
        return None
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]:
        rel = str(p.relative_to(path))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p), st.st_mode)
        elif p.is_dir():
            out[rel] = ("dir", b"", st.st_mode)
        else:
            out[rel] = ("file", p.read_bytes(), st.st_mode)
    return out


def test_overwrite_never_deletes_a_users_file_beside_a_plan(tmp_path: Path, model_path: Path, calib_dir: Path,
                                                           capsys) -> None:
    """The issue's case: ``d/plan.json`` + ``d/thesis.docx`` and --overwrite deleted the thesis."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "plan.json").write_text("{}")
    (d / "thesis.docx").write_text("x")
    before = snapshot(d)
    msg = assert_bad_input(deploy_args(model_path, calib_dir, d, "--overwrite"), capsys, d, "--overwrite refuses",
                           "thesis.docx")
    assert "choose another --out" in msg
    assert snapshot(d) == before


@pytest.mark.parametrize("where", ["notes.txt", "tensorrt/notes.txt", "extra_folder/"])
def test_overwrite_refuses_our_output_with_a_foreign_entry(tmp_path: Path, model_path: Path, calib_dir: Path, capsys,
                                                           where: str) -> None:
    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out)) == 0
    p = out / where
    if where.endswith("/"):
        p.mkdir()
    else:
        p.write_text("mine")
    before = snapshot(out)
    assert_bad_input(deploy_args(model_path, calib_dir, out, "--overwrite"), capsys, out, "--overwrite refuses",
                     where.rstrip("/"))
    assert snapshot(out) == before


def test_manifest_lists_exactly_what_deploy_wrote(tmp_path: Path, model_path: Path, calib_dir: Path) -> None:
    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out, "--target", "tensorrt,ascend,onnxruntime")) == 0
    m = json.loads((out / ".deployer-manifest.json").read_text())
    from deployer import __version__

    assert m["tool"] == "deployer" and m["version"] == __version__
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != ".deployer-manifest.json")
    dirs = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir())
    assert m["files"] == files and m["dirs"] == dirs
    assert "model_fp32.onnx" in files  # what `deploy verify` needs, at the root of every output


def test_overwrite_refuses_a_read_only_output(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out)) == 0
    (out / "tensorrt").chmod(0o555)
    try:
        before = snapshot(out)
        assert_bad_input(deploy_args(model_path, calib_dir, out, "--overwrite"), capsys, out, "read-only", "chmod")
        assert snapshot(out) == before
    finally:
        (out / "tensorrt").chmod(0o755)


def test_out_symlink_is_refused(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    target = tmp_path / "real"
    assert main(deploy_args(model_path, calib_dir, target)) == 0
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(target)
    assert_bad_input(deploy_args(model_path, calib_dir, link, "--overwrite"), capsys, link, "not a directory")
    assert snapshot(target) == before and link.is_symlink()


def test_plan_overwrite_replaces_only_a_plan(tmp_path: Path, model_path: Path, calib_dir: Path, capsys) -> None:
    doc = tmp_path / "notes.json"
    doc.write_text('{"mine": 1}')
    assert_bad_input(plan_args(model_path, calib_dir, doc, "--overwrite"), capsys, doc, "not a plan written by deploy")
    assert doc.read_text() == '{"mine": 1}'
    plan = tmp_path / "plan.json"
    assert main(plan_args(model_path, calib_dir, plan)) == 0
    assert main(plan_args(model_path, calib_dir, plan, "--overwrite")) == 0  # a plan: replaced


def test_verify_out_is_checked_before_any_work_and_replaceable(tmp_path: Path, model_path: Path, calib_dir: Path,
                                                               capsys) -> None:
    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out)) == 0
    art = out / "tensorrt" / "model_strongly_typed.onnx"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.txt").write_text("a")
    assert_bad_input(["verify", str(art), "--data", str(calib_dir), "--out", str(foreign), "--overwrite"], capsys,
                     foreign, "--overwrite refuses")
    v = tmp_path / "v"
    assert main(["verify", str(art), "--data", str(calib_dir), "--out", str(v), "--quiet"]) == 0
    assert main(["verify", str(art), "--data", str(calib_dir), "--out", str(v), "--quiet", "--overwrite"]) == 0
    assert (v / ".deployer-manifest.json").is_file()


def test_verify_finds_the_reference_at_the_output_root(tmp_path: Path, model_path: Path, calib_dir: Path) -> None:
    """A TFLite-only output has no ``<target>/model_fp32.onnx``: verify uses the root's (every deploy
    output keeps it). Checked with the locator, which is what failed (it asked for model_fp32.onnx)."""
    from deployer.reverify import find_reference

    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out)) == 0
    (out / "tensorrt" / "model_fp32.onnx").unlink()
    assert find_reference(out / "tflite" / "model_int8.tflite") == out / "model_fp32.onnx"
    assert main(["verify", str(out / "tensorrt" / "model_strongly_typed.onnx"), "--data", str(calib_dir),
                 "--out", str(tmp_path / "v"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "v" / "report.json").read_text())
    assert rep["model"]["source"] == str(out / "model_fp32.onnx")


# symlinks in and as the calibration folder


def test_calib_symlink_to_itself(tmp_path: Path, model_path: Path, capsys) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, loop, out), capsys, out, str(loop), "symlink loop")


@pytest.mark.parametrize("kind", ["loop", "outside", "dangling"])
def test_calib_file_symlinks_are_named_not_skipped(tmp_path: Path, model_path: Path, calib_dir: Path, capsys,
                                                  kind: str) -> None:
    """Looping links were skipped with exit 0 and no word: now exit 2 naming the file and the fix."""
    bad = calib_dir / "zzz.npy"
    if kind == "loop":
        (calib_dir / "yyy.npy").symlink_to("zzz.npy")
        bad.symlink_to("yyy.npy")
        needle = "symlink loop"
    elif kind == "outside":
        elsewhere = tmp_path / "elsewhere.npy"
        np.save(elsewhere, np.zeros(SHAPE, np.float32))
        bad.symlink_to(elsewhere)
        needle = "outside the calibration folder"
    else:
        bad.symlink_to(tmp_path / "gone.npy")
        needle = "dangling"
    out = tmp_path / "out"
    assert_bad_input(deploy_args(model_path, calib_dir, out), capsys, out, "yyy.npy" if kind == "loop" else str(bad),
                     needle)


def test_calib_symlink_inside_the_folder_is_a_sample(tmp_path: Path, model_path: Path, calib_dir: Path) -> None:
    (calib_dir / "zzz.npy").symlink_to("000.npy")
    out = tmp_path / "out"
    assert main(deploy_args(model_path, calib_dir, out)) == 0
    assert json.loads((out / "plan.json").read_text())["calibration"]["num_samples"] == 6  # 7 samples: 6 + 1 held out


# late refusals: every argument and path check before any model work


@pytest.mark.parametrize("extra, needle", [
    (("--fidelity-target", "1.5"), "--fidelity-target 1.5"),
    (("--fidelity-target", "0"), "--fidelity-target 0"),
    (("--search-budget", "0"), "--search-budget"),
    (("--smoothquant", "2"), "--smoothquant 2"),
    (("--observer", "nope"), "unknown observer"),
    (("--ema-momentum", "1.5"), "--ema-momentum"),
    (("--calib-samples", "0"), "--calib-samples"),
])
def test_option_values_refused_before_the_model_is_read(tmp_path: Path, calib_dir: Path, capsys, extra, needle
                                                        ) -> None:
    """A model file that cannot even be parsed: any model work would fail on it first, so the option error
    proves the check came before; and no statistics cache was created."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 10)
    cache = Path(os.environ["DEPLOYER_CACHE_DIR"])
    cached = sorted(cache.rglob("*"))
    out = tmp_path / "out"
    assert_bad_input(["--model", str(junk), "--calib", str(calib_dir), "--out", str(out), "--target", "tensorrt",
                      "--quiet", *extra], capsys, out, needle)
    assert_bad_input(plan_args(junk, calib_dir, tmp_path / "p.json", *extra), capsys, tmp_path / "p.json", needle)
    assert sorted(cache.rglob("*")) == cached


@pytest.mark.parametrize("out", ["/proc/deployer-test-out", "FILE/out"])
def test_unwritable_out_refused_before_the_model_is_read(tmp_path: Path, calib_dir: Path, capsys, out: str) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 10)
    (tmp_path / "FILE").write_text("x")
    o = Path(out) if out.startswith("/") else tmp_path / out
    assert_bad_input(deploy_args(junk, calib_dir, o), capsys, o, "cannot write", "writable --out")
    assert_bad_input(plan_args(junk, calib_dir, o), capsys, o, "cannot write the plan")


def test_calib_loop_refused_before_the_model_is_read(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 10)
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    out = tmp_path / "out"
    assert_bad_input(deploy_args(junk, loop, out), capsys, out, "symlink loop")


# internal errors: exit 4, one line saying where to report it; the traceback with --verbose


@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_exits_4_in_one_line(tmp_path: Path, model_path: Path, calib_dir: Path, capsys, monkeypatch,
                                           verbose: bool) -> None:
    """A bug (here: an exception that is not a DeployerError, raised inside the lowering) is not a gate
    failure (1): exit 4, one line naming the error and where to report it."""
    import backends.tensorrt.backend as trt

    def broken(self, ctx):  # noqa: ANN001, ANN202
        raise ZeroDivisionError("simulated bug in lowering")

    monkeypatch.setattr(trt.TensorRTBackend, "lower", broken)
    out = tmp_path / "out"
    rc = main(deploy_args(model_path, calib_dir, out, *(["--verbose"] if verbose else [])))
    err = capsys.readouterr().err
    assert rc == 4, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("deploy: internal error: ZeroDivisionError: simulated bug in lowering; please report it")
    assert "Reporting a bug" in last
    assert ("Traceback" in err) == verbose
    if not verbose:
        assert len(err.strip().splitlines()) == 1 and "--verbose" in last
    assert not out.exists() and leftovers(out) == []


# signals during calibration

SLOW_CALIBRATION = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import deployer.pipeline as p
    real = p.compute_statistics
    def slow(inputs, options, progress=None):
        open(sys.argv[1], "w").write("calibrating")
        time.sleep(120)
        return real(inputs, options)
    p.compute_statistics = slow
    from deployer.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_calibration(tmp_path: Path, model_path: Path, calib_dir: Path, sig) -> None:
    """SIGTERM during calibration used to kill the process silently: now one line and 128 + signal."""
    out = tmp_path / "out"
    ready = tmp_path / "READY"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CALIBRATION, str(ready), *deploy_args(model_path, calib_dir, out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, f"deploy ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "calibration never started"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert proc.returncode == 128 + int(sig), (proc.returncode, err[-500:])
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"deploy: interrupted by {name}; nothing was written (no partial output " \
                                           f"is left behind)"
    assert not out.exists() and leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["READY", "tiny.onnx", "calib"])


@pytest.mark.parametrize("extra, needle", [
    (("--target", "ascend", "--soc-version", "Bogus"), "--soc-version 'Bogus'"),
    (("--target", "onnxruntime", "--ort-mode", "fast"), "--ort-mode"),
    (("--target", "tflite", "--tflite-io", "int4"), "--tflite-io"),
    (("--target", "tensorrt", "--trt-hardware-compatibility", "any"), "--trt-hardware-compatibility"),
])
def test_backend_option_values_refused_before_the_model_is_read(tmp_path: Path, calib_dir: Path, capsys, extra,
                                                                needle) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 10)
    out = tmp_path / "out"
    assert_bad_input(["--model", str(junk), "--calib", str(calib_dir), "--out", str(out), "--quiet", *extra], capsys,
                     out, needle)


def test_folder_added_after_the_rename_is_recorded(tmp_path: Path) -> None:
    """``deploy --distill`` moves ``distill/`` (an output with its own manifest) into the finished deploy
    output; recorded, a later --overwrite may replace it, while anything else added stays foreign."""
    from deployer.output_dir import add_to_manifest, atomic_output, check_output_dir, foreign_entries

    out = tmp_path / "out"
    with atomic_output(out, overwrite=False) as tmp:
        (tmp / "plan.json").write_text("{}")
    with atomic_output(tmp_path / "work" / "distill", overwrite=False) as tmp:
        (tmp / "student.onnx").write_bytes(b"x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "log.txt").write_text("log")
    (tmp_path / "work" / "distill").rename(out / "distill")
    assert foreign_entries(out)[1] == ["distill", "distill/.deployer-manifest.json", "distill/student.onnx",
                                       "distill/sub", "distill/sub/log.txt"]
    add_to_manifest(out, ["distill"])
    assert foreign_entries(out) == (True, [])
    check_output_dir(out, overwrite=True)
    (out / "distill" / "mine.txt").write_text("mine")
    assert foreign_entries(out)[1] == ["distill/mine.txt"]
    with pytest.raises(BadInputError, match="distill/mine.txt"):
        check_output_dir(out, overwrite=True)


def test_file_dropped_in_during_the_run_is_never_deleted(tmp_path: Path) -> None:
    """The output is checked again just before the rename: a file a user put there meanwhile survives."""
    from deployer.output_dir import atomic_output

    out = tmp_path / "out"
    with atomic_output(out, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("ours")
    with pytest.raises(BadInputError, match="late.txt"):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            (out / "late.txt").write_text("user")
    assert (out / "late.txt").read_text() == "user" and (out / "a.txt").read_text() == "ours"
    assert leftovers(out) == []
