"""The aarch64 variants of the C++ CPU kernels (rz_kernels/cpu/*_neon.cc), and the CPU features that pick one.

A variant is one shared library built from a source list with its own compiler flags; every variant
exports what the x86 library exports (the FFI handlers RzQMatmul and RzAttention, the probes
rz_stream_read_gbps and rz_int8_dot_peak_gmacs), so cpu_ffi loads whichever the CPU can run.
Variants are listed best first; the first whose features the CPU has is taken, and a CPU with none
of them (a Cortex-A72: no dot-product instructions) takes the XLA paths. Dispatch must be right:
an i8mm instruction on a CPU without i8mm kills the process with SIGILL.

On Linux, features come from the kernel's auxiliary vector (getauxval(AT_HWCAP), getauxval(AT_HWCAP2)),
the same bits the kernel prints in /proc/cpuinfo's Features line; under qemu-user emulation that line
is absent while the auxiliary vector reflects the emulated CPU ($QEMU_CPU). On macOS (arm64) they
come from sysctl's hw.optional.arm.FEAT_* keys (written for it, not yet run on a Mac).
"""

import ctypes
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its sources (in rz_kernels/cpu), flags and the CPU features it needs."""

    name: str
    machine: str  # platform.machine() of the CPUs it runs on
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    flags: tuple[str, ...]
    features: tuple[str, ...]


@dataclass(frozen=True)
class Feature:
    """Where an OS reports one CPU feature: Linux's arm64 hwcap bit (arch/arm64/include/uapi/asm/hwcap.h)
    in an auxiliary vector entry, and macOS's sysctl key."""

    auxv_entry: int
    bit: int
    sysctl: str


AT_HWCAP, AT_HWCAP2 = 16, 26
FEATURES: dict[str, Feature] = {
    "asimdhp": Feature(AT_HWCAP, 1 << 10, "hw.optional.arm.FEAT_FP16"),  # half-precision SIMD (+fp16)
    "asimddp": Feature(AT_HWCAP, 1 << 20, "hw.optional.arm.FEAT_DotProd"),  # SDOT/UDOT (+dotprod)
    "i8mm": Feature(AT_HWCAP2, 1 << 13, "hw.optional.arm.FEAT_I8MM"),  # SMMLA (+i8mm)
}

_SOURCES = ("qmatmul_neon.cc", "attention_neon.cc", "machine_neon.cc")
_HEADERS = ("simd_neon.h", "threads.h")
# -ffp-contract=off: every float multiply-add the kernels mean to fuse is an explicit vfmaq/fma, so
# a row's output takes the same operations whichever tile computed it.
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-pthread")

VARIANTS: tuple[Variant, ...] = (
    Variant("neon_i8mm", "aarch64", _SOURCES, _HEADERS, (*_FLAGS, "-march=armv8.2-a+dotprod+fp16+i8mm"), ("asimddp", "asimdhp", "i8mm")),
    Variant("neon_dotprod", "aarch64", _SOURCES, _HEADERS, (*_FLAGS, "-march=armv8.2-a+dotprod+fp16"), ("asimddp", "asimdhp")),
)


def _sysctl_flag(libc: ctypes.CDLL, key: str) -> bool:
    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    return libc.sysctlbyname(key.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0 and value.value == 1


def cpu_features() -> frozenset[str]:
    """The FEATURES this aarch64 CPU has, as its OS reports them (Linux, macOS); empty elsewhere."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return frozenset()
    libc = ctypes.CDLL(None)
    if platform.system() == "Darwin":
        return frozenset(name for name, feature in FEATURES.items() if _sysctl_flag(libc, feature.sysctl))
    if platform.system() != "Linux":
        return frozenset()
    getauxval = libc.getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = (ctypes.c_ulong,)
    words = {entry: getauxval(entry) for entry in (AT_HWCAP, AT_HWCAP2)}
    return frozenset(name for name, feature in FEATURES.items() if words[feature.auxv_entry] & feature.bit)


def select(features: frozenset[str]) -> Variant | None:
    """The best variant whose features are all in `features`, or None."""
    return next((v for v in VARIANTS if set(v.features) <= features), None)
