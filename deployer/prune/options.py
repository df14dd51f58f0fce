"""Options of the pruning stage, checked before any model work (this module imports no torch).

- ``ratio``: the fraction of output channels removed from each prunable layer, in (0, 1).
- ``rules``: a YAML/JSON file of ordered rules ``{match: <fnmatch pattern on module names>, ratio: r}`` (first
  match wins; ``ratio: 0`` leaves the layer's own channel group unpruned, while a layer tied to a pruned group,
  e.g. a depthwise convolution, follows it), plus an optional ``default`` ratio for layers no rule
  matches (else 0: unmatched layers are kept). A plain mapping ``{pattern: ratio}`` is read as the same
  ordered rules.
- ``criterion``: the channel importance (Torch-Pruning's importance classes):
  ``l1`` / ``l2`` (filter-weight magnitude, Li et al. 2017), ``bn-scale`` (|gamma| of the BatchNorm after the
  layer, Liu et al. 2017 "Network Slimming"), ``taylor`` (first-order Taylor |w * dL/dw|, Molchanov et al. 2019).
- ``sparsity``: ``"2:4"`` (NVIDIA semi-structured sparsity, see :mod:`deployer.prune.pattern`) or None.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from deployer.errors import BadInputError

CRITERIA = ("l1", "l2", "bn-scale", "taylor")
SPARSITY = ("2:4",)


@dataclass(frozen=True)
class Rule:
    """One rule of a rules file: modules whose dotted name matches ``match`` (fnmatch) lose ``ratio``."""

    match: str
    ratio: float


@dataclass
class PruneOptions:
    """What to prune and how to recover (names match the ``deploy prune`` flags).

    Attributes:
        ratio: global channel ratio in (0, 1); None with ``rules`` or with ``sparsity`` alone.
        rules: per-layer rules (from ``--rules FILE`` or ``--prune FILE``); ``default`` their fallback ratio.
        criterion: one of :data:`CRITERIA`.
        sparsity: ``"2:4"`` or None.
        round_to: keep pruned channel counts a multiple of this (None: any count; 8 or 16 suit tensor cores).
        epochs / lr / batch_size / alpha / temperature / max_seconds / threads: the recovery fine-tuning
            (distillation from the unpruned model; defaults per task as ``deploy distill``).
        seed / calib_samples / heldout_samples: data split (as ``deploy distill``).
        overwrite: replace an existing output.
        source: where ratio/rules came from, for the report.
    """

    ratio: float | None = None
    rules: list[Rule] = field(default_factory=list)
    default: float = 0.0
    criterion: str = "l1"
    sparsity: str | None = None
    round_to: int | None = None
    epochs: int = 3
    lr: float | None = None
    batch_size: int | None = None
    alpha: float = 0.5
    temperature: float = 4.0
    max_seconds: float | None = None
    threads: int | None = None
    seed: int = 0
    calib_samples: int | None = None
    heldout_samples: int | None = None
    overwrite: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises BadInputError naming the bad option and the fix."""
        if self.ratio is not None:
            check_ratio(self.ratio, "--ratio")
        if self.criterion not in CRITERIA:
            raise BadInputError(f"--criterion {self.criterion!r}: use one of {', '.join(CRITERIA)}")
        if self.sparsity is not None and self.sparsity not in SPARSITY:
            raise BadInputError(f"--sparsity {self.sparsity!r}: the supported pattern is 2:4 (NVIDIA Ampere and later)")
        if self.ratio is None and not self.rules and self.sparsity is None:
            raise BadInputError("nothing to prune: give --ratio R (0 < R < 1), --rules FILE or --sparsity 2:4")
        if self.ratio is not None and self.rules:
            raise BadInputError("give either --ratio or --rules (a rules file sets its own 'default' ratio)")
        if self.round_to is not None and self.round_to < 1:
            raise BadInputError(f"--round-to {self.round_to}: give a positive channel multiple (e.g. 8)")
        if self.epochs < 0:
            raise BadInputError(f"--epochs {self.epochs}: give 0 (no recovery fine-tuning) or more")
        if not 0.0 <= self.alpha <= 1.0:
            raise BadInputError(f"--alpha {self.alpha}: the distillation weight must be in [0, 1]")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise BadInputError(f"--temperature {self.temperature}: give a number > 0")
        for name, v in (("--lr", self.lr), ("--max-seconds", self.max_seconds)):
            if v is not None and not v > 0:
                raise BadInputError(f"{name} {v}: give a positive number")
        for name, n in (("--batch-size", self.batch_size), ("--threads", self.threads)):
            if n is not None and n < 1:
                raise BadInputError(f"{name} {n}: give at least 1")

    @property
    def structured(self) -> bool:
        """True when channels are removed (a ratio or rules), not only 2:4 sparsity."""
        return self.ratio is not None or bool(self.rules)

    def describe(self) -> dict[str, object]:
        return {"criterion": self.criterion if self.structured else None, "ratio": self.ratio,
                "rules": [{"match": r.match, "ratio": r.ratio} for r in self.rules] or None,
                "default": self.default if self.rules else None, "sparsity": self.sparsity, "round_to": self.round_to,
                "source": self.source or None}


def check_ratio(value: object, flag: str) -> float:
    """A float in (0, 1); BadInputError otherwise."""
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BadInputError(f"{flag} {value!r}: give a fraction of channels to remove, 0 < ratio < 1 (e.g. 0.3)") from None
    if not 0.0 < r < 1.0:
        raise BadInputError(f"{flag} {value}: the pruning ratio must lie strictly between 0 and 1 (e.g. 0.3)")
    return r


def load_rules(path: str | Path) -> tuple[list[Rule], float]:
    """Read a rules file (YAML or JSON). Returns (ordered rules, default ratio).

    Accepted forms: ``{"rules": [{"match": "layer1.*", "ratio": 0.5}, ...], "default": 0.3}`` or a plain
    mapping ``{"layer1.*": 0.5, "fc": 0}``. Ratios lie in [0, 1).

    Raises:
        BadInputError: missing/unreadable file, unknown keys, a ratio outside [0, 1).
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"rules file {p}: not found; give a YAML/JSON file of {{match: PATTERN, ratio: R}} rules")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise BadInputError(f"rules file {p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} "
                            f"({' '.join(str(e).split())[:120]})") from None
    if not isinstance(data, dict) or not data:
        raise BadInputError(f"rules file {p}: expected a mapping (rules: [...], default: R) or {{pattern: ratio}}")
    default = 0.0
    if "rules" in data:
        unknown = sorted(set(data) - {"rules", "default"})
        if unknown:
            raise BadInputError(f"rules file {p}: unknown keys {unknown}; allowed: rules, default")
        default = _rule_ratio(data.get("default", 0.0), p, "default")
        items = data["rules"]
        if not isinstance(items, list) or not items:
            raise BadInputError(f"rules file {p}: 'rules' must be a non-empty list of {{match, ratio}}")
        rules = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"match", "ratio"} or not isinstance(item["match"], str):
                raise BadInputError(f"rules file {p}: rule {i} must be {{match: PATTERN, ratio: R}}, got {item!r}")
            rules.append(Rule(item["match"], _rule_ratio(item["ratio"], p, item["match"])))
    else:
        rules = [Rule(str(k), _rule_ratio(v, p, str(k))) for k, v in data.items()]
    return rules, default


def _rule_ratio(v: object, p: Path, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise BadInputError(f"rules file {p}: ratio of {what!r} is {v!r}; give a number in [0, 1) (0 keeps the layer)")
    return float(v)


def parse_prune_flag(value: str) -> tuple[float | None, list[Rule], float, str]:
    """``--prune`` value: a ratio (``0.3``) or a rules file. Returns (ratio, rules, default, source)."""
    try:
        float(value)
    except ValueError:
        if Path(value).suffix.lower() in (".yaml", ".yml", ".json") or Path(value).exists():
            rules, default = load_rules(value)
            return None, rules, default, str(value)
    return check_ratio(value, "--prune"), [], 0.0, f"--prune {value}"
