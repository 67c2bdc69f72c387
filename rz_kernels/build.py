"""The C++ CPU kernels' variants, and how each is compiled: at install (setup.py), or in a checkout by

    python -m rz_kernels build          # this machine's variants, into rz_kernels/lib/

A variant is one shared library built from its sources with its own flags; the SIMD code picks its
instructions at compile time from the compiler's macros (`__AVX512VNNI__`, `__AVXVNNI__`,
`__ARM_FEATURE_DOTPROD`, ...). Every variant exports the same symbols: the FFI handlers RzQMatmul
and RzAttention, and the machine probes rz_stream_read_gbps and rz_int8_dot_peak_gmacs. At run time
rz_kernels.cpu_ffi loads the first variant in VARIANTS that the CPU can run.

This module uses the standard library only: setup.py loads it by path, before jax or rz exist in
the build environment.
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
X86_SOURCES = ("qmatmul.cc", "attention.cc", "machine.cc")
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

    @property
    def library(self) -> Path:
        return LIBRARY_DIR / f"rz_cpu_{self.name}.so"

    def inputs(self) -> list[Path]:
        """The files the library is compiled from: its sources and every header beside them."""
        return [SOURCE_DIR / name for name in self.sources] + sorted(SOURCE_DIR.glob("*.h"))


# Best first, per machine: run time takes the first one the CPU has. The two VNNI variants run
# the same 256-bit code; they are separate libraries because the CPUs that have one often lack
# the other (Zen 4 and Ice Lake servers: AVX-512 VNNI only; Alder Lake and later clients: AVX-VNNI
# only). The AVX-512 one is compiled with AVX-512VL, which also gives the compiler 32 registers.
VARIANTS: tuple[Variant, ...] = (
    Variant(
        "avx512vnni",
        "x86_64",
        X86_SOURCES,
        AVX2_FLAGS + ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"),
        AVX2_FEATURES + ("avx512f", "avx512vl", "avx512bw", "avx512_vnni"),
    ),
    Variant("avxvnni", "x86_64", X86_SOURCES, AVX2_FLAGS + ("-mavxvnni",), AVX2_FEATURES + ("avx_vnni",)),
    Variant("avx2", "x86_64", X86_SOURCES, AVX2_FLAGS, AVX2_FEATURES),
)


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


def build_variant(variant: Variant, output: Path | None = None) -> Path:
    """Compile one variant into `output` (default: its place in rz_kernels/lib/)."""
    output = output or variant.library
    cxx = compiler()
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


def build_all(variants: tuple[Variant, ...] | None = None, jobs: int | None = None) -> list[Path]:
    """Compile the variants (default: this machine's) side by side; the first failure raises."""
    variants = variants_for() if variants is None else variants
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(build_variant, variants))


def main() -> int:
    """Build this machine's variants in place; the exit status says whether all compiled."""
    variants = variants_for()
    if not variants:
        print(f"rz_kernels.build: no CPU kernel variant targets {machine()}", file=sys.stderr)
        return 1
    try:
        for path in build_all(variants):
            print(path)
    except KernelBuildError as error:
        print(f"rz_kernels.build: {error}", file=sys.stderr)
        return 1
    return 0
