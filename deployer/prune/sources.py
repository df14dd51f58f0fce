"""The models and data ``deploy prune`` / ``deploy --prune`` work on.

:func:`deployer.distill.data.load_source` gives ``example:mnist``, ``example:minilm`` and ``pkg.mod:factory``
with ``--data DIR``; this adds the default example ``efficientnet-lite0`` (real ImageNet weights, no labels):

- training crops: ``n_train`` random crops of the *calibration* photos (seed ``seed + 3``: a stream other than
  the calibration crops' and the search's), the unpruned model's logits their only target (KD, no labels);
- calibration crops: the example's own (:func:`deployer.examples.efficientnet.calibration_set`, crop ``k`` of
  the seeded stream), so the deploy after pruning calibrates as ``deploy --model efficientnet-lite0`` does;
- held-out crops: the example's held-out crops of the held-out photos (seed ``seed + 1``), never trained on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from deployer.distill.data import Source, example_name, load_source
from deployer.errors import BadInputError

EFFNET = "efficientnet-lite0"
EFFNET_TRAIN = 384
EFFNET_CALIB, EFFNET_HELDOUT = 128, 300
EXAMPLES = ("mnist", "minilm", EFFNET)


def prune_example(spec: str | None) -> str | None:
    """``example:NAME`` / ``NAME`` / None (the default example) -> a prunable example name, or None."""
    from deployer.examples import DEFAULT_EXAMPLE

    name = DEFAULT_EXAMPLE if spec is None else (spec.split(":", 1)[1] if spec.startswith("example:") else spec)
    return name if name in EXAMPLES else None


def load_prune_source(model: str, data: str | None, seed: int, n_calib: int | None, n_heldout: int | None,
                      log: Callable[[str], None] = lambda s: None, n_train: int | None = None) -> Source:
    """Resolve ``--model`` and ``--data`` (see the module docstring and :func:`load_source`).

    Raises:
        BadInputError: as :func:`load_source`; ``--data`` with the efficientnet example.
    """
    if prune_example(model) == EFFNET and (model.startswith("example:") or model == EFFNET):
        if data is not None and example_name(data) != EFFNET and data != f"example:{EFFNET}":
            raise BadInputError(f"--model {model} prunes on its own photos; omit --data")
        return effnet_source(seed, n_calib, n_heldout, n_train, log)
    return load_source(model, data, seed, n_calib, n_heldout, log)


def effnet_source(seed: int, n_calib: int | None = None, n_heldout: int | None = None, n_train: int | None = None,
                  log: Callable[[str], None] = lambda s: None) -> Source:
    """EfficientNet-Lite0 with photo crops (module docstring). Needs the example's packages."""
    from deployer.examples import efficientnet as en
    from deployer.examples.photos import CALIBRATION_PHOTOS, HELDOUT_PHOTOS, load_photos, random_crops

    n_cal = EFFNET_CALIB if n_calib is None else n_calib
    n_held = EFFNET_HELDOUT if n_heldout is None else n_heldout
    n_tr = EFFNET_TRAIN if n_train is None else n_train
    if min(n_cal, n_held, n_tr) < 1:
        raise BadInputError("efficientnet-lite0: calibration, held-out and training crop counts must be positive")
    teacher = en.load_module()
    assert isinstance(teacher, torch.nn.Module)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    photos = load_photos()
    log(f"teacher: efficientnet-lite0; {n_tr} training, {n_cal} calibration, {n_held} held-out crops")
    train = random_crops([photos[n] for n in CALIBRATION_PHOTOS], n_tr, 224, np.random.default_rng(seed + 3))
    held = random_crops([photos[n] for n in HELDOUT_PHOTOS], n_held, 224, np.random.default_rng(seed + 1))
    cal = en.calibration_set(n_cal, seed, photos)
    to = lambda crops: torch.from_numpy(np.concatenate([en.preprocess(c) for c in crops]))  # noqa: E731
    return Source(
        name=f"example:{EFFNET}", kind="classification", teacher=teacher, input_names=[en.INPUT_NAME],
        output_names=["logits"], train={en.INPUT_NAME: to(train)}, train_labels=None,
        heldout={en.INPUT_NAME: to(held)}, heldout_labels=None,
        calibration=[dict(cal[i]) for i in range(n_cal)],
        split=(f"efficientnet-lite0 photo crops: {n_tr} training crops of the calibration photos (seed {seed + 3}), "
               f"{n_cal} calibration crops (the example's, seed {seed}), {n_held} held-out crops of "
               f"{list(HELDOUT_PHOTOS)} (seed {seed + 1}); no labels: the unpruned model's logits are the target"),
    )
