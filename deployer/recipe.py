"""Recipes: ordered rules over the graph that decide each node's precision.

A rule is ``{"match": {"op_type": [..], "name": "regex", "scope": "prefix", "attention": true,
"pattern": "residual_add|layernorm|gelu|attention"}, "precision": "int8|fp16|fp32"}``;
every rule is tried in order and the *last* matching rule decides (later rules refine earlier ones,
as in ai-edge-quantizer recipes). Presets:

- ``int8``: every node INT8; Conv/ConvTranspose/Gemm/MatMul with a constant weight get symmetric
  per-channel INT8 weights.
- ``fp16``: every node FP16.
- ``int4``: weight-only INT4 (block-wise symmetric, blocks of 32 along the input axis) for MatMul/Gemm
  with a constant 2-D weight, everything else FP32: the seed's recommendation for CPU/ARM (Cortex-A)
  where memory bandwidth dominates. Lowered by the ``onnxruntime`` target (``MatMulNBits``); the other
  targets refuse it (TFLite's converter, TensorRT's and Ascend's Q/DQ routes here have no INT4 weights).
  A rule can ask for it anywhere with ``"weight_bits": 4`` (and ``"block_size"``).
- ``mixed`` (the seed's rule, plus SmoothQuant 0.8: :data:`PRESET_RECOVERY`): ``int8`` plus attention blocks (MatMul with two activation inputs,
  Softmax) in FP16, and the residual ``Add`` before each LayerNorm in FP16: the residual stream holds
  a few outlier channels that per-tensor INT8 cannot represent (Bondarenko et al. 2021); measured on
  all-MiniLM-L6-v2 (Ascend policy) this lifts cosine to FP32 from 0.894 to 0.980.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from deployer.errors import BadInputError
from deployer.graph import WEIGHTED_OPS, GraphView
from deployer.plan import Granularity, NodeDecision, Precision, WeightScheme

ALL = {"op_type": None}


INT4_BLOCK_SIZE = 32
"""Default block (input-axis elements sharing one scale) of weight-only INT4."""


@dataclass(frozen=True)
class Rule:
    """One recipe rule (see module docstring)."""

    precision: Precision
    op_type: tuple[str, ...] | None = None
    name: str | None = None
    scope: str | None = None
    attention: bool = False
    label: str = ""
    pattern: str | None = None
    weight_bits: int = 8
    block_size: int = INT4_BLOCK_SIZE

    def matches(self, node: onnx.NodeProto, view: GraphView, patterns: dict[str, set[str]] | None = None) -> bool:
        """Whether ``node`` matches every given key; ``patterns`` is :func:`pattern_members` of the model."""
        if self.op_type is not None and node.op_type not in self.op_type:
            return False
        if self.name is not None and not re.search(self.name, node.name):
            return False
        if self.scope is not None and not node.name.lstrip("/").startswith(self.scope.lstrip("/")):
            return False
        if self.attention and not is_attention_node(node, view):
            return False
        if self.pattern is not None and node.name not in (patterns or {}).get(self.pattern, set()):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        m: dict[str, Any] = {}
        if self.op_type is not None:
            m["op_type"] = list(self.op_type)
        if self.name is not None:
            m["name"] = self.name
        if self.scope is not None:
            m["scope"] = self.scope
        if self.attention:
            m["attention"] = True
        if self.pattern is not None:
            m["pattern"] = self.pattern
        d: dict[str, Any] = {"match": m, "precision": self.precision.value, "label": self.label}
        if self.weight_bits != 8:
            d.update({"weight_bits": self.weight_bits, "block_size": self.block_size})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rule":
        if (not isinstance(d, dict) or set(d) - {"match", "precision", "label", "weight_bits", "block_size"}
                or "precision" not in d):
            raise BadInputError(f"recipe rule {d!r} must be {{'match': {{...}}, 'precision': ..., "
                                f"'weight_bits'?: 4|8, 'block_size'?: N}}")
        bits, block = d.get("weight_bits", 8), d.get("block_size", INT4_BLOCK_SIZE)
        if bits not in (4, 8) or not isinstance(block, int) or block < 16 or block & (block - 1):
            raise BadInputError(f"recipe rule weight_bits {bits!r} / block_size {block!r}: use 4 or 8 bits and a "
                                f"power-of-two block of at least 16 (ONNX Runtime MatMulNBits)")
        m = d.get("match", {})
        if set(m) - {"op_type", "name", "scope", "attention", "pattern"}:
            raise BadInputError(f"recipe rule match keys {sorted(m)}: allowed op_type, name, scope, attention, pattern")
        if m.get("pattern") is not None and m["pattern"] not in PATTERNS:
            raise BadInputError(f"recipe rule pattern {m['pattern']!r}: use one of {', '.join(PATTERNS)}")
        try:
            prec = Precision(d["precision"])
        except ValueError:
            raise BadInputError(f"recipe rule precision {d['precision']!r}: use int8, fp16 or fp32") from None
        ops = m.get("op_type")
        if isinstance(ops, str):
            ops = [ops]
        if m.get("name") is not None:
            try:
                re.compile(m["name"])
            except re.error as e:
                raise BadInputError(f"recipe rule name pattern {m['name']!r} is not a valid regex ({e})") from None
        return cls(prec, tuple(ops) if ops else None, m.get("name"), m.get("scope"), bool(m.get("attention", False)),
                   d.get("label", ""), m.get("pattern"), bits, block)


@dataclass(frozen=True)
class Recovery:
    """Accuracy-recovery methods a recipe turns on (the CLI/API options override them).

    Attributes:
        bias_correction: empirical bias correction (Nagel et al. 2019), default on.
        smoothquant: SmoothQuant migration strength (Xiao et al. 2023) or None (off).
        equalize: cross-layer equalization before calibration (Nagel et al. 2019).
        adaround: learned weight rounding (Nagel et al. 2020) with this time budget in seconds, or None
            (off). A recipe file writes ``true`` (the default budget) or a number of seconds.
        observer: activation observer the recipe asks for (e.g. ``auto``: one observer per tensor,
            :func:`calibration.observers.auto_observer`); None = the command's ``--observer``. A
            ``--observer`` other than the default ``minmax`` overrides it.
    """

    bias_correction: bool = True
    smoothquant: float | None = None
    equalize: bool = False
    adaround: float | None = None
    observer: str | None = None

    @classmethod
    def from_dict(cls, d: Any, base: "Recovery", where: str) -> "Recovery":
        if not isinstance(d, dict) or set(d) - {"bias_correction", "smoothquant", "equalize", "adaround", "observer"}:
            raise BadInputError(f"{where}: 'recovery' must be an object with keys bias_correction (true/false), "
                                f"smoothquant (alpha in [0, 1] or null), equalize (true/false), "
                                f"adaround (true/false or a time budget in seconds), observer (e.g. \"auto\")")
        sq = d.get("smoothquant", base.smoothquant)
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, (int, float)) or not 0 <= sq <= 1):
            raise BadInputError(f"{where}: recovery.smoothquant {sq!r}: give alpha in [0, 1] or null")
        bc, eq = d.get("bias_correction", base.bias_correction), d.get("equalize", base.equalize)
        if not isinstance(bc, bool) or not isinstance(eq, bool):
            raise BadInputError(f"{where}: recovery.bias_correction and recovery.equalize must be true or false")
        from deployer.adaround import check_budget

        ada = check_budget(d.get("adaround", base.adaround), f"{where}: recovery.adaround")
        from calibration.observers import OBSERVERS

        obs = d.get("observer", base.observer)
        if obs is not None and obs not in OBSERVERS:
            raise BadInputError(f"{where}: recovery.observer {obs!r}: use one of {', '.join(OBSERVERS)}")
        return cls(bc, None if sq is None else float(sq), eq, ada, obs)


MIXED_SMOOTHQUANT_ALPHA = 0.8
PRESET_RECOVERY: dict[str, Recovery] = {"mixed": Recovery(smoothquant=MIXED_SMOOTHQUANT_ALPHA)}
"""Recovery a preset turns on: ``mixed`` (the transformer recipe) adds SmoothQuant 0.8 (measured on
all-MiniLM-L6-v2, TensorRT rules: cosine 0.978 -> 0.996; targets with per-tensor MatMul weights, such as
Ascend, do not apply it)."""

PATTERNS = ("residual_add", "layernorm", "gelu", "attention")
"""Values of a rule's ``pattern`` key: node groups found by :func:`deployer.patterns.find_patterns`."""


def pattern_members(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Pattern name -> names of the nodes in such a pattern."""
    from deployer.patterns import find_patterns

    p = find_patterns(model)
    return {"residual_add": set(p.residual_add), "layernorm": {n for g in p.layernorm for n in g},
            "gelu": {n for g in p.gelu for n in g}, "attention": {n for g in p.attention for n in g}}


def is_attention_node(node: onnx.NodeProto, view: GraphView) -> bool:
    """Softmax, or MatMul whose two inputs are both activations (Q·K^T, P·V)."""
    if node.op_type == "Softmax":
        return True
    if node.op_type == "MatMul":
        return not any(view.is_constant(i) for i in node.input[:2])
    return False


PRESETS: dict[str, list[Rule]] = {
    "int8": [Rule(Precision.INT8, label="int8: every node")],
    "fp16": [Rule(Precision.FP16, label="fp16: every node")],
    "mixed": [
        Rule(Precision.INT8, label="mixed: every node int8"),
        Rule(Precision.FP16, attention=True, label="mixed: attention MatMul/Softmax in fp16 (seed rule)"),
        Rule(Precision.FP16, pattern="residual_add",
             label="mixed: residual Add before LayerNorm in fp16 (outlier channels; Bondarenko et al. 2021)"),
    ],
    "int4": [
        Rule(Precision.FP32, op_type=("MatMul", "Gemm"), weight_bits=4,
             label="int4: weight-only block-wise symmetric INT4 MatMul/Gemm weights, float activations"),
    ],
}


def _recipe_file(recipe: str) -> tuple[Path, dict[str, Any]]:
    """Read and check a recipe file (not a preset): its path and its parsed, validated top level.

    Raises:
        BadInputError: no such preset or file, unparsable file, or a malformed top level.
    """
    p = Path(recipe)
    if not p.is_file():
        raise BadInputError(f"unknown recipe {recipe!r}; use one of {', '.join(PRESETS)} or a JSON/YAML rules file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise BadInputError(f"recipe file {p} cannot be parsed ({e}); write JSON or YAML") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules", []), list):
        raise BadInputError(f"recipe file {p} must hold {{'base': preset, 'rules': [...]}}")
    extra = set(data) - {"base", "rules", "recovery", "gates"}
    if extra:
        raise BadInputError(f"recipe file {p}: unknown top-level key(s) {sorted(extra)}; a recipe holds only "
                            f"'base', 'rules', 'recovery' and 'gates'")
    if not isinstance(data.get("gates", {}), dict):
        raise BadInputError(f"recipe file {p}: 'gates' must be an object {{name: threshold}}, e.g. "
                            f"{{\"cosine_mean\": 0.99}}")
    if data.get("base", "int8") not in PRESETS:
        raise BadInputError(f"recipe file {p}: base {data.get('base')!r} is not one of {', '.join(PRESETS)}")
    return p, data


def load_rules(recipe: str) -> tuple[str, list[Rule]]:
    """A preset name, or a JSON/YAML file ``{"base": preset?, "rules": [...]}``.

    Raises:
        BadInputError: unknown preset, unreadable or malformed file.
    """
    if recipe in PRESETS:
        return recipe, list(PRESETS[recipe])
    p, data = _recipe_file(recipe)
    base = data.get("base", "int8")
    return f"{base}+{p.name}", list(PRESETS[base]) + [Rule.from_dict(r) for r in data.get("rules", [])]


def load_recovery(recipe: str) -> Recovery:
    """The recovery methods of a preset, or of a recipe file (its ``recovery`` object over its base's).

    Raises:
        BadInputError: as :func:`load_rules`, or a malformed ``recovery`` object.
    """
    if recipe in PRESETS:
        return PRESET_RECOVERY.get(recipe, Recovery())
    p, data = _recipe_file(recipe)
    for r in data.get("rules", []):
        Rule.from_dict(r)  # a malformed rule is refused here too, as by load_rules
    base = PRESET_RECOVERY.get(data.get("base", "int8"), Recovery())
    return Recovery.from_dict(data["recovery"], base, f"recipe file {p}") if "recovery" in data else base


def load_gates(recipe: str) -> dict[str, float]:
    """The gate thresholds of a recipe file's ``gates`` object (:mod:`deployer.gates`); none for a preset.

    Raises:
        BadInputError: as :func:`load_rules`, or an unknown gate / non-numeric threshold.
    """
    if recipe in PRESETS:
        return {}
    from deployer.gates import parse_gates

    p, data = _recipe_file(recipe)
    return parse_gates(data.get("gates") or {}, f"recipe file {p}: gate")


def decide(model: onnx.ModelProto, rules: list[Rule], weight_granularity: Granularity = Granularity.PER_CHANNEL) -> dict[str, NodeDecision]:
    """Apply rules to every node; last match wins; unmatched nodes are left out (FP32)."""
    view = GraphView(model)
    patterns = pattern_members(model) if any(r.pattern for r in rules) else None
    out: dict[str, NodeDecision] = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        chosen = None
        for r in rules:
            if r.matches(node, view, patterns):
                chosen = r
        if chosen is None:
            continue
        weight = None
        w = view.weight_of(node) if node.op_type in WEIGHTED_OPS else None
        if chosen.weight_bits == 4:
            if node.op_type in ("MatMul", "Gemm") and w is not None and w.ndim == 2:
                weight = WeightScheme(bits=4, block_size=chosen.block_size)
        elif chosen.precision == Precision.INT8 and w is not None:
            weight = WeightScheme(granularity=weight_granularity)
        out[node.name] = NodeDecision(node.op_type, chosen.precision, weight, chosen.label)
    return out
