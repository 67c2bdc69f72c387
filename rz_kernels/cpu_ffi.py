"""The C++ CPU kernels (rz_kernels/cpu/): the variant this CPU runs, loaded and registered with XLA's FFI.

The variants are compiled when the package is installed (rz_kernels/build.py; in a checkout,
`python -m rz_kernels build`), so nothing is compiled at run time. The first variant in
rz_kernels.build.VARIANTS that the CPU has and that was built is the one used; RZ_CPU_VARIANT=name
forces one (to compare them), RZ_CPU_KERNELS=0 none, and RZ_CPU_KERNEL_DIR=dir loads them from dir
(the emulated aarch64 tests' cross-compiled ones). Without one (an x86-64 CPU without AVX2, an
aarch64 CPU without the dot-product instructions, an install with RZ_BUILD_CPU_KERNELS=0)
`available()` is False and callers take their XLA paths. Dispatch must be right: an instruction the
CPU lacks kills the process with SIGILL.

Each loaded variant's handlers are registered under their own names (`rz_qmatmul_<variant>`,
`rz_qmatmul_layer_<variant>`, `rz_sample_draw_<variant>`, `rz_qmatmul_experts_<variant>` on x86-64, ...), so tests can run every
variant the CPU has side by side in one process.
"""

import ctypes
import logging
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jax

from rz_kernels.build import Variant, machine, variant_named, variants_for

log = logging.getLogger("rz_kernels")


class StaleKernelsError(RuntimeError):
    """A checkout's sources changed since its kernels were built."""


@dataclass(frozen=True)
class ArmFeature:
    """Where an OS reports one aarch64 CPU feature: Linux's arm64 hwcap bit
    (arch/arm64/include/uapi/asm/hwcap.h) in an auxiliary vector entry, and macOS's sysctl key."""

    auxv_entry: int
    bit: int
    sysctl: str


AT_HWCAP, AT_HWCAP2 = 16, 26
ARM_FEATURES: dict[str, ArmFeature] = {
    "asimdhp": ArmFeature(AT_HWCAP, 1 << 10, "hw.optional.arm.FEAT_FP16"),  # half-precision SIMD (+fp16)
    "asimddp": ArmFeature(AT_HWCAP, 1 << 20, "hw.optional.arm.FEAT_DotProd"),  # SDOT/UDOT (+dotprod)
    "i8mm": ArmFeature(AT_HWCAP2, 1 << 13, "hw.optional.arm.FEAT_I8MM"),  # SMMLA (+i8mm)
}


def _sysctl_flag(libc: ctypes.CDLL, key: str) -> bool:
    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    return libc.sysctlbyname(key.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0 and value.value == 1


def _arm_features() -> frozenset[str]:
    """ARM_FEATURES this aarch64 CPU has. On Linux from the kernel's auxiliary vector (the bits
    /proc/cpuinfo's Features line prints; under qemu-user emulation that line is absent while the
    auxiliary vector reflects the emulated CPU, $QEMU_CPU); on macOS from sysctl's
    hw.optional.arm.FEAT_* keys (written for it, not yet run on a Mac)."""
    libc = ctypes.CDLL(None)
    if platform.system() == "Darwin":
        return frozenset(name for name, feature in ARM_FEATURES.items() if _sysctl_flag(libc, feature.sysctl))
    if platform.system() != "Linux":
        return frozenset()
    getauxval = libc.getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = (ctypes.c_ulong,)
    words = {entry: getauxval(entry) for entry in (AT_HWCAP, AT_HWCAP2)}
    return frozenset(name for name, feature in ARM_FEATURES.items() if words[feature.auxv_entry] & feature.bit)


def _x86_features() -> frozenset[str]:
    """/proc/cpuinfo's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature names as VARIANTS spell them (x86-64: /proc/cpuinfo's flags; aarch64: ARM_FEATURES)."""
    return {"x86_64": _x86_features, "aarch64": _arm_features}.get(machine(), frozenset)()


def runnable(variant: Variant) -> bool:
    """Whether this CPU can run the variant."""
    return variant.machine == machine() and set(variant.cpu_features) <= cpu_features()


def why_not_runnable(variant: Variant) -> str | None:
    """Why this CPU cannot run the variant (a test's skip reason), or None where it can."""
    if variant.machine != machine():
        return f"the {variant.name} variant is for {variant.machine}, this is {machine()}"
    missing = sorted(set(variant.cpu_features) - cpu_features())
    return f"the CPU lacks {', '.join(missing)} (the {variant.name} variant needs them)" if missing else None


def has_bf16_values(variant: Variant) -> bool:
    """Whether the variant's prompt attention can multiply its weights by V in bf16 pairs on this
    CPU: an AVX-512 build (which compiles those functions for AVX-512 BF16 apart) on a CPU with it."""
    return "avx512f" in variant.cpu_features and "avx512_bf16" in cpu_features()


def has_int16_scores(variant: Variant) -> bool:
    """Whether the variant's prompt attention can multiply queries by keys in int16 pairs: an AVX-512
    VNNI build (every CPU that runs it has the instruction)."""
    return "avx512_vnni" in variant.cpu_features


def built(variant: Variant) -> bool:
    return variant.library.exists()


def _check_fresh(variant: Variant) -> None:
    """In a checkout (sources beside the library), a library older than its sources is an error."""
    inputs = variant.inputs()
    if not all(path.exists() for path in inputs):
        return  # an installed wheel: no sources to compare
    newer = [path.name for path in inputs if path.stat().st_mtime > variant.library.stat().st_mtime]
    if newer:
        raise StaleKernelsError(
            f"{variant.library} is older than its sources ({', '.join(newer)}): "
            "rebuild the CPU kernels with `python -m rz_kernels build` (or reinstall the package)"
        )


@cache
def selected() -> Variant | None:
    """The variant this process runs: RZ_CPU_VARIANT's, else the best built one the CPU has."""
    if os.environ.get("RZ_CPU_KERNELS", "1") == "0":
        log.info("rz_kernels: C++ CPU kernels disabled by RZ_CPU_KERNELS=0")
        return None
    forced = os.environ.get("RZ_CPU_VARIANT")
    if forced:
        variant = variant_named(forced)
        reason = why_not_runnable(variant) or (None if built(variant) else f"{variant.library} is not built")
        if reason:
            raise RuntimeError(f"RZ_CPU_VARIANT={forced}: {reason}")
        return variant
    candidates = [v for v in variants_for() if runnable(v)]
    for variant in candidates:
        if built(variant):
            return variant
    if candidates:
        log.warning("rz_kernels: no C++ CPU kernel library is built (%s); quantized matmuls take slower XLA paths. "
                    "Build them with `python -m rz_kernels build` or reinstall without RZ_BUILD_CPU_KERNELS=0",
                    ", ".join(v.name for v in candidates))
    else:
        log.info("rz_kernels: no C++ CPU kernel variant runs on this CPU (%s); quantized matmuls take XLA paths", machine())
    return None


def selected_name() -> str | None:
    """The name of the variant this process runs, or None where it takes XLA's paths (for reports:
    decided from the CPU and the environment, no JAX backend starts)."""
    variant = selected()
    return variant.name if variant else None


def qmatmul_target(variant: Variant) -> str:
    return f"rz_qmatmul_{variant.name}"


def qmatmul_layer_target(variant: Variant) -> str:
    return f"rz_qmatmul_layer_{variant.name}"


def attention_target(variant: Variant) -> str:
    return f"rz_attention_{variant.name}"


def prompt_attention_target(variant: Variant) -> str:
    return f"rz_prompt_attention_{variant.name}"


def sample_draw_target(variant: Variant) -> str:
    return f"rz_sample_draw_{variant.name}"


def zero_pages_target(variant: Variant) -> str:
    return f"rz_zero_pages_{variant.name}"


def write_rows_target(variant: Variant) -> str:
    return f"rz_write_rows_{variant.name}"


def write_positions_target(variant: Variant) -> str:
    return f"rz_write_positions_{variant.name}"


def experts_target(variant: Variant) -> str:
    return f"rz_qmatmul_experts_{variant.name}"


def has_experts_kernel(variant: Variant) -> bool:
    """Whether the variant has the mixture of experts' matmul (qmatmul_moe.cc: the x86-64 ones; the
    NEON ones do not, and their experts take XLA's paths)."""
    return variant.machine == "x86_64"


@cache
def load(variant: Variant) -> ctypes.CDLL:
    """A variant's library, loaded and its FFI targets registered with XLA (the CPU must run it)."""
    _check_fresh(variant)
    lib = ctypes.CDLL(str(variant.library))
    lib.rz_stream_read_gbps.restype = ctypes.c_double
    lib.rz_stream_read_gbps.argtypes = (ctypes.c_int64, ctypes.c_int32, ctypes.c_int32)
    lib.rz_int8_dot_peak_gmacs.restype = ctypes.c_double
    lib.rz_int8_dot_peak_gmacs.argtypes = (ctypes.c_int32, ctypes.c_int32)
    jax.ffi.register_ffi_target(qmatmul_target(variant), jax.ffi.pycapsule(lib.RzQMatmul), platform="cpu")
    jax.ffi.register_ffi_target(qmatmul_layer_target(variant), jax.ffi.pycapsule(lib.RzQMatmulLayer), platform="cpu")
    jax.ffi.register_ffi_target(attention_target(variant), jax.ffi.pycapsule(lib.RzAttention), platform="cpu")
    jax.ffi.register_ffi_target(prompt_attention_target(variant), jax.ffi.pycapsule(lib.RzPromptAttention), platform="cpu")
    jax.ffi.register_ffi_target(sample_draw_target(variant), jax.ffi.pycapsule(lib.RzSampleDraw), platform="cpu")
    jax.ffi.register_ffi_target(zero_pages_target(variant), jax.ffi.pycapsule(lib.RzZeroPages), platform="cpu")
    jax.ffi.register_ffi_target(write_rows_target(variant), jax.ffi.pycapsule(lib.RzWriteRows), platform="cpu")
    jax.ffi.register_ffi_target(write_positions_target(variant), jax.ffi.pycapsule(lib.RzWritePositions), platform="cpu")
    if has_experts_kernel(variant):
        jax.ffi.register_ffi_target(experts_target(variant), jax.ffi.pycapsule(lib.RzQMatmulExperts), platform="cpu")
    log.info("rz_kernels: loaded the C++ CPU kernels (%s) from %s", variant.name, variant.library)
    return lib


def available() -> bool:
    """Whether a variant of the C++ CPU kernels runs here."""
    variant = selected()
    return variant is not None and load(variant) is not None


def active(variant: Variant | None = None) -> Variant:
    """`variant`, loaded, or the selected one; RuntimeError where there is none."""
    variant = variant or selected()
    if variant is None:
        raise RuntimeError("the C++ CPU kernels are not available here (see the rz_kernels log)")
    load(variant)
    return variant


def stream_read_gbps(nbytes: int = 256 << 20, threads: int | None = None, repeats: int = 10) -> float:
    """Memory bandwidth by a streaming SIMD read (AVX2, or NEON on aarch64) of nbytes, best of `repeats`, in GB/s."""
    return load(active()).rz_stream_read_gbps(nbytes, threads or os.cpu_count() or 1, repeats)


def int8_dot_peak_gmacs(threads: int | None = None, repeats: int = 5) -> float:
    """The int8 MAC rate of the quantized matmul's inner step (the variant's int8 dot: VNNI, maddubs or sdot;
    convert, FMA), best of `repeats`."""
    return load(active()).rz_int8_dot_peak_gmacs(threads or os.cpu_count() or 1, repeats)

