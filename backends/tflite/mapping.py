"""ONNX -> TFLite tensor correspondence, verified by value, and min/max of every TFLite activation.

onnx2tf's ``model_tensor_correspondence_report.json`` mis-maps fused tensors (a Conv output recorded
as the fused Conv+ReLU output; Conv-ReLU-BatchNorm ranges 10-100x too wide, issue 17). Every mapping
is therefore checked on one calibration sample: the float ``.tflite`` runs with all intermediate
tensors preserved, ONNX Runtime with every node output; a mapping is kept only when the two tensors
hold the same values up to layout (compared sorted, so NCHW/NHWC and inserted transposes do not
matter). TFLite activations left without a mapping are then matched by value to any ONNX tensor.
Runs in the worker child.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from backends.tflite import flatbuf
from backends.tflite.session import Layout, Session, candidate_perms, close, output_layout


@dataclass
class Mapping:
    """Result of :func:`map_tensors`.

    Attributes:
        layout: input/output layout of the ``.tflite`` (:class:`~backends.tflite.session.Layout`).
        onnx_of: TFLite activation tensor name -> ONNX tensor names holding the same values (best first).
        minmax: TFLite activation tensor name -> (min, max) over the calibration samples run.
        rejected: report mappings whose values disagreed (TFLite name -> ONNX name).
        by_value: how many mappings were found by value (not in the report).
    """

    layout: Layout
    onnx_of: dict[str, list[str]] = field(default_factory=dict)
    minmax: dict[str, tuple[float, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    by_value: int = 0


def find_layout(data: bytes, model: onnx.ModelProto, sample: dict[str, np.ndarray], keep_nchw: bool,
                ref_out: list[np.ndarray]) -> Layout:
    """The input permutations and output order/permutations under which the float ``.tflite`` reproduces
    ONNX Runtime on ``sample``.

    Raises:
        ValueError: no candidate layout reproduces the ONNX outputs (the conversion is wrong).
    """
    from backends.tflite.session import interpreter

    it = interpreter(data)
    dets = it.get_input_details()
    init = {i.name for i in model.graph.initializer}
    onnx_in = [i.name for i in model.graph.input if i.name not in init]
    names = [d["name"] for d in dets]
    named = [n if n in onnx_in else None for n in names]
    rest = [n for n in onnx_in if n not in named]
    order: list[str] = [n if n is not None else rest.pop(0) for n in named]
    cands = [candidate_perms(np.shape(sample[n]), list(d["shape_signature"]), keep_nchw)
             or [list(range(np.ndim(sample[n])))] for n, d in zip(order, dets)]
    onnx_out = [o.name for o in model.graph.output]
    for combo in itertools.islice(itertools.product(*cands), 8):
        layout = Layout(order, [list(p) for p in combo], list(range(len(onnx_out))),
                        [list(range(np.ndim(y))) for y in ref_out])
        s = Session(data, layout)
        s.feed(sample)
        s.it.invoke()
        raw = [s.it.get_tensor(d["index"]) for d in s.it.get_output_details()]
        out_names = [d["name"] for d in s.it.get_output_details()]
        match = output_layout([np.asarray(r, np.float32) for r in raw], ref_out, out_names, onnx_out)
        if match is not None:
            layout.out_order, layout.out_perms = match
            return layout
    raise ValueError("the float .tflite from onnx2tf does not reproduce the ONNX outputs on a calibration sample "
                     "under any input layout")


def _signature(a: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(a, np.float64).ravel())


def map_tensors(data: bytes, model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], layout: Layout,
                correspondence: dict[str, str]) -> Mapping:
    """Verify onnx2tf's correspondence by value on ``samples[0]``, map the rest by value, and record the
    min/max of every float activation over all ``samples``."""
    from deployer.recovery import tensor_values

    fb = flatbuf.load(data)
    sg = fb.subgraphs[0]
    acts = {flatbuf.name(t) for t in sg.tensors if t.type in flatbuf.FLOAT_TYPES and not flatbuf.is_constant(fb, t)}
    res = Mapping(layout)
    s = Session(data, layout, preserve=True)
    details: dict[str, int] = {}
    first: dict[str, np.ndarray] = {}
    for k, sample in enumerate(samples):
        s.feed(sample)
        s.it.invoke()
        if not details:
            details = {d["name"]: d["index"] for d in s.it.get_tensor_details() if d["name"] in acts}
        for nm, idx in details.items():
            try:
                v = s.it.get_tensor(idx)
            except ValueError:  # a tensor the runtime did not keep (e.g. freed scratch)
                continue
            if v.size == 0:
                continue
            lo, hi = float(np.min(v)), float(np.max(v))
            if nm in res.minmax:
                lo, hi = min(lo, res.minmax[nm][0]), max(hi, res.minmax[nm][1])
            res.minmax[nm] = (lo, hi)
            if k == 0:
                first[nm] = np.array(v, copy=True)
    float_types = {onnx.TensorProto.FLOAT}
    vi = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)
          + list(model.graph.input)}
    names = [o for n in model.graph.node for o in n.output if o and vi.get(o, onnx.TensorProto.FLOAT) in float_types]
    ref = next(iter(tensor_values(model, [samples[0]], names)))
    ref = {k: np.asarray(v) for k, v in ref.items() if np.asarray(v).dtype.kind == "f"}
    sigs = {k: _signature(v) for k, v in ref.items()}
    by_size: dict[int, list[str]] = {}
    for tname, v in ref.items():
        by_size.setdefault(int(v.size), []).append(tname)
    reverse: dict[str, list[str]] = {}
    for o, t in correspondence.items():
        reverse.setdefault(t, []).append(o)
    for nm, v in first.items():
        sig = _signature(v)
        ok = [o for o in reverse.get(nm, []) if o in sigs and close(sig, sigs[o])]
        for o in reverse.get(nm, []):
            if o in sigs and o not in ok:
                res.rejected[nm] = o
        if nm in sigs and nm not in ok and close(sig, sigs[nm]):  # the ONNX name kept by onnx2tf
            ok.append(nm)
        if ok:
            res.onnx_of[nm] = ok[::-1]
            continue
        cands = [o for o in by_size.get(int(v.size), []) if close(sig, sigs[o])]
        if cands:  # the last producer first: a reshape/transpose chain's last tensor carries the range
            res.onnx_of[nm] = cands[::-1]
            res.by_value += 1
    return res
