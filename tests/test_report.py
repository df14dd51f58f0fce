"""report.json ``layers`` and report.html: content, self-containment, and rendering in headless Chromium.

A tiny ONNX model (Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm) is
deployed once per module to tensorrt and ascend (no TensorFlow needed). The real default example
(EfficientNet-Lite0) gets one small tensorrt deploy, marked ``real_model``, whose report.html is rendered
in Debian's ``chromium`` (started by the test, skipped where it is not installed) and checked for console
errors; the screenshot is kept in the test's temporary directory.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import deployer
from deployer.cli import main

SHAPE = (1, 3, 8, 8)


def residual_model() -> onnx.ModelProto:
    """1x3x8x8 -> Conv(4) -> Relu -> Conv(4) -> Add(skip = Relu output) -> GAP -> Flatten -> Gemm -> 1x5."""
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...], s: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[init("w1", (4, 3, 3, 3), 0.5), init("b1", (4,), 0.1), init("w2", (4, 4, 3, 3), 0.3),
                     init("b2", (4,), 0.1), init("fw", (5, 4), 0.5), init("fb", (5,), 0.1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_inputs(root: Path, n: int = 15) -> tuple[Path, Path]:
    """``root/model.onnx`` and ``root/calib/*.npy`` (n samples)."""
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(residual_model(), str(root / "model.onnx"))
    calib = root / "calib"
    calib.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        np.save(calib / f"{i:03d}.npy", rng.normal(0, 1, SHAPE).astype(np.float32))
    return root / "model.onnx", calib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("report")
    model, calib = write_inputs(root)
    out = root / "out"
    r = deployer.deploy(str(model), str(calib), targets="tensorrt,ascend", out_dir=out, no_cache=True)
    return out, r.report


def test_layers_in_report(tiny: tuple[Path, dict]) -> None:
    out, report = tiny
    on_disk = json.loads((out / "report.json").read_text())
    layers = on_disk["layers"]
    assert layers["samples"] >= 1 and "ONNX Runtime" in layers["method"]
    rows = layers["layers"]
    assert {r["node"] for r in rows} >= {"conv1", "conv2", "add", "fc"}
    finite = [r["sqnr_db"] for r in rows if r["sqnr_db"] is not None]
    assert finite == sorted(finite), "layers must be worst (lowest SQNR) first"
    for r in rows:
        assert r["precision"] == "int8" and 0 <= r["rel_error"] < 0.5
        assert r["sqnr_db"] is None or r["sqnr_db"] > 10  # int8 of a tiny conv net: tens of dB


def test_html_is_self_contained_with_plots(tiny: tuple[Path, dict]) -> None:
    out, report = tiny
    text = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "no network resources"
    assert "<script" not in text
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', text)
    alts = [a for _, a in imgs]
    assert "per-layer SQNR in graph order" in alts and "fidelity per target" in alts
    assert any(a.startswith("histogram of ") for a in alts)
    for b64, _ in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    for needle in ("Summary per target", "Per-layer error", "Precision decision per layer", "Provenance",
                   "tensorrt/model_strongly_typed.onnx", "conv2", report["model"]["sha256"]):
        assert needle in text, needle
    from deployer.report_html import format_gates

    for t in report["targets"].values():  # the gates column shows the report's gates, or "not evaluated"
        assert html.escape(format_gates(t.get("gates"))) in text


def test_gates_column_shows_report_gates(tmp_path: Path, tiny: tuple[Path, dict]) -> None:
    from deployer.report_html import render

    out, report = tiny
    shutil.copy(out / "plan.json", tmp_path / "plan.json")
    rep = json.loads(json.dumps(report))
    rep["targets"]["tensorrt"]["gates"] = [{"name": "top1>=0.99", "passed": False, "enforced": True}]
    html = render(rep, tmp_path)
    assert "top1&gt;=0.99: FAIL" in html and 'class="bad"' in html
    from deployer.report_html import format_gates

    named = {"speed-per-fidelity": {"status": "fail", "enforced": False, "fidelity_loss_points": 4.3},
             "size-vs-recall": {"status": "not evaluated", "reason": "no labels", "enforced": False}}
    assert format_gates(named) == "speed-per-fidelity: fail (not enforced); size-vs-recall: not evaluated (no labels)"


# -- headless Chromium ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                    "(scripts/install.sh installs it as root)")


def render_in_chromium(html: Path, shot: Path, profile: Path) -> list[str]:
    """Open ``html`` in headless Chromium, save a screenshot, return the console messages it logged."""
    argv = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
            "--window-size=1400,2600", f"--screenshot={shot}", html.resolve().as_uri()]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000, "screenshot missing or blank"
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_console_check_catches_errors(tmp_path: Path) -> None:
    """Control: the console check sees a page's errors (so an empty list below means something)."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>" + "x " * 2000 + "</p><script>console.error('boom');nope();</script></body></html>")
    msgs = render_in_chromium(bad, tmp_path / "bad.png", tmp_path / "profile")
    assert any("boom" in m for m in msgs) and any("Uncaught" in m for m in msgs), msgs


def test_report_answers_ship_or_not_first(tiny: tuple[Path, dict]) -> None:
    """Verdict banners before anything else, gate results as a table, parity of every pair, units."""
    out, report = tiny
    text = (out / "report.html").read_text()
    first = text.index('<div class="verdict')
    assert first < text.index("Summary per target") and first < text.index("<img")
    for name, t in report["targets"].items():
        word = "ships" if t["verdict"]["ships"] else "does not ship"
        assert f"{name}: {word}</b>" in text and html.escape(t["verdict"]["reason"]) in text
    assert '<table class="gates">' in text and "fidelity-floor" in text and "not evaluated" in text
    assert "not applicable" not in text
    pairs = {(p["a"], p["b"]) for p in report["parity"]["pairs"]}
    assert pairs == {("fp32", "tensorrt"), ("fp32", "ascend"), ("tensorrt", "ascend")}
    for p in report["parity"]["pairs"]:
        assert 0.9 < p["cosine"] <= 1.0 and (p["sqnr_db"] is None or p["sqnr_db"] > 10)
        assert f"{p['cosine']:.5f}" in text
    assert report["parity"]["samples"] == report["targets"]["tensorrt"]["fidelity"]["samples"]
    assert " dB" in text and " MB" in text


def test_layer_view_graph_order_own_sensitivity_no_shape_ops(tiny: tuple[Path, dict]) -> None:
    from deployer.report_views import SHAPE_OPS, layer_rows

    _, report = tiny
    le = report["layers"]
    rows = layer_rows(le["layers"])
    assert [r["node"] for r in rows] == [n for n in ("conv1", "relu1", "conv2", "add", "gap", "fc")
                                          if n in {r["node"] for r in rows}]  # graph order
    assert not any(r["op_type"] in SHAPE_OPS for r in rows)
    assert any(r["op_type"] == "Flatten" for r in le["layers"]) or "flatten" not in {r["node"] for r in le["layers"]}
    sens = le["sensitivity"]
    assert set(sens) >= {"conv1", "conv2", "fc"}  # each MAC layer alone quantized
    assert all(v is None or v > 10 for v in sens.values())


@needs_chromium
def test_tiny_report_renders_in_chromium(tmp_path: Path, tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    msgs = render_in_chromium(out / "report.html", tmp_path / "tiny.png", tmp_path / "profile")
    assert msgs == []


@pytest.mark.real_model
@needs_chromium
def test_default_example_report_renders_in_chromium(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default example's report.html (small held-out set, tensorrt only, to keep CI short)."""
    root = tmp_path_factory.mktemp("default-report")
    out = root / "out"
    code = main(["--target", "tensorrt", "--calib-samples", "32", "--heldout-samples", "16", "--out", str(out),
                 "--quiet", "--no-cache"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["source"] == "example:efficientnet-lite0"
    assert len(report["layers"]["layers"]) > 50
    text = (out / "report.html").read_text()
    assert text.count("data:image/png;base64,") >= 2 + 6  # fidelity + per-layer + 6 histograms
    shot = root / "default-report.png"
    msgs = render_in_chromium(out / "report.html", shot, root / "profile")
    assert msgs == []
