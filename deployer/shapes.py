"""``--input-shapes`` grammar, shared by every target.

``name:SHAPE`` fixes an input's shape; ``name:MIN/OPT/MAX`` gives a dynamic range (TensorRT
optimization profile; ATC dynamic profiles). Shapes are ``x``-separated positive integers, e.g.
``input:1x3x224x224`` or ``input_ids:1x16/8x128/32x256``. Several inputs are separated by commas or
given as repeated options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deployer.errors import BadInputError

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shapes of one input (all equal for a static shape)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def dynamic_axes(self) -> list[int]:
        """Axes whose size differs between min and max."""
        return [i for i, (a, b) in enumerate(zip(self.min, self.max)) if a != b]


def _shape(text: str, spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise BadInputError(f"--input-shapes {spec!r}: {text!r} is not a shape like 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInputError(f"--input-shapes {spec!r}: dimensions must be positive integers")
    return dims


def parse_input_shapes(specs: str | Sequence[str] | None) -> dict[str, ShapeRange]:
    """Parse ``name:SHAPE`` / ``name:MIN/OPT/MAX`` items.

    Raises:
        BadInputError: malformed item, ranks that differ, or min > opt > max violated.
    """
    if not specs:
        return {}
    items = [specs] if isinstance(specs, str) else list(specs)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    out: dict[str, ShapeRange] = {}
    for part in parts:
        name, sep, rest = part.rpartition(":")
        if not sep or not name:
            hint = (" (dimensions are x-separated, e.g. x:1x3x224x224, not comma-separated as atc writes them)"
                    if part.isdigit() else "")
            raise BadInputError(f"--input-shapes {part!r}: use name:SHAPE or name:MIN/OPT/MAX{hint}")
        pieces = rest.split("/")
        if len(pieces) == 1:
            s = _shape(pieces[0], part)
            rng = ShapeRange(s, s, s)
        elif len(pieces) == 3:
            mn, op, mx = (_shape(p, part) for p in pieces)
            if not len(mn) == len(op) == len(mx):
                raise BadInputError(f"--input-shapes {part!r}: MIN, OPT and MAX must have the same rank")
            if any(not (a <= b <= c) for a, b, c in zip(mn, op, mx)):
                raise BadInputError(f"--input-shapes {part!r}: need MIN <= OPT <= MAX in every dimension")
            rng = ShapeRange(mn, op, mx)
        else:
            raise BadInputError(f"--input-shapes {part!r}: give one shape or MIN/OPT/MAX")
        if name in out:
            raise BadInputError(f"--input-shapes: input {name!r} given twice")
        out[name] = rng
    return out


def check_input_names(model: "onnx.ModelProto", given: Mapping[str, object] | None) -> list[str]:
    """The model's graph inputs (initializers excluded); refuse ``--input-shapes`` naming anything else.

    Raises:
        BadInputError: an input named in ``given`` is not an input of the model.
    """
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    unknown = set(given or {}) - set(names)
    if unknown:
        raise BadInputError(f"--input-shapes names {sorted(unknown)}, not inputs of the model ({', '.join(names)})")
    return names


def resolve_input_shapes(model: "onnx.ModelProto", given: Mapping[str, ShapeRange] | None,
                         seen: Mapping[str, Mapping[str, Sequence[int]]] | None = None
                         ) -> tuple[dict[str, ShapeRange], dict[str, str]]:
    """Every graph input's shape range, and where each came from.

    Order: ``--input-shapes`` (``given``); else the model's static dims; else, for an input with
    symbolic dims, the calibration shapes seen (``plan.calibration["input_shapes"]``: per-axis min and
    max over the calibration samples), as min / opt = max / max.

    Returns:
        (name -> :class:`ShapeRange`, name -> source: ``"--input-shapes"``, ``"static"`` or
        ``"calibration shapes seen"``).

    Raises:
        BadInputError: ``given`` names a non-input; an input with symbolic dims has neither.
    """
    given = dict(given or {})
    check_input_names(model, given)
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, ShapeRange] = {}
    source: dict[str, str] = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in i.type.tensor_type.shape.dim]
        if i.name in given:
            g = given[i.name]
            if dims and len(g.min) != len(dims):
                raise BadInputError(f"--input-shapes {i.name}: rank {len(g.min)}, but the model's input has rank "
                                    f"{len(dims)} ({_dims_text(dims)})")
            bad = [a for a, d in enumerate(dims) if a > 0 and d > 0 and not g.min[a] == g.max[a] == d]
            if bad:  # the batch axis may be overridden (ATC's --input_shape does); fixed feature axes may not
                raise BadInputError(f"--input-shapes {i.name}: axis {bad[0]} is fixed at {dims[bad[0]]} in the model "
                                    f"({_dims_text(dims)}); give that size there")
            shapes[i.name], source[i.name] = g, "--input-shapes"
            continue
        if all(d > 0 for d in dims):
            shapes[i.name], source[i.name] = ShapeRange(tuple(dims), tuple(dims), tuple(dims)), "static"
            continue
        s = (seen or {}).get(i.name)
        if s is None:
            raise BadInputError(f"input {i.name!r} has symbolic dimensions and the plan records no calibration shapes "
                                f"for it; pass --input-shapes {i.name}:SHAPE or {i.name}:MIN/OPT/MAX")
        mn, mx = _seen_entry(i.name, s, len(dims))
        lo = tuple(int(d) if d > 0 else int(a) for d, a in zip(dims, mn))
        hi = tuple(int(d) if d > 0 else int(b) for d, b in zip(dims, mx))
        shapes[i.name], source[i.name] = ShapeRange(lo, hi, hi), "calibration shapes seen"
    return shapes, source


def _dims_text(dims: Sequence[int]) -> str:
    return "x".join(str(d) if d > 0 else "?" for d in dims)


def _seen_entry(name: str, entry: object, rank: int) -> tuple[list[int], list[int]]:
    """``plan.calibration["input_shapes"][name]`` checked: ``{"min": [ints], "max": [ints]}`` of the input's
    rank with min <= max.

    Raises:
        BadInputError: anything else (a hand-edited plan).
    """
    ok = (isinstance(entry, dict) and all(isinstance(entry.get(k), list) and len(entry[k]) == rank
                                          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in entry[k]) for k in ("min", "max")))
    if not ok or any(a > b for a, b in zip(entry["min"], entry["max"])):  # type: ignore[index]
        raise BadInputError(f"plan calibration.input_shapes[{name!r}] must be {{\"min\": [...], \"max\": [...]}} "
                            f"with {rank} positive integers each and min <= max; fix the plan or pass --input-shapes")
    return list(entry["min"]), list(entry["max"])  # type: ignore[index]


def describe_shapes(shapes: Mapping[str, ShapeRange], source: Mapping[str, str]) -> str:
    """One line for a report note, e.g. ``input_ids: 1x4/1x40/1x40 (calibration shapes seen)``."""
    def x(s: tuple[int, ...]) -> str:
        return "x".join(str(d) for d in s)

    return "; ".join(f"{n}: {x(r.min) if r.static else '/'.join(x(s) for s in (r.min, r.opt, r.max))} "
                     f"({source.get(n, '?')})" for n, r in shapes.items())
