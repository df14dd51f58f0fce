"""Migrations of older ``plan.json`` versions to the current :data:`deployer.plan.SCHEMA_VERSION`.

Each published plan schema lives in ``deployer/schemas/plan-<version>.schema.json``; the current one is
also ``plan.schema.json``. A migration is a pure function ``dict -> dict`` from one version to the next;
:func:`migrate` chains them, so a plan of any listed version loads as the current version. Versions not
listed here (and not current) are rejected by :class:`deployer.plan.QuantPlan` with the regenerate hint.

Versions:

- ``0.9``: the pre-1.0 draft layout: ``ranges`` as ``[min, max]`` pairs, ``shared_scales`` and
  ``bias_correction`` absent. 0.9 -> 1.0 rewrites each pair as ``{"min", "max"}`` and adds the empty
  lists/objects. Nothing else changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployer.errors import PlanError


def _0_9_to_1_0(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    ranges = {}
    for name, r in dict(data.get("ranges", {})).items():
        if isinstance(r, (list, tuple)):
            if len(r) != 2:
                raise PlanError(f"plan 0.9: range of {name!r} must be a [min, max] pair, got {r!r}")
            ranges[name] = {"min": r[0], "max": r[1]}
        else:
            ranges[name] = r
    out["ranges"] = ranges
    out.setdefault("shared_scales", [])
    out.setdefault("bias_correction", {})
    out.setdefault("smoothing", {})
    out["schema_version"] = "1.0"
    return out


MIGRATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "0.9": ("1.0", _0_9_to_1_0),
}
"""Version -> (next version, migration function)."""


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Upgrade a plan dict through every migration from its ``schema_version`` (no-op when current)."""
    seen = set()
    while (v := data.get("schema_version")) in MIGRATIONS and v not in seen:
        seen.add(v)
        _, step = MIGRATIONS[v]
        data = step(data)
    return data
