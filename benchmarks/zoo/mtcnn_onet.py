"""MTCNN O-Net (face classification, bounding-box regression, 5 landmarks): PReLU conv net, 48x48 input.

Weights: ``facenet_pytorch/data/onet.pt`` shipped in the ``facenet-pytorch`` package (real published
weights), loaded into the O-Net layout written here (conv 3x3 x3 + conv 2x2, PReLU after each, max
pools with ceil mode, a 1152 -> 256 dense layer, three heads; input ``(x - 127.5) / 128``, RGB).
Inputs: face crops with jitter (the cameraman of ``skimage.data.camera`` for calibration, the astronaut
for held-out) and random crops of other photos (calibration vs held-out photos disjoint).
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

CAMERA_FACE = (115, 190, 195, 270)  # (y0, x0, y1, x1) of the face in skimage.data.camera()
ASTRONAUT_FACE = (75, 175, 185, 285)  # in skimage.data.astronaut()


def make_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
            x = nn.functional.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
            x = nn.functional.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
            x = nn.functional.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)
            x = self.prelu5(self.dense5(x))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)

    net = ONet()
    net.load_state_dict(__import__("torch").load(common.site_file("facenet_pytorch/data/onet.pt"),
                                                 map_location="cpu", weights_only=True))
    return net.eval()


def _face_crops(img: np.ndarray, box: tuple[int, int, int, int], n: int, seed: int) -> list[np.ndarray]:
    from PIL import Image

    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    rng = np.random.default_rng(seed)
    y0, x0, y1, x1 = box
    s = max(y1 - y0, x1 - x0)
    out = []
    for _ in range(n):
        side = int(s * rng.uniform(0.85, 1.25))
        cy, cx = (y0 + y1) / 2 + rng.normal(0, 0.08) * s, (x0 + x1) / 2 + rng.normal(0, 0.08) * s
        a, b = int(np.clip(cy - side / 2, 0, img.shape[0] - side)), int(np.clip(cx - side / 2, 0, img.shape[1] - side))
        out.append(np.asarray(Image.fromarray(img[a:a + side, b:b + side, :3]).resize((48, 48), Image.BILINEAR)))
    return out


def _prep(im: np.ndarray) -> common.Sample:
    return {"input": ((im.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None].copy()}


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Face decision agreement (face probability > 0.7, MTCNN's O-Net threshold), box-regression and
    landmark cosine and box-regression SQNR."""
    return {"face_decision_agreement": common.decision_agreement([[r[2][:, 1]] for r in ref],
                                                                 [[o[2][:, 1]] for o in out], 0, 0.7),
            "bbox_reg_cosine": common.cosine(ref, out, 0), "bbox_reg_sqnr_db": common.sqnr_db(ref, out, 0),
            "landmark_cosine": common.cosine(ref, out, 1)}


def build(cache_dir: str) -> common.ZooModel:
    import skimage.data

    d = common.entry_dir(cache_dir, "mtcnn_onet", __file__)
    path = d / "model.onnx"
    if not path.exists():
        common.export_torch(make_net(), {"input": np.zeros((1, 3, 48, 48), np.float32)}, path,
                            ["bbox_reg", "landmarks", "face_prob"])
    cal_photos, held_photos = data.photo_sets()
    cal = _face_crops(skimage.data.camera(), CAMERA_FACE, 12, 1) + data.crops(cal_photos[1:], 20, 48, 1)
    held = _face_crops(skimage.data.astronaut(), ASTRONAUT_FACE, 12, 2) + data.crops(held_photos, 20, 48, 2)
    return common.ZooModel(
        "mtcnn_onet", "face detection refinement (PReLU CNN; class, box regression, landmarks)", path,
        [_prep(c) for c in cal], [_prep(c) for c in held],
        {"bbox_reg": "regression", "landmarks": "regression", "face_prob": "class_scores"}, task_metric,
        {"face_decision_agreement": (">=", 0.95), "bbox_reg_cosine": (">=", 0.99)},
        "facenet-pytorch package weights (onet.pt), real published weights",
        "face crops (skimage camera for calibration, astronaut for held-out) + random crops of disjoint photos")
