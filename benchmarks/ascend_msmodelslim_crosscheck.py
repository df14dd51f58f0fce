"""Cross-check our Ascend deploy form against Huawei's msModelSlim on the same small model.

Builds a small CNN (Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm), quantizes it
with msModelSlim's ONNX ``squant_ptq`` (label-free, CPU) in a separate venv (DESIGN.md section 3:
onnx<=1.16, numpy<2, torch 2.13 CPU, a stand-in ``acl`` module, ``graph_optimize_level=0``) and with
deployer's Ascend backend on the same calibration samples, then compares the two deploy graphs op by
op and attribute by attribute: op types, attribute names/types, initializer dtypes, Gemm layout, the
deq_scale packing and the int32 bias rule, decoded from each graph on its own terms.

Run: ``python benchmarks/ascend_msmodelslim_crosscheck.py [--msms-python /tmp/msms-venv/bin/python]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.ascend.backend import AscendBackend  # noqa: E402
from backends.ascend.deploy_form import unpack_deq_scale  # noqa: E402
from backends.base import LoweringContext  # noqa: E402
from calibration.collect import collect_statistics  # noqa: E402
from calibration.dataset import CalibrationSet  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, make_plan  # noqa: E402

MSMS_RUNNER = textwrap.dedent('''
    import sys, types, numpy as np
    acl = types.ModuleType("acl")  # stand-in: msModelSlim imports acl at module level; no NPU is used
    for name in ("init", "finalize", "rt", "mdl", "op"):
        setattr(acl, name, types.SimpleNamespace())
    acl.get_soc_name = lambda: "Ascend310P3"  # only read to gate graph optimizations (level 0 here)
    sys.modules["acl"] = acl
    from msmodelslim.onnx.squant_ptq import OnnxCalibrator, QuantConfig
    src, dst, data = sys.argv[1], sys.argv[2], sys.argv[3]
    calib = np.load(data)
    cfg = QuantConfig(quant_mode=0, amp_num=0, disable_first_layer=False, disable_last_layer=False,
                      graph_optimize_level=0)
    c = OnnxCalibrator(src, cfg, calib_data=[[x] for x in calib])
    c.run()
    c.export_quant_onnx(dst)
''')


def small_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1),
    ]
    inits = {"w1": w(16, 3, 3, 3), "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
             "w2": w(32, 16, 3, 3), "b2": (rng.standard_normal(32) * 0.1).astype(np.float32),
             "wf": w(10, 32), "bf": (rng.standard_normal(10) * 0.1).astype(np.float32)}
    g = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def describe(m: onnx.ModelProto) -> list[dict]:
    inits = {i.name: i for i in m.graph.initializer}
    rows = []
    for n in m.graph.node:
        attrs = {}
        for a in n.attribute:
            attrs[a.name] = (onnx.AttributeProto.AttributeType.Name(a.type), helper.get_attribute_value(a))
        ins = [(i, TensorProto.DataType.Name(inits[i].data_type) if i in inits else "act") for i in n.input]
        rows.append({"op": n.op_type, "name": n.name, "domain": n.domain or "ai.onnx", "attrs": attrs, "inputs": ins})
    return rows


def layer_params(m: onnx.ModelProto) -> dict[str, dict]:
    """Decode each int8 layer: AscendQuant scale/offset, weight/bias dtypes, deq_scale (unpacked)."""
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type != "AscendDequant":
            continue
        comp = producer.get(n.input[0])
        while comp is not None and comp.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            comp = producer.get(comp.input[0])
        if comp is None:
            continue
        q = producer.get(comp.input[0])
        qa = {a.name: helper.get_attribute_value(a) for a in q.attribute} if q is not None else {}
        deq, woff = unpack_deq_scale(inits[n.input[1]].astype(np.uint64))
        bias = inits.get(comp.input[2]) if len(comp.input) > 2 else None
        wq = inits[comp.input[1]]
        out[comp.op_type + ":" + str(len(out))] = {
            "x_scale": 1.0 / float(qa.get("scale", np.nan)), "x_offset": qa.get("offset"),
            "offset_attr_type": next((onnx.AttributeProto.AttributeType.Name(a.type) for a in q.attribute
                                      if a.name == "offset"), None) if q is not None else None,
            "w_dtype": str(wq.dtype), "w_shape": tuple(wq.shape), "bias_dtype": str(bias.dtype) if bias is not None else None,
            "deq_scale": deq, "w_offset": woff, "bias": bias, "wq": wq,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--msms-python", default="/tmp/msms-venv/bin/python")
    ap.add_argument("--samples", type=int, default=16)
    a = ap.parse_args()
    model = small_cnn()
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((a.samples, 1, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        dp = Path(d)
        onnx.save(model, str(dp / "small_cnn.onnx"))
        np.save(dp / "calib.npy", calib)
        (dp / "run_msms.py").write_text(MSMS_RUNNER)
        proc = subprocess.run([a.msms_python, str(dp / "run_msms.py"), str(dp / "small_cnn.onnx"),
                               str(dp / "msms_deploy.onnx"), str(dp / "calib.npy")], capture_output=True, text=True)
        if proc.returncode != 0:
            print("msModelSlim failed:\n" + (proc.stdout + proc.stderr)[-3000:])
            return 1
        theirs = onnx.load(str(dp / "msms_deploy.onnx"))
        cs = CalibrationSet([{"input": x} for x in calib])
        inputs = Inputs(model, cs, cs, "generic", "crosscheck", "same samples")
        plan = make_plan(inputs, collect_statistics(model, cs), DeployOptions(bias_correction=False))
        art = AscendBackend().lower(LoweringContext(model, plan, dp / "ours", cs))
        ours = onnx.load(str(art.path.parent / "model_deploy.onnx"))

    print("## op sequence")
    for tag, m in (("msModelSlim", theirs), ("deployer", ours)):
        print(f"{tag:12s}: " + " -> ".join(n.op_type for n in m.graph.node))
    print("\n## attributes of the Ascend ops and int8 layers (name: TYPE)")
    for tag, m in (("msModelSlim", theirs), ("deployer", ours)):
        seen = {}
        for r in describe(m):
            if r["op"] in ("AscendQuant", "AscendDequant", "AscendAntiQuant", "Conv", "Gemm", "MatMul"):
                key = r["op"]
                sig = (r["domain"], tuple(sorted((k, t) for k, (t, _) in r["attrs"].items())),
                       tuple(t for _, t in r["inputs"]))
                seen.setdefault(key, set()).add(sig)
        for op, sigs in sorted(seen.items()):
            for dom, attrs, ins in sorted(sigs):
                print(f"{tag:12s} {op:14s} domain={dom} attrs={{{', '.join(f'{k}: {t}' for k, t in attrs)}}} "
                      f"inputs={list(ins)}")
    print("\n## per layer, decoded from each graph")
    lt, lo = layer_params(theirs), layer_params(ours)
    for (kt, t), (ko, o) in zip(lt.items(), lo.items()):
        print(f"{kt} vs {ko}: weight {t['w_dtype']}{t['w_shape']} vs {o['w_dtype']}{o['w_shape']}; "
              f"bias {t['bias_dtype']} vs {o['bias_dtype']}; offset attr {t['offset_attr_type']} vs {o['offset_attr_type']}")
        for tag, p in (("msModelSlim", t), ("deployer", o)):
            deq = p["deq_scale"]
            w_scale = deq / p["x_scale"]
            print(f"  {tag:12s} x_scale={p['x_scale']:.6g} x_offset={p['x_offset']} deq_scale[{deq.size}] "
                  f"min/max={deq.min():.4g}/{deq.max():.4g} w_offset(bits 40-47)={sorted(set(p['w_offset'].tolist()))} "
                  f"implied w_scale min/max={w_scale.min():.4g}/{w_scale.max():.4g}")
    print("\n## int32 bias rule, checked on each graph against the FP32 bias b")
    fp_bias = [numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == n.input[2])).astype(np.float64)
               for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for tag, layers in (("msModelSlim", lt), ("deployer", lo)):
        for (k, p), b in zip(layers.items(), fp_bias):
            deq = np.broadcast_to(p["deq_scale"].astype(np.float64), b.shape)
            red = tuple(i for i in range(p["wq"].ndim) if i != (0 if k.startswith("Conv") else 1))
            wsum = p["wq"].astype(np.int64).sum(axis=red)
            plain = np.rint(b / deq)
            comp = plain - float(p["x_offset"]) * wsum
            print(f"  {tag:12s} {k}: bias == round(b/deq): {np.array_equal(p['bias'], plain)}; "
                  f"bias == round(b/deq) - x_offset*sum(w_int8): {np.array_equal(p['bias'], comp)}; "
                  f"max |bias - round(b/deq)| = {np.abs(p['bias'] - plain).max():.0f}, "
                  f"max |bias - compensated| = {np.abs(p['bias'] - comp).max():.0f}")
    print(f"\nlayers: msModelSlim {len(lt)}, deployer {len(lo)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
