"""The CPU's integer instruction set, and the ONNX Runtime kernel flavour that is exact and fastest on it.

Detection reads ``/proc/cpuinfo`` (x86: the ``flags`` line; ARM: ``Features``) and ``platform.machine()``.
The instruction set (``isa``) is the best int8 dot-product path the CPU has, in this order:

==============  ======================================  ===============================================
isa             flag(s)                                 int8 dot product used by ONNX Runtime (MLAS)
==============  ======================================  ===============================================
``amx``         ``amx_int8`` (+ ``amx_tile``)           AMX tiles (int32 accumulation)
``avx512-vnni`` ``avx512_vnni``                         ``vpdpbusd`` u8 x s8 -> int32
``avx-vnni``    ``avx_vnni``                            ``vpdpbusd`` (VEX) u8 x s8 -> int32
``avx512``      ``avx512bw`` without VNNI               ``vpmaddubsw``: u8 x s8 pair sums in **int16**
``avx2``        ``avx2`` without VNNI                   ``vpmaddubsw`` (as above)
``x86-64``      neither                                 SSE widening (no saturation, slow)
``arm64``       ``aarch64``/``arm64`` machine           ``sdot``/``udot`` with ``asimddp``, else widening
==============  ======================================  ===============================================

Flavour rule (:func:`choose_flavour`), per instruction set, for the ``onnxruntime`` target:

- VNNI / AMX: **U8S8, 8-bit weights** (uint8 activations, int8 symmetric weights). The int32 dot product
  cannot saturate, so the fused kernels compute exactly the plan's Q/DQ arithmetic; measured here
  (Xeon with AVX-512 VNNI and AMX-INT8, ONNX Runtime 1.32, EfficientNet-Lite0, batch 1, 1 thread,
  per-call alternation): U8S8 1.55x FP32 (1.72x with the classifier Gemm fused, see the backend)
  vs U8U8 0.62x; S8S8 0.99x (DESIGN.md 6).
- AVX2 / AVX-512 without VNNI: ``vpmaddubsw`` adds two u8 x s8 products in int16, which saturates for
  8-bit weights (255 x 127 x 2 > 32767). Static mode: **U8U8** (weights stored as uint8 with zero point
  128; ONNX Runtime widens to int16 before multiplying, never saturates): measured on a 2-core AVX2 EPYC,
  EfficientNet-Lite0, 300 held-out crops, top-1 agreement 0.967 (U8S8 with 7-bit weights 0.843), 1.06x
  FP32 (batch 1, 1 thread). Dynamic mode: **U8S8 with 7-bit weights** (``reduce_range``: 255 x 63 x 2 <
  32767; ONNX Runtime's own remedy), faster than U8U8 in MatMulInteger there (1.77x vs 1.43x, MiniLM).
- ARM64: **S8S8** (int8 activations and weights): MLAS's ARM kernels accumulate in int32 (``sdot`` with
  the dot-product extension, widening multiplies without it), so no saturation; S8S8 is their native
  signed path.

Per-tensor vs per-channel weights: measured per layer on this Xeon (ONNX Runtime profiler, 40 runs,
EfficientNet-Lite0), QLinearConv took the same time with per-tensor and per-channel weights (9.26 vs
8.96 ms per image in total; no layer differed by more than 6 microseconds), and in alternation the whole
model ran at 1.55x FP32 either way, while per-tensor weights cut top-1 agreement from 0.975 to 0.567
(120 held-out crops). Rule: **per-channel weights on every layer** (``per_channel=True``): per-tensor
weights never change speed more than fidelity here. The gap reported earlier for ONNX Runtime's own
graphs (per-tensor 1.67x vs per-channel 1.50x) was not reproduced: in benchmarks/results/onnxruntime.md
both ran at 1.07-1.08x (same op counts; 14 Conv left in FP32 by its default placement).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.errors import BadInputError

ISAS = ("amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "x86-64", "arm64")
"""Instruction sets known here, best x86 path first."""
CPU_CHOICES = ("auto", "avx2", "avx512", "avx512-vnni", "avx-vnni", "amx", "arm64")
"""Values of ``--cpu`` (``auto``: the build machine)."""
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp")
"""The /proc/cpuinfo flags that decide the int8 kernel path (reported as ``cpu_flags``)."""
VNNI_ISAS = frozenset({"amx", "avx512-vnni", "avx-vnni"})


@dataclass(frozen=True)
class CpuInfo:
    """What the build machine is.

    Attributes:
        model: CPU model name (``model name`` in /proc/cpuinfo; empty where unknown).
        machine: ``platform.machine()`` (``x86_64``, ``aarch64`` ...).
        flags: the :data:`INT8_FLAGS` present, sorted.
        isa: the best int8 path (one of :data:`ISAS`).
    """

    model: str
    machine: str
    flags: tuple[str, ...]
    isa: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "flags": list(self.flags), "isa": self.isa}


@dataclass(frozen=True)
class KernelFlavour:
    """How the ``onnxruntime`` target stores a plan's INT8 nodes for one instruction set.

    Attributes:
        name: ``u8s8`` | ``u8s8-reduce-range`` | ``u8u8`` | ``s8s8``.
        isa: the instruction set it was chosen for (one of :data:`ISAS`).
        why: one sentence: the reason (the report's ``kernel_flavour.why``).
        activation_dtype: ``uint8`` | ``int8`` (the zero-point dtype of every activation QuantizeLinear).
        weight_dtype: ``int8`` (symmetric, zero point 0) | ``uint8`` (the same values + 128, zero point 128).
        reduce_range: 7-bit weights (|q| <= 63) instead of 8-bit (|q| <= 127).
        per_channel: per-output-channel weight scales where the plan asks for them.
    """

    name: str
    isa: str
    why: str
    activation_dtype: str
    weight_dtype: str
    reduce_range: bool
    per_channel: bool = True

    @property
    def kernels(self) -> str:
        """The backend's kernel pair name: ``u8s8``, ``u8u8`` or ``s8s8``."""
        return self.name.split("-")[0]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "isa": self.isa, "why": self.why, "activation_dtype": self.activation_dtype,
                "weight_dtype": self.weight_dtype, "reduce_range": self.reduce_range,
                "weight_bits": 7 if self.reduce_range else 8, "per_channel": self.per_channel}


def isa_from_flags(flags: set[str] | frozenset[str], machine: str) -> str:
    """The best int8 path for these /proc/cpuinfo flags on this ``platform.machine()`` (see module table)."""
    m = machine.lower()
    if m in ("aarch64", "arm64") or m.startswith("armv8"):
        return "arm64"
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "x86-64"


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """:class:`CpuInfo` from the text of /proc/cpuinfo (the first processor's ``flags``/``Features``)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return CpuInfo(model, machine, tuple(sorted(f for f in flags if f in INT8_FLAGS)), isa_from_flags(flags, machine))


def detect(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """The build machine's :class:`CpuInfo` (no /proc/cpuinfo, e.g. macOS: from ``platform`` only)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())


def parse_cpu(value: str | None) -> str:
    """Validate a ``--cpu`` value (None = ``auto``); returns it normalized (lower case, ``_`` -> ``-``).

    Raises:
        BadInputError: not one of :data:`CPU_CHOICES`.
    """
    v = (value or "auto").strip().lower().replace("_", "-")
    v = {"aarch64": "arm64", "avx512vnni": "avx512-vnni", "avxvnni": "avx-vnni", "amx-int8": "amx"}.get(v, v)
    if v not in CPU_CHOICES:
        raise BadInputError(f"--cpu {value!r}: use one of {', '.join(CPU_CHOICES)}")
    return v


def resolve_isa(cpu: str | None, build: CpuInfo | None = None) -> str:
    """The instruction set to build for: ``cpu`` (a ``--cpu`` value) or, for ``auto``, the build machine's."""
    v = parse_cpu(cpu)
    return (build or detect()).isa if v == "auto" else v


def choose_flavour(isa: str, mode: str = "static") -> KernelFlavour:
    """The ``onnxruntime`` kernel flavour for instruction set ``isa`` (see the module docstring for the
    measurements behind each choice).

    Args:
        isa: one of :data:`ISAS`.
        mode: ``static`` (QDQ from the plan's ranges) or ``dynamic`` (activations quantized at run time).

    Raises:
        BadInputError: unknown ``isa``.
    """
    if isa not in ISAS:
        raise BadInputError(f"instruction set {isa!r}: use one of {', '.join(ISAS)}")
    if isa in VNNI_ISAS:
        return KernelFlavour("u8s8", isa, f"{isa}: int8 dot products accumulate in int32 (no int16 saturation), so "
                             f"U8S8 with 8-bit weights is exact and ONNX Runtime's fastest int8 path",
                             "uint8", "int8", reduce_range=False)
    if isa == "arm64" and mode == "dynamic":
        return KernelFlavour("u8s8", isa, "arm64, dynamic mode: DynamicQuantizeLinear yields uint8 activations only; "
                             "ONNX Runtime's ARM kernels accumulate in int32, so 8-bit weights are exact",
                             "uint8", "int8", reduce_range=False)
    if isa == "arm64":
        return KernelFlavour("s8s8", isa, "arm64: ONNX Runtime's ARM int8 kernels accumulate in int32 (sdot with "
                             "asimddp, widening multiplies without); S8S8 is their native path",
                             "int8", "int8", reduce_range=False)
    if mode == "dynamic":
        return KernelFlavour("u8s8-reduce-range", isa, f"{isa} without VNNI: u8 x s8 pair sums are 16-bit "
                             f"(vpmaddubsw) and saturate with 8-bit weights; 7-bit weights keep U8S8 exact and "
                             f"MatMulInteger faster than U8U8", "uint8", "int8", reduce_range=True)
    return KernelFlavour("u8u8", isa, f"{isa} without VNNI: U8S8 pair sums are 16-bit (vpmaddubsw) and saturate "
                         f"with 8-bit weights; U8U8 widens before multiplying (exact, 8-bit weights) and kept more "
                         f"fidelity than 7-bit U8S8 weights (0.967 vs 0.843 top-1, EfficientNet-Lite0)",
                         "uint8", "uint8", reduce_range=False)


def exact_on(flavour: KernelFlavour, host_isa: str) -> bool:
    """Does ``flavour`` compute its Q/DQ arithmetic exactly on a CPU whose best path is ``host_isa``?
    (U8S8 and S8S8 with 8-bit weights need VNNI/AMX on x86, where MLAS turns S8 activations into U8 and
    takes the same 16-bit pair-sum path; every other flavour is exact everywhere.)"""
    if flavour.kernels in ("u8s8", "s8s8") and not flavour.reduce_range:
        return host_isa in VNNI_ISAS or host_isa == "arm64"
    return True


__all__ = ["CPU_CHOICES", "ISAS", "CpuInfo", "KernelFlavour", "choose_flavour", "detect", "exact_on",
           "isa_from_flags", "parse_cpu", "parse_cpuinfo", "resolve_isa"]
