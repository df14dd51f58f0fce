"""Distillation before quantization (the seed's first stage): a teacher's knowledge moved into a small
student, which is fine-tuned with fake quantization and handed to ``deploy``.

- :mod:`deployer.distill.losses`: logit KD (Hinton et al. 2015, learnable T in [3, 10]), hidden-state cosine
  matching with learned projections (FitNets, DistilBERT, TinyBERT), attention-map L2 matching (TinyBERT,
  MiniLM), self-distillation (Be Your Own Teacher, Born-Again Networks).
- :mod:`deployer.distill.students`: ``module:function`` factories and shrink rules.
- :mod:`deployer.distill.qat`: fake quantization from a :class:`deployer.plan.QuantPlan` (Jacob et al. 2018).
- :mod:`deployer.distill.train`: the seeded, resumable loop; :mod:`deployer.distill.run`: ``deploy distill``.

Importing this package does not import torch (``deploy`` parses ``--distill`` flags without it); the
names below load :mod:`deployer.distill.run` on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deployer.distill import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["DistillOptions", "DistillResult", "run_distill", "deploy_with_distill"]
