"""Pruning and sparsity (the seed's third compression stage): structured channel pruning with Torch-Pruning,
2:4 semi-structured sparsity for TensorRT, recovery fine-tuning by distillation from the unpruned model.

- :mod:`deployer.prune.options`: options, rules files, checks (no torch).
- :mod:`deployer.prune.structured`: channel pruning (dependency graph through residuals, concats, depthwise).
- :mod:`deployer.prune.semi`: 2:4 masks on torch weights, kept during fine-tuning.
- :mod:`deployer.prune.pattern`: the 2:4 pattern in ONNX weights (float or INT8 Q/DQ) and its checker (no torch).
- :mod:`deployer.prune.measure`: params, MACs, size, latency of each stage.
- :mod:`deployer.prune.run`: ``deploy prune`` and ``deploy --prune / --sparsity``.

Importing this package does not import torch; the names below load :mod:`deployer.prune.run` on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deployer.prune import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["PruneResult", "run_prune", "deploy_with_prune", "prune_source"]
