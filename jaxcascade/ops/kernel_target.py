"""Which variant of the C++ CPU kernels this CPU gets, and whether jaxcascade uses them (pure; no JAX).

The kernels keep blocks of outputs in vector registers (kernels/simd.h), so they are compiled per vector
width: `avx512` (32 registers of 16 floats), `avx2` (AVX2 + FMA: 16 of 8), `neon` (ARM: 32 of 4) and
`generic` (x86 without AVX2: 16 of 4). The variant is the CPU's best unless JAXCASCADE_CPU_KERNEL_ISA names
another it can run (e.g. `avx2` on an AVX-512 CPU, so that CI there tests the AVX2 variant too).

Whether they are used: JAXCASCADE_CPU_KERNEL=0/1 decides; by default, on the CPU classes where they were
measured faster than XLA's GEMM formulations (`DEFAULT_ON`), and whenever JAXCASCADE_CPU_KERNEL_ISA asks
for a variant.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

KERNEL_ENV = "JAXCASCADE_CPU_KERNEL"
ISA_ENV = "JAXCASCADE_CPU_KERNEL_ISA"
ISAS = ("avx512", "avx2", "neon", "generic")
# The variants measured faster than XLA's GEMMs on their CPU class (docs/benchmarks.md names the CPUs).
# AVX2 was measured as an AVX2 CPU runs, on an AVX-512 one: benchmarks.common.force_isa. NEON and SSE compile
# and pass the kernel tests (tests/test_kernel_variants.py) but have not been timed on such a CPU.
DEFAULT_ON = ("avx512", "avx2")
# Compiler flags per variant on top of -O3; the C++ reads the vector width from the compiler's macros.
# `avx2` turns AVX-512 off explicitly, so that it is the AVX2 code on an AVX-512 CPU too.
_FLAGS = {"avx512": ("-march=native",), "avx2": ("-march=native", "-mno-avx512f", "-mavx2", "-mfma"),
          "neon": ("-mcpu=native",), "generic": ("-march=native", "-mno-avx")}
_CLASS = {"avx512": "AVX-512", "avx2": "AVX2", "neon": "ARM (NEON)", "generic": "other (no AVX2)"}
_X86 = ("x86_64", "AMD64", "i686")
_ARM = ("aarch64", "arm64")


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What this CPU gets: the variant built, whether it is used, and why (one line)."""

    isa: str
    use: bool
    reason: str


def cpu_flags() -> set[str]:
    """The first processor's flags (x86) or features (ARM) from /proc/cpuinfo; empty where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_isa(machine: str, flags: set[str]) -> str:
    """The widest variant this CPU runs."""
    if machine in _ARM:
        return "neon"
    if machine in _X86 and "avx512f" in flags:
        return "avx512"
    if machine in _X86 and {"avx2", "fma"} <= flags:
        return "avx2"
    return "generic"


def runs_on(isa: str, machine: str, flags: set[str]) -> bool:
    """Whether this CPU can run the variant."""
    if isa == "generic":
        return True
    if isa == "neon":
        return machine in _ARM
    return ISAS.index(native_isa(machine, flags)) <= ISAS.index(isa) and machine in _X86


def cpu_class(isa: str) -> str:
    """The CPU class a variant stands for, as the docs name it."""
    return _CLASS[isa]


def compile_flags(isa: str, machine: str) -> tuple[str, ...]:
    if isa == "generic" and machine not in _X86:
        return ()
    return _FLAGS[isa]


def choose(setting: str, forced_isa: str, machine: str, flags: set[str]) -> KernelChoice:
    """The variant and whether to use it, from JAXCASCADE_CPU_KERNEL (setting), JAXCASCADE_CPU_KERNEL_ISA
    (forced_isa) and the CPU."""
    setting, forced_isa = setting.strip().lower(), forced_isa.strip().lower()
    isa = native_isa(machine, flags)
    if forced_isa:
        if forced_isa not in ISAS:
            return KernelChoice(isa, False, f"{ISA_ENV}={forced_isa} is not one of {', '.join(ISAS)}")
        if not runs_on(forced_isa, machine, flags):
            return KernelChoice(forced_isa, False, f"{ISA_ENV}={forced_isa}: this CPU cannot run it "
                                                   f"(it is {cpu_class(isa)})")
        isa = forced_isa
    if setting in ("0", "off", "false", "no"):
        return KernelChoice(isa, False, f"disabled by {KERNEL_ENV}={setting}")
    if setting in ("1", "on", "true", "yes"):
        return KernelChoice(isa, True, f"forced on by {KERNEL_ENV}={setting}")
    if forced_isa:
        return KernelChoice(isa, True, f"the {isa} variant, asked for by {ISA_ENV}")
    if isa in DEFAULT_ON:
        return KernelChoice(isa, True, f"{cpu_class(isa)} CPU: the kernels are faster than XLA's GEMMs here")
    return KernelChoice(isa, False, f"{cpu_class(isa)} CPU: the kernels have not been measured faster than "
                                    f"XLA's GEMMs here ({KERNEL_ENV}=1 forces them)")


def this_machine() -> KernelChoice:
    """`choose` for this process's environment and CPU."""
    return choose(os.environ.get(KERNEL_ENV, ""), os.environ.get(ISA_ENV, ""), platform.machine(), cpu_flags())
