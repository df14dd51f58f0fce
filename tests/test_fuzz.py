"""Bounded fuzz pass: ``deploy plan`` and ``deploy check`` over mutated tiny ONNX models.

Every mutated model is written to disk and given to the real CLI in-process
(``deployer.cli.main``). The contract: no traceback escapes. A run either succeeds (exit 0), finds a
rule broken (exit 1) or reports a :class:`deployer.errors.DeployerError` (exit 2/3) as one
``deploy: error: ...`` line. Any other exception is a failure, reported with the seed and index that
reproduce it (``python benchmarks/fuzz_long.py --seed S --only I``).

Mutations (one to three stacked, chosen by a seeded generator per index): flipped and truncated
bytes, dropped nodes / inputs / outputs / initializers, random attribute values, wrong element types,
cycles, duplicate names, huge / zero / negative dims, unknown op types and domains, bad opsets and IR
versions, corrupted initializer payloads, swapped node inputs.

Bounds in CI: ``DEPLOYER_FUZZ_SECONDS`` (default 100) or ``DEPLOYER_FUZZ_COUNT`` (default 1000)
mutations, whichever comes first; ``DEPLOYER_FUZZ_SEED`` (default 0). Longer runs:
``benchmarks/fuzz_long.py``. Crashers found so far are replayed as regression cases at the bottom.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployer.cli import main

# -- base models -----------------------------------------------------------------------------------


def conv_model() -> onnx.ModelProto:
    """1x3x8x8 -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> 1x5."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (5, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (5,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    m.ir_version = 8
    return m


def mlp_model() -> onnx.ModelProto:
    """1x4x6 -> MatMul -> Add -> (Relu, Sigmoid) -> Concat -> Transpose -> Softmax; a residual Add."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (6, 6)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (6,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (12, 6)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Sigmoid", ["a1"], ["s1"], name="sig1"),
        helper.make_node("Concat", ["r1", "s1"], ["cat"], name="cat", axis=2),
        helper.make_node("MatMul", ["cat", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "x"], ["res"], name="residual"),
        helper.make_node("Transpose", ["res"], ["t"], name="tr", perm=[0, 2, 1]),
        helper.make_node("Softmax", ["t"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    m.ir_version = 8
    return m


BASES: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[int, ...]]] = {
    "conv": (conv_model, (1, 3, 8, 8)),
    "mlp": (mlp_model, (1, 4, 6)),
}


# -- mutations -------------------------------------------------------------------------------------

Mutation = Callable[[onnx.ModelProto, np.random.Generator], str]

ELEM_TYPES = [TensorProto.UNDEFINED, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
              TensorProto.INT64, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.COMPLEX64,
              TensorProto.FLOAT8E4M3FN, TensorProto.INT4, 99]
WEIRD_INTS = [0, -1, 1, 2, 3, 7, 255, 2**31 - 1, -(2**31), 2**40, -(2**62)]
WEIRD_DIMS = [0, -1, 2**31 - 1, 2**40, 7]
OP_TYPES = ["Conv", "Relu", "Gemm", "MatMul", "Add", "Concat", "Softmax", "QuantizeLinear", "DequantizeLinear",
            "Loop", "If", "Reshape", "NoSuchOp", "", "Identity", "Cast", "Resize"]


def _pick(rng: np.random.Generator, seq):  # noqa: ANN001, ANN202
    return seq[int(rng.integers(0, len(seq)))]


def _node(m: onnx.ModelProto, rng: np.random.Generator) -> onnx.NodeProto | None:
    return _pick(rng, m.graph.node) if len(m.graph.node) else None


def drop_node(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.node:
        return "noop"
    i = int(rng.integers(0, len(m.graph.node)))
    del m.graph.node[i]
    return f"drop_node[{i}]"


def drop_graph_input(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.input:
        return "noop"
    del m.graph.input[int(rng.integers(0, len(m.graph.input)))]
    return "drop_input"


def drop_graph_output(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.output:
        return "noop"
    del m.graph.output[int(rng.integers(0, len(m.graph.output)))]
    return "drop_output"


def drop_initializer(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.initializer:
        return "noop"
    i = int(rng.integers(0, len(m.graph.initializer)))
    name = m.graph.initializer[i].name
    del m.graph.initializer[i]
    return f"drop_initializer[{name}]"


def random_attribute(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    n = _node(m, rng)
    if n is None:
        return "noop"
    kind = int(rng.integers(0, 4))
    if kind == 0 and n.attribute:  # change an existing value
        a = _pick(rng, n.attribute)
        if a.type == onnx.AttributeProto.INT:
            a.i = int(_pick(rng, WEIRD_INTS))
        elif a.type == onnx.AttributeProto.INTS:
            del a.ints[:]
            a.ints.extend(int(_pick(rng, WEIRD_INTS)) for _ in range(int(rng.integers(0, 6))))
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = float(_pick(rng, [np.nan, np.inf, -1e30, 0.0]))
        return f"attr_value[{n.name}.{a.name}]"
    if kind == 1 and n.attribute:  # change the type of an attribute
        a = _pick(rng, n.attribute)
        a.type = int(_pick(rng, [onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING, onnx.AttributeProto.TENSOR,
                                 onnx.AttributeProto.GRAPH, onnx.AttributeProto.UNDEFINED]))
        return f"attr_type[{n.name}.{a.name}]"
    name = _pick(rng, ["axis", "perm", "pads", "strides", "group", "transA", "transB", "kernel_shape", "alpha",
                       "dilations", "auto_pad", "bogus"])
    del_existing = [i for i, a in enumerate(n.attribute) if a.name == name]
    for i in reversed(del_existing):
        del n.attribute[i]
    if name in ("perm", "pads", "strides", "kernel_shape", "dilations"):
        ints = [int(_pick(rng, WEIRD_INTS)) for _ in range(int(rng.integers(0, 5)))]
        n.attribute.append(helper.make_attribute(name, ints, attr_type=onnx.AttributeProto.INTS))
    elif name == "alpha":
        n.attribute.append(helper.make_attribute(name, float(_pick(rng, [np.nan, 1e38, -3.0]))))
    elif name == "auto_pad":
        n.attribute.append(helper.make_attribute(name, _pick(rng, ["SAME_UPPER", "VALID", "WHATEVER"])))
    else:
        n.attribute.append(helper.make_attribute(name, int(_pick(rng, WEIRD_INTS))))
    return f"attr_add[{n.name}.{name}]"


def wrong_dtype(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    et = int(_pick(rng, ELEM_TYPES))
    where = int(rng.integers(0, 3))
    if where == 0 and m.graph.input:
        m.graph.input[0].type.tensor_type.elem_type = et
        return f"input_dtype[{et}]"
    if where == 1 and m.graph.initializer:
        t = _pick(rng, m.graph.initializer)
        t.data_type = et
        return f"init_dtype[{t.name}={et}]"
    if m.graph.output:
        m.graph.output[0].type.tensor_type.elem_type = et
    return f"output_dtype[{et}]"


def make_cycle(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if len(m.graph.node) < 2:
        return "noop"
    first, last = m.graph.node[0], m.graph.node[len(m.graph.node) - 1]
    if first.input and last.output:
        first.input[0] = last.output[0]
    return "cycle"


def duplicate_name(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    kind = int(rng.integers(0, 4))
    nodes = m.graph.node
    if kind == 0 and len(nodes) >= 2:
        nodes[1].output[0] = nodes[0].output[0]
        return "dup_output"
    if kind == 1 and len(nodes) >= 2:
        nodes[1].name = nodes[0].name
        return "dup_node_name"
    if kind == 2 and m.graph.initializer:
        m.graph.initializer.append(m.graph.initializer[0])
        return "dup_initializer"
    if m.graph.input and m.graph.initializer:
        m.graph.initializer[0].name = m.graph.input[0].name
        return "initializer_shadows_input"
    return "noop"


def weird_dims(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    vis = [v for v in list(m.graph.input) + list(m.graph.output) if v.type.tensor_type.shape.dim]
    if rng.integers(0, 2) and m.graph.initializer:
        t = _pick(rng, m.graph.initializer)
        if t.dims:
            t.dims[int(rng.integers(0, len(t.dims)))] = int(_pick(rng, WEIRD_DIMS))
            return f"init_dim[{t.name}]"
    if not vis:
        return "noop"
    v = _pick(rng, vis)
    d = v.type.tensor_type.shape.dim[int(rng.integers(0, len(v.type.tensor_type.shape.dim)))]
    if rng.integers(0, 3) == 0:
        d.dim_param = "N"
    else:
        d.dim_value = int(_pick(rng, WEIRD_DIMS))
    return f"dim[{v.name}]"


def change_op_type(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    n = _node(m, rng)
    if n is None:
        return "noop"
    n.op_type = _pick(rng, OP_TYPES)
    if rng.integers(0, 4) == 0:
        n.domain = _pick(rng, ["com.microsoft", "ai.onnx.ml", "evil.domain"])
    return f"op_type[{n.name}={n.op_type}]"


def bad_opset(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    kind = int(rng.integers(0, 4))
    if kind == 0 and m.opset_import:
        m.opset_import[0].version = int(_pick(rng, [1, 6, 10, 13, 23, 99, 0, -5]))
    elif kind == 1:
        m.opset_import.append(helper.make_opsetid(_pick(rng, ["", "com.microsoft", "x.y"]), int(rng.integers(1, 30))))
    elif kind == 2:
        del m.opset_import[:]
    else:
        m.ir_version = int(_pick(rng, [0, 1, 3, 11, 99, -1]))
    return f"opset[{kind}]"


def corrupt_initializer(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.initializer:
        return "noop"
    t = _pick(rng, m.graph.initializer)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        t.raw_data = t.raw_data[: int(rng.integers(0, max(1, len(t.raw_data))))]
    elif kind == 1:
        raw = bytearray(t.raw_data)
        for _ in range(4):
            if raw:
                raw[int(rng.integers(0, len(raw)))] = 0xFF  # NaN / Inf patterns in float32
        t.raw_data = bytes(raw)
    else:
        t.ClearField("raw_data")
        t.float_data.extend([1.0, 2.0])
    return f"init_payload[{t.name},{kind}]"


def swap_inputs(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    n = _node(m, rng)
    if n is None or len(n.input) < 2:
        return "noop"
    n.input[0], n.input[1] = n.input[1], n.input[0]
    return f"swap_inputs[{n.name}]"


def rename_tensor(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    n = _node(m, rng)
    if n is None or not n.input:
        return "noop"
    n.input[int(rng.integers(0, len(n.input)))] = _pick(rng, ["", "ghost", "x", "y"])
    return f"rename_input[{n.name}]"


PROTO_MUTATIONS: list[Mutation] = [drop_node, drop_graph_input, drop_graph_output, drop_initializer, random_attribute,
                                   wrong_dtype, make_cycle, duplicate_name, weird_dims, change_op_type, bad_opset,
                                   corrupt_initializer, swap_inputs, rename_tensor]


def mutate_bytes(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        n = int(rng.integers(1, len(raw)))
        return raw[:n], f"truncate[{n}]"
    buf = bytearray(raw)
    k = int(rng.integers(1, 9))
    for _ in range(k):
        buf[int(rng.integers(0, len(buf)))] ^= 1 << int(rng.integers(0, 8))
    if kind == 2:
        i = int(rng.integers(0, len(buf)))
        buf[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        return bytes(buf), f"flip[{k}]+insert"
    return bytes(buf), f"flip[{k}]"


@dataclass
class Case:
    """One mutated model: its base, the mutations applied (for the report) and its bytes."""

    index: int
    base: str
    steps: list[str] = field(default_factory=list)
    data: bytes = b""


def make_case(seed: int, index: int) -> Case:
    """Mutated model number ``index`` of the stream ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    base = _pick(rng, sorted(BASES))
    m = BASES[base][0]()
    case = Case(index, base)
    for _ in range(int(rng.integers(1, 4))):
        mutation = _pick(rng, PROTO_MUTATIONS)
        try:
            case.steps.append(mutation(m, rng))
        except (IndexError, ValueError, TypeError) as e:  # the mutation does not apply to this graph
            case.steps.append(f"{mutation.__name__}:skipped({type(e).__name__})")
    try:
        raw = m.SerializeToString()
    except Exception as e:  # a mutation the protobuf library refuses to serialize: try the bytes path
        case.steps.append(f"unserializable:{type(e).__name__}")
        raw = BASES[base][0]().SerializeToString()
    if rng.integers(0, 4) == 0:
        raw, step = mutate_bytes(raw, rng)
        case.steps.append(step)
    case.data = raw
    return case


# -- running ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    command: str
    exit_code: int | None
    error: str = ""        # the "deploy: error: ..." line, if any
    crash: str = ""        # a traceback summary when a non-DeployerError escaped


def calib_dirs(root: Path, n: int = 5) -> dict[str, Path]:
    """One calibration folder per base model (``n`` float32 samples)."""
    out = {}
    for name, (_, shape) in BASES.items():
        d = root / f"calib_{name}"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(2)
        for i in range(n):
            np.save(d / f"{i:02d}.npy", rng.uniform(-1, 1, shape).astype(np.float32))
        out[name] = d
    return out


def run_cli(argv: list[str]) -> tuple[int | None, str, str]:
    """Run ``main(argv)`` in-process; returns (exit code or None, error line, crash summary)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except BaseException as e:  # noqa: BLE001 - anything escaping main is the finding
        if isinstance(e, (SystemExit,)) and e.code == 2:  # argparse usage error: a message, no traceback
            return 2, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "", ""
        import traceback

        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        return None, "", f"{type(e).__name__}: {' '.join(str(e).split())[:300]} at {where}"
    lines = err.getvalue().strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("deploy: error: ")]
    internal = [ln for ln in lines if ln.startswith("deploy: internal error: ")]  # exit 4: a bug caught by main
    return rc, errors[-1] if errors else "", internal[-1] if internal else ""


def run_case(case: Case, work: Path, calib: dict[str, Path]) -> list[Outcome]:
    """``deploy plan`` and ``deploy check --target tensorrt`` on one mutated model."""
    model = work / f"m{case.index}.onnx"
    model.write_bytes(case.data)
    plan = work / f"plan{case.index}.json"
    outcomes = []
    for command, argv in (
        ("plan", ["plan", "--model", str(model), "--calib", str(calib[case.base]), "--out", str(plan), "--quiet",
                  "--no-cache", "--no-bias-correction"]),
        ("check", ["check", "--target", "tensorrt", str(model), "--quiet"]),
    ):
        rc, err, crash = run_cli(argv)
        outcomes.append(Outcome(case, command, rc, err, crash))
    model.unlink(missing_ok=True)
    plan.unlink(missing_ok=True)
    return outcomes


def problems(o: Outcome) -> list[str]:
    """What is wrong with one outcome (empty: it honoured the contract)."""
    why = []
    if o.crash:
        why.append(f"traceback escaped: {o.crash}")
    elif o.exit_code not in (0, 1, 2, 3):
        why.append(f"exit code {o.exit_code}")
    elif o.exit_code in (2, 3) and not o.error:
        why.append("failed without a 'deploy: error:' line")
    return why


def fuzz(seed: int, seconds: float, count: int, work: Path, start: int = 0,
         on_outcome: Callable[[Outcome], None] | None = None) -> tuple[int, list[tuple[Outcome, list[str]]]]:
    """Run mutations ``start, start+1, ...`` until ``count`` done or ``seconds`` spent.

    Returns (mutations run, [(outcome, problems)]).
    """
    calib = calib_dirs(work)
    bad: list[tuple[Outcome, list[str]]] = []
    t0 = time.monotonic()
    done = 0
    for i in range(start, start + count):
        if time.monotonic() - t0 > seconds:
            break
        for o in run_case(make_case(seed, i), work, calib):
            if on_outcome:
                on_outcome(o)
            p = problems(o)
            if p:
                bad.append((o, p))
        done += 1
    return done, bad


# -- the CI pass -----------------------------------------------------------------------------------


def test_fuzz_plan_and_check_bounded(tmp_path: Path) -> None:
    seed = int(os.environ.get("DEPLOYER_FUZZ_SEED", "0"))
    seconds = float(os.environ.get("DEPLOYER_FUZZ_SECONDS", "100"))
    count = int(os.environ.get("DEPLOYER_FUZZ_COUNT", "1000"))
    codes: dict[str, dict[int | None, int]] = {"plan": {}, "check": {}}

    def tally(o: Outcome) -> None:
        codes[o.command][o.exit_code] = codes[o.command].get(o.exit_code, 0) + 1

    done, bad = fuzz(seed, seconds, count, tmp_path, on_outcome=tally)
    print(f"fuzz: seed {seed}, {done} mutations, exit codes {codes}")
    assert done >= min(count, 20), f"only {done} mutations ran in {seconds} s"
    report = [f"#{o.case.index} {o.case.base} {o.case.steps} {o.command}: {'; '.join(p)}" for o, p in bad[:10]]
    assert not bad, (f"{len(bad)} contract violations (seed {seed}); reproduce with "
                     f"benchmarks/fuzz_long.py --seed {seed} --only N:\n" + "\n".join(report))


def test_mutations_are_deterministic() -> None:
    assert [make_case(0, i).data for i in range(5)] == [make_case(0, i).data for i in range(5)]
    assert make_case(0, 1).data != make_case(1, 1).data


def test_unmutated_bases_pass(tmp_path: Path) -> None:
    """The fuzz harness itself: both base models plan successfully with their calibration data."""
    calib = calib_dirs(tmp_path)
    for name, (build, _) in BASES.items():
        case = Case(-1, name, [], build().SerializeToString())
        plan_outcome = run_case(case, tmp_path, calib)[0]
        assert plan_outcome.exit_code == 0 and not plan_outcome.crash, (name, plan_outcome)


# -- regression cases: crashers the fuzz pass found (fixed in the library) ---------------------------

REGRESSIONS: list[tuple[int, int, str]] = [  # (seed, index, what escaped before the fix)
    (0, 13, "onnxruntime Fail (Resize without sizes/scales) from calibration"),
    (0, 15, "ValueError from numpy_helper.to_array in check (int8 initializer with float32 payload)"),
    (0, 26, "onnxruntime Fail (Gemm dimension mismatch) from calibration"),
    (0, 61, "onnxruntime Fail (Concat axis out of range) from calibration"),
    (0, 73, "onnxruntime Fail (Add bound to float and uint8) / ValueError in check"),
    (0, 204, "onnxruntime InvalidArgument (tensor data type 99) from calibration"),
    (0, 207, "onnxruntime Fail (Conv pads of the wrong length) from calibration"),
    (0, 238, "onnxruntime Fail (opset validation) from calibration"),
    (0, 264, "onnxruntime NotImplemented (Relu at opset 1) from calibration"),
    (0, 431, "KeyError from onnx.helper.tensor_dtype_to_np_dtype (input element type 0)"),
    (0, 891, "KeyError from onnx.helper.tensor_dtype_to_np_dtype (input element type 99)"),
    (0, 6276, "UnicodeDecodeError in canonicalize (a bit flip left a node name that is not UTF-8)"),
]


@pytest.mark.parametrize("seed, index, before", REGRESSIONS, ids=[f"{s}-{i}" for s, i, _ in REGRESSIONS])
def test_fuzz_regression(tmp_path: Path, seed: int, index: int, before: str) -> None:
    case = make_case(seed, index)
    for o in run_case(case, tmp_path, calib_dirs(tmp_path)):
        assert not problems(o), (case.steps, o)


# -- issue 22: dtype and layer variants on every QDQ target; calibration folders with symlinks ---------------

VARIANT_TARGETS = "tensorrt,ascend,onnxruntime"


def test_fuzz_layer_and_dtype_variants_deploy(tmp_path: Path) -> None:
    """Seeded variants (Conv / ConvTranspose with groups 1-2, Gemm biases [N] / [1, N] / scalar, the MLP; each
    in float32, float16 or bfloat16) deploy on every QDQ target: exit 0 or 1 with a report, never a
    refusal (2) nor an internal error."""
    from reduced_models import variant, write_samples

    seed = int(os.environ.get("DEPLOYER_FUZZ_SEED", "0"))
    count = int(os.environ.get("DEPLOYER_FUZZ_VARIANTS", "10"))
    bad = []
    seen = set()
    for i in range(count):
        desc, model, shapes = variant(seed, i)
        seen.add(desc)
        d = tmp_path / f"v{i}"
        d.mkdir()
        onnx.save(model, str(d / "m.onnx"))
        write_samples(d / "calib", shapes, n=6, seed=i)
        rc, err, crash = run_cli(["--model", str(d / "m.onnx"), "--calib", str(d / "calib"), "--out", str(d / "out"),
                                  "--target", VARIANT_TARGETS, "--quiet", "--no-cache"])
        if crash or rc not in (0, 1) or not (d / "out" / "report.json").is_file():
            bad.append(f"#{i} {desc}: exit {rc} {err or crash}")
    print(f"variants: {sorted(seen)}")
    assert not bad, "\n".join(bad)


def _calib_folder_case(root: Path, rng: np.random.Generator) -> tuple[Path, bool, list[str]]:
    """A calibration folder of 3-6 good samples plus up to three stacked oddities; returns (folder, whether a bad
    symlink is inside, the oddities)."""
    d = root / "calib"
    d.mkdir(parents=True)
    n = int(rng.integers(3, 7))
    for i in range(n):
        np.save(d / f"{i:02d}.npy", rng.uniform(-1, 1, (1, 8)).astype(np.float32))
    outside = root / "outside.npy"
    np.save(outside, np.zeros((1, 8), np.float32))
    steps, bad_link = [], False
    for k in range(int(rng.integers(0, 4))):
        what = str(rng.choice(["self_loop", "pair_loop", "outside_link", "dangling", "inside_link", "foreign_text",
                               "foreign_dir", "subfolder_link"]))
        steps.append(what)
        name = f"z{k}"
        if what == "self_loop":
            (d / f"{name}.npy").symlink_to(f"{name}.npy")
            bad_link = True
        elif what == "pair_loop":
            (d / f"{name}a.npy").symlink_to(f"{name}b.npy")
            (d / f"{name}b.npy").symlink_to(f"{name}a.npy")
            bad_link = True
        elif what == "outside_link":
            (d / f"{name}.npy").symlink_to(outside)
            bad_link = True
        elif what == "dangling":
            (d / f"{name}.npy").symlink_to(root / "gone.npy")
            bad_link = True
        elif what == "inside_link":
            (d / f"{name}.npy").symlink_to("00.npy")
        elif what == "foreign_text":
            (d / f"{name}.txt").write_text("not a sample")
        elif what == "foreign_dir":
            (d / name).mkdir()
        else:
            (d / name).symlink_to(root)  # a folder link (not followed)
    return d, bad_link, steps


def test_fuzz_calibration_folders_with_symlinks(tmp_path: Path) -> None:
    """Symlink loops, links outside, dangling links among the samples are an error naming the file (exit 2,
    one line), never a silent skip; harmless extras (text files, folders, links inside) deploy."""
    from reduced_models import gemm_bias

    seed = int(os.environ.get("DEPLOYER_FUZZ_SEED", "0"))
    count = int(os.environ.get("DEPLOYER_FUZZ_FOLDERS", "12"))
    model = tmp_path / "m.onnx"
    onnx.save(gemm_bias((5,)), str(model))
    bad = []
    for i in range(count):
        rng = np.random.default_rng([seed, 22, i])
        root = tmp_path / f"c{i}"
        folder, bad_link, steps = _calib_folder_case(root, rng)
        out = root / "plan.json"
        rc, err, crash = run_cli(["plan", "--model", str(model), "--calib", str(folder), "--out", str(out), "--quiet",
                                  "--no-cache"])
        want = 2 if bad_link else 0
        if crash or rc != want or (want == 2 and ("symlink" not in err or out.exists())):
            bad.append(f"#{i} {steps}: exit {rc} (want {want}) {err or crash}")
    assert not bad, "\n".join(bad)
