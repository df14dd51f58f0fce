"""One LiteRT interpreter on ONNX-shaped samples: layout permutations, resizing, integer I/O.

Runs inside the worker child (:mod:`backends.tflite.worker`), never in the ``deploy`` process.
Layouts are taken from the ``.tflite`` (issue 17: "never assume"): ``in_perms[k]`` is the axis
permutation with ``tflite_input = transpose(onnx_input, perm)``; ``out_perms[j]`` the one with
``onnx_output = transpose(tflite_output, perm)``; ``out_order[j]`` the TFLite output index of ONNX
output ``j``. Variable tensors (sequence LSTM state) are reset before every invoke: XNNPACK otherwise
reads the previous sample's state (measured cosine 0.28 on an ONNX LSTM, issue 17).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Layout:
    """How ONNX inputs/outputs map onto the ``.tflite``'s (see the module docstring)."""

    in_names: list[str]
    in_perms: list[list[int]]
    out_order: list[int] = field(default_factory=list)
    out_perms: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"in_names": self.in_names, "in_perms": self.in_perms, "out_order": self.out_order,
                "out_perms": self.out_perms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(list(d["in_names"]), [list(p) for p in d["in_perms"]], list(d["out_order"]),
                   [list(p) for p in d["out_perms"]])


def interpreter(data: bytes, preserve: bool = False, threads: int = 1) -> Any:
    """A LiteRT interpreter; ``preserve`` keeps every intermediate tensor and skips the default
    delegate (XNNPACK would hide the tensors inside its partitions)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if preserve:
        return Interpreter(model_content=data, num_threads=threads, experimental_preserve_all_tensors=True,
                           experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return Interpreter(model_content=data, num_threads=threads)


class Session:
    """Feeds ONNX-layout samples to a ``.tflite`` and returns ONNX-layout float32 outputs."""

    def __init__(self, data: bytes, layout: Layout, preserve: bool = False, threads: int = 1) -> None:
        self.it = interpreter(data, preserve, threads)
        self.layout = layout
        self.shapes: list[tuple[int, ...]] | None = None

    def feed(self, sample: dict[str, np.ndarray]) -> None:
        """Set the inputs (quantizing float data into integer inputs), resizing on a new shape first."""
        it = self.it
        xs = [np.transpose(np.asarray(sample[n]), p) for n, p in zip(self.layout.in_names, self.layout.in_perms)]
        shapes = [tuple(x.shape) for x in xs]
        if shapes != self.shapes:
            for d, s in zip(it.get_input_details(), shapes):
                it.resize_tensor_input(d["index"], list(s))
            it.allocate_tensors()
            self.shapes = shapes
        for d, x in zip(it.get_input_details(), xs):
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale and x.dtype.kind == "f":
                info = np.iinfo(d["dtype"])
                x = np.clip(np.rint(x / scale + zp), info.min, info.max)
            it.set_tensor(d["index"], np.asarray(x).astype(d["dtype"]))
        it.reset_all_variables()

    def outputs(self) -> list[np.ndarray]:
        """ONNX-ordered, ONNX-layout float32 outputs of the last invoke (integer outputs dequantized)."""
        outs = self.it.get_output_details()
        row = []
        for k, p in zip(self.layout.out_order, self.layout.out_perms):
            d = outs[k]
            y = self.it.get_tensor(d["index"])
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale:
                y = (y.astype(np.float32) - zp) * scale
            row.append(np.asarray(np.transpose(y, p), np.float32))
        return row

    def run(self, samples: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        res = []
        for s in samples:
            self.feed(s)
            self.it.invoke()
            res.append(self.outputs())
        return res


def candidate_perms(onnx_shape: Sequence[int], signature: Sequence[int], keep: bool) -> list[list[int]]:
    """Axis permutations ``p`` with ``onnx_shape[p]`` fitting the TFLite shape signature (-1: any);
    channel-last first unless ``keep`` (``--tflite-layout nchw``)."""
    r = len(onnx_shape)
    ident = list(range(r))
    last = [0, *range(2, r), 1] if r >= 3 else ident
    order = [ident, last] if keep else [last, ident]
    if r == 3:
        order.append([0, 2, 1])
    seen, out = set(), []
    for p in order:
        if tuple(p) in seen or len(signature) != r:
            continue
        seen.add(tuple(p))
        if all(s in (-1, onnx_shape[a]) for s, a in zip(signature, p)):
            out.append(p)
    return out


def close(a: np.ndarray, b: np.ndarray, rel: float = 1e-2) -> bool:
    """Values agree up to ``rel`` of ``b``'s magnitude (float conversion differences, not errors)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    fin = np.isfinite(b)
    if not np.array_equal(fin, np.isfinite(a)):
        return False
    if not fin.any():
        return True
    tol = rel * float(np.max(np.abs(b[fin]))) + 1e-5
    return bool(np.max(np.abs(a[fin] - b[fin])) <= tol)


def output_layout(tfl: list[np.ndarray], ref: list[np.ndarray], names: list[str], onnx_names: list[str]
                  ) -> tuple[list[int], list[list[int]]] | None:
    """Match TFLite outputs to ONNX outputs by value (name first), each with its permutation."""
    import itertools

    order, perms, used = [], [], set()
    for j, y in enumerate(ref):
        pref = [k for k in range(len(tfl)) if names[k] in (onnx_names[j], onnx_names[j] + "_dequant")]
        found = None
        for k in pref + [k for k in range(len(tfl)) if k not in pref]:
            if k in used or tfl[k].size != y.size or tfl[k].ndim != y.ndim:
                continue
            for p in itertools.permutations(range(y.ndim)) if y.ndim <= 5 else [tuple(range(y.ndim))]:
                z = np.transpose(tfl[k], p)
                if z.shape == y.shape and close(z, y, 2e-2):
                    found = (k, list(p))
                    break
            if found:
                break
        if found is None:
            return None
        used.add(found[0])
        order.append(found[0])
        perms.append(found[1])
    return order, perms


def shape_layout(data: bytes, in_names: list[str], sample: dict[str, np.ndarray], out_shapes: list[list[int | None]],
                 keep_nchw: bool) -> Layout:
    """A layout from shapes alone (``deploy verify`` of an existing ``.tflite``, no float model to
    compare values with): per input the first fitting permutation of :func:`candidate_perms`, outputs in
    file order, each with the identity or the channel-last inverse that gives the ONNX shape
    (``None`` dims match anything)."""
    it = interpreter(data)
    dets = it.get_input_details()
    names = [d["name"] for d in dets]
    order = [n if n in in_names else None for n in names]
    rest = [n for n in in_names if n not in order]
    order_s = [n if n is not None else rest.pop(0) for n in order]
    perms = [(candidate_perms(np.shape(sample[n]), list(d["shape_signature"]), keep_nchw)
              or [list(range(np.ndim(sample[n])))])[0] for n, d in zip(order_s, dets)]
    out_perms = []
    for d, want in zip(it.get_output_details(), out_shapes):
        r = len(want)
        cands = [list(range(r))] + ([[0, r - 1, *range(1, r - 1)]] if r >= 3 else [])
        sig = list(d["shape_signature"])
        fit = [p for p in cands if len(sig) == r and all(w in (None, -1) or sig[a] in (-1, w) for w, a in zip(want, p))]
        out_perms.append(fit[0] if fit else list(range(r)))
    return Layout(order_s, perms, list(range(len(out_shapes))), out_perms)
