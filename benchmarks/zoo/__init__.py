"""The model zoo: real architectures from different domains, each built offline (see ``common.py``).

``ZOO`` maps a name to its module; ``build(name, cache_dir)`` returns the :class:`common.ZooModel`.
"""

from __future__ import annotations

import importlib

from benchmarks.zoo.common import DEFAULT_CACHE, ZooModel

ZOO: dict[str, str] = {
    "silero_vad": "benchmarks.zoo.silero_vad",
    "magika": "benchmarks.zoo.magika_bytes",
    "ppocr_det": "benchmarks.zoo.ppocr_det",
    "ppocr_rec": "benchmarks.zoo.ppocr_rec",
    "ppocr_cls": "benchmarks.zoo.ppocr_cls",
    "crepe_tiny": "benchmarks.zoo.crepe_tiny",
    "resemblyzer": "benchmarks.zoo.resemblyzer_lstm",
    "mtcnn_onet": "benchmarks.zoo.mtcnn_onet",
    "efficientnet_lite0": "benchmarks.zoo.efficientnet_lite0",
    "minilm": "benchmarks.zoo.minilm",
    "yolo_digits": "benchmarks.zoo.yolo_digits",
    "unet_denoise": "benchmarks.zoo.unet_denoise",
    "conv1d_words": "benchmarks.zoo.conv1d_words",
    "mnist_cnn": "benchmarks.zoo.mnist_cnn",
}


def build(name: str, cache_dir: str | None = None) -> ZooModel:
    """Build zoo entry ``name`` (its ONNX cached under ``cache_dir``, default ``~/.cache/deployer-zoo``).

    Raises:
        KeyError: unknown name (the message lists the zoo).
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; the zoo holds {', '.join(ZOO)}")
    return importlib.import_module(ZOO[name]).build(str(cache_dir or DEFAULT_CACHE))  # type: ignore[no-any-return]
