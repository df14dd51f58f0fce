"""Checker findings: what a backend's graph checker reports about an ONNX model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One broken rule.

    Attributes:
        rule: short identifier of the rule (e.g. ``zero-point-nonzero``).
        node: the node (or tensor) it concerns.
        message: what is wrong.
        fix: what to do about it.
        severity: ``error`` (the vendor tool will refuse it) or ``warning`` (slow or lossy).
        source: where the rule comes from (vendor document).
    """

    rule: str
    node: str
    message: str
    fix: str
    severity: str = "error"
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.node}: {self.message} (fix: {self.fix})"
