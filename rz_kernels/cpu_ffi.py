"""The C++ CPU kernels (rz_kernels/cpu/*.cc): compiled on first use, loaded, registered with XLA's FFI.

The library is built with the system C++ compiler against the XLA FFI headers that ship with
jaxlib (`jax.ffi.include_dir()`), into rz's cache directory under a name derived from the
source, the flags, the compiler and jaxlib, so a change to any of them rebuilds it. Nothing is
downloaded. On aarch64 the NEON variant the CPU can run is built instead (rz_kernels.neon_variants;
a cross compiler is taken from $CXX). Where the build is impossible (no compiler, an x86-64 CPU
without AVX2/FMA/F16C, an aarch64 CPU without the dot-product instructions, another machine)
`available()` is False and callers take their XLA paths; RZ_CPU_KERNELS=0 forces that.
"""

import ctypes
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import jax

from rz.model_files import cache_dir
from rz_kernels import neon_variants

log = logging.getLogger("rz_kernels")

SOURCE_DIR = Path(__file__).parent / "cpu"
SOURCES = ("qmatmul.cc", "attention.cc", "machine.cc")
HEADERS = ("simd.h", "threads.h")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno", "-pthread")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
QMATMUL_TARGET = "rz_qmatmul"
ATTENTION_TARGET = "rz_attention"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str, name: str = "avx2", sources=SOURCES, headers=HEADERS, flags=CXX_FLAGS) -> Path:
    """Compile a variant's sources into the cache (once per source/flags/compiler/jaxlib) and return the library."""
    import fcntl  # POSIX only, as is this build

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for file in sources + headers:
        digest.update((SOURCE_DIR / file).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(version.encode())
    digest.update(importlib.metadata.version("jaxlib").encode())
    target = cache_dir() / "kernels" / f"rz_cpu_kernels_{name}_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time (other processes wait, then find the library); built under a temporary
    # name and renamed, so no process ever loads a partial file.
    with open(target.with_suffix(".lock"), "w") as lock, tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        partial = Path(tmp) / target.name
        command = [
            compiler,
            *flags,
            f"-I{jax.ffi.include_dir()}",
            *(str(SOURCE_DIR / file) for file in sources),
            "-o",
            str(partial),
        ]
        log.info("rz_kernels: building the CPU kernels (once, about 20 s): %s", " ".join(command))
        subprocess.run(command, capture_output=True, text=True, check=True)
        partial.replace(target)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, its FFI targets registered with XLA; None where it cannot be built."""
    if os.environ.get("RZ_CPU_KERNELS", "1") == "0":
        log.info("rz_kernels: C++ CPU kernels disabled by RZ_CPU_KERNELS=0")
        return None
    machine = platform.machine().lower()
    variant = None
    if machine in ("aarch64", "arm64"):
        variant = neon_variants.select(neon_variants.cpu_features())
        if variant is None:
            log.info("rz_kernels: C++ CPU kernels need the dot-product instructions (asimddp), this CPU lacks them")
            return None
    elif machine not in ("x86_64", "amd64"):
        log.info("rz_kernels: C++ CPU kernels need x86-64 or aarch64, this is %s", platform.machine())
        return None
    else:
        missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in _cpu_flags()]
        if missing:
            log.info("rz_kernels: C++ CPU kernels need %s, the CPU lacks %s", REQUIRED_CPU_FLAGS, missing)
            return None
    compiler = _compiler()
    if compiler is None:
        log.warning("rz_kernels: no C++ compiler found (set CXX); quantized matmuls take slower XLA paths")
        return None
    try:
        if variant is None:
            path = _build(compiler)
        else:
            path = _build(compiler, variant.name, variant.sources, variant.headers, variant.flags)
    except subprocess.CalledProcessError as error:
        log.warning("rz_kernels: building the CPU kernels failed; quantized matmuls take XLA paths:\n%s", error.stderr)
        return None
    lib = ctypes.CDLL(str(path))
    lib.rz_stream_read_gbps.restype = ctypes.c_double
    lib.rz_stream_read_gbps.argtypes = (ctypes.c_int64, ctypes.c_int32, ctypes.c_int32)
    lib.rz_int8_dot_peak_gmacs.restype = ctypes.c_double
    lib.rz_int8_dot_peak_gmacs.argtypes = (ctypes.c_int32, ctypes.c_int32)
    jax.ffi.register_ffi_target(QMATMUL_TARGET, jax.ffi.pycapsule(lib.RzQMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.RzAttention), platform="cpu")
    log.info("rz_kernels: loaded the C++ CPU kernels from %s", path)
    return lib


def available() -> bool:
    """Whether the C++ CPU kernels are built and registered."""
    return library() is not None


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU kernels are not available here (see the rz_kernels log)")
    return lib


def stream_read_gbps(nbytes: int = 256 << 20, threads: int | None = None, repeats: int = 10) -> float:
    """Memory bandwidth by a streaming SIMD read (AVX2, or NEON on aarch64) of nbytes, best of `repeats`, in GB/s."""
    return _loaded().rz_stream_read_gbps(nbytes, threads or os.cpu_count() or 1, repeats)


def int8_dot_peak_gmacs(threads: int | None = None, repeats: int = 5) -> float:
    """The int8 MAC rate of the quantized matmul's inner step (maddubs, madd, convert, FMA; on aarch64
    sdot, convert, FMA), best of `repeats`."""
    return _loaded().rz_int8_dot_peak_gmacs(threads or os.cpu_count() or 1, repeats)
