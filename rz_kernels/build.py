"""The C++ CPU kernels' variants, and how each is compiled: at install (setup.py), or in a checkout by

    python -m rz_kernels build          # this machine's variants, into rz_kernels/lib/

A variant is one shared library built from its sources with its own flags; the SIMD code picks its
instructions at compile time from the compiler's macros (`__AVX512VNNI__`, `__AVXVNNI__`,
`__ARM_FEATURE_DOTPROD`, ...). Every variant exports the same symbols: the FFI handlers RzQMatmul,
RzQMatmulLayer (one layer's weights, picked at run time), RzAttention, RzPromptAttention and
RzSampleDraw (the sampler's truncation and draw), and
the machine probes rz_stream_read_gbps and rz_int8_dot_peak_gmacs; the x86-64 ones also RzQMatmulExperts (a mixture of experts' matmul; aarch64 takes XLA's paths there). At run time
rz_kernels.cpu_ffi loads the first variant in VARIANTS that the CPU can run.

This module uses the standard library only: setup.py loads it by path, before jax or rz exist in
the build environment. It also cross-compiles another machine's variants (the emulated aarch64
tests build the NEON ones with aarch64-linux-gnu-g++):

    python -m rz_kernels build --machine aarch64 --cxx aarch64-linux-gnu-g++ --output DIR

and RZ_CPU_KERNEL_DIR=DIR points rz_kernels.cpu_ffi at such a directory instead of rz_kernels/lib/.
"""

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "cpu"
LIBRARY_DIR = Path(__file__).parent / "lib"
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-pthread")
X86_SOURCES = ("qmatmul.cc", "qmatmul_moe.cc", "attention.cc", "attention_prompt.cc", "sample_draw.cc", "zero_pages.cc", "cache_write.cc", "machine.cc")
X86_HEADERS = ("qmatmul.h", "layer_weights.h", "simd.h", "threads.h", "machine_probe.h", "attention_kv.h", "attention_decode.h")
NEON_SOURCES = ("qmatmul_neon.cc", "attention_neon.cc", "attention_prompt.cc", "sample_draw.cc", "zero_pages.cc", "cache_write.cc", "machine_neon.cc")
NEON_HEADERS = ("layer_weights.h", "simd_neon.h", "threads.h", "machine_probe.h", "attention_kv.h", "attention_decode.h")
# -ffp-contract=off: every float multiply-add the NEON kernels mean to fuse is an explicit vfmaq/fma,
# so a row's output takes the same operations whichever tile computed it (and both NEON variants
# give the same bits).
NEON_FLAGS = ("-ffp-contract=off",)
AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
AVX2_FEATURES = ("avx2", "fma", "f16c")


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its sources (under rz_kernels/cpu/), compiler flags, and the CPU
    features it needs (/proc/cpuinfo flags on x86-64; getauxval HWCAP names on aarch64)."""

    name: str
    machine: str  # "x86_64" or "aarch64", as normalized by machine()
    sources: tuple[str, ...]
    flags: tuple[str, ...]
    cpu_features: tuple[str, ...]
    headers: tuple[str, ...] = ()  # the sources' own headers (a change to one rebuilds the library)

    @property
    def library(self) -> Path:
        return library_dir() / f"rz_cpu_{self.name}.so"

    def inputs(self) -> list[Path]:
        """The files the library is compiled from: its sources and their headers."""
        return [SOURCE_DIR / name for name in self.sources + self.headers]


# Best first, per machine: run time takes the first one the CPU has. The two VNNI variants run
# the same 256-bit code; they are separate libraries because the CPUs that have one often lack
# the other (Zen 4 and Ice Lake servers: AVX-512 VNNI only; Alder Lake and later clients: AVX-VNNI
# only). The AVX-512 one is compiled with AVX-512VL, which also gives the compiler 32 registers.
# On aarch64 the dot-product instructions are the floor (a Cortex-A72 without them takes the XLA
# paths); i8mm adds SMMLA for two activation rows at a time (Graviton 3, Apple M2 and later).
VARIANTS: tuple[Variant, ...] = (
    Variant(
        "avx512vnni",
        "x86_64",
        X86_SOURCES,
        AVX2_FLAGS + ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"),
        AVX2_FEATURES + ("avx512f", "avx512vl", "avx512bw", "avx512_vnni"),
        X86_HEADERS,
    ),
    Variant("avxvnni", "x86_64", X86_SOURCES, AVX2_FLAGS + ("-mavxvnni",), AVX2_FEATURES + ("avx_vnni",), X86_HEADERS),
    Variant("avx2", "x86_64", X86_SOURCES, AVX2_FLAGS, AVX2_FEATURES, X86_HEADERS),
    Variant(
        "neon_i8mm",
        "aarch64",
        NEON_SOURCES,
        NEON_FLAGS + ("-march=armv8.2-a+dotprod+fp16+i8mm",),
        ("asimddp", "asimdhp", "i8mm"),
        NEON_HEADERS,
    ),
    Variant("neon_dotprod", "aarch64", NEON_SOURCES, NEON_FLAGS + ("-march=armv8.2-a+dotprod+fp16",), ("asimddp", "asimdhp"), NEON_HEADERS),
)


def library_dir() -> Path:
    """Where the libraries are loaded from: $RZ_CPU_KERNEL_DIR, else the package's lib/."""
    return Path(os.environ.get("RZ_CPU_KERNEL_DIR") or LIBRARY_DIR)


class KernelBuildError(RuntimeError):
    """A variant failed to compile."""


def machine() -> str:
    """This machine's architecture in VARIANTS' spelling."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def variants_for(target: str | None = None) -> tuple[Variant, ...]:
    """The variants of a machine (default: this one), best first."""
    target = target or machine()
    return tuple(v for v in VARIANTS if v.machine == target)


def variant_named(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"no CPU kernel variant {name!r}; the variants are {[v.name for v in VARIANTS]}")


def compiler() -> str | None:
    """The C++ compiler: $CXX, else the first of c++, g++, clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def ffi_include_dir() -> Path:
    """The XLA FFI headers that ship with jaxlib (jax.ffi.include_dir(), found without importing jax)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise KernelBuildError("building the CPU kernels needs jaxlib installed (for its XLA FFI headers)")
    return Path(list(spec.submodule_search_locations)[0]) / "include"


def build_variant(variant: Variant, output: Path | None = None, cxx: str | None = None) -> Path:
    """Compile one variant into `output` (default: its place in library_dir()) with `cxx` (default:
    compiler(); a cross compiler for another machine's variants)."""
    output = output or variant.library
    cxx = cxx or compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        # Built under a temporary name and renamed, so no process ever loads a partial library.
        partial = Path(tmp) / output.name
        command = [cxx, *COMMON_FLAGS, *variant.flags, f"-I{ffi_include_dir()}",
                   *(str(SOURCE_DIR / name) for name in variant.sources), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling the {variant.name} CPU kernels failed:\n{' '.join(command)}\n{result.stderr}")
        partial.replace(output)
    return output


def build_all(
    variants: tuple[Variant, ...] | None = None, jobs: int | None = None, cxx: str | None = None, output_dir: Path | None = None
) -> list[Path]:
    """Compile the variants (default: this machine's) side by side, into `output_dir` (default:
    library_dir()) with `cxx` (default: compiler()); the first failure raises."""
    variants = variants_for() if variants is None else variants

    def build(variant: Variant) -> Path:
        return build_variant(variant, output_dir / variant.library.name if output_dir else None, cxx)

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(build, variants))


def main(target: str | None = None, cxx: str | None = None, output_dir: Path | None = None) -> int:
    """Build a machine's variants (default: this one's, in place); the exit status says whether all compiled."""
    variants = variants_for(target)
    if not variants:
        print(f"rz_kernels.build: no CPU kernel variant targets {target or machine()}", file=sys.stderr)
        return 1
    try:
        for path in build_all(variants, cxx=cxx, output_dir=output_dir):
            print(path)
    except KernelBuildError as error:
        print(f"rz_kernels.build: {error}", file=sys.stderr)
        return 1
    return 0
