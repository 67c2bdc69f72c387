"""What a result was measured on: machine, software, model file.

The bench process itself never initialises a JAX backend (on a GPU that would take the memory
the rz worker needs); the JAX backend and devices come from the rz engine's own description.
"""

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from rz.bench.errors import PreflightError

_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm", "sve", "sve2")
_PACKAGES = ("rz", "jax", "jaxlib", "jax-cuda12-plugin", "numpy", "gguf", "llama_cpp_python")


def capture_environment() -> dict:
    """CPU, memory, OS, Python, package versions, rz's git commit and its CPU kernels' variant."""
    from rz_kernels import cpu_ffi

    return {
        "hostname": platform.node(),
        "cpu": cpu_info(),
        "memory_bytes": proc_bytes("/proc/meminfo", "MemTotal"),
        "memory_available_bytes": proc_bytes("/proc/meminfo", "MemAvailable"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": _packages(),
        "rz_git": rz_git(),
        "cpu_kernels": cpu_ffi.selected_name(),
    }


def cpu_info() -> dict:
    """Model name, core counts and the SIMD flags that decide kernel speed."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {
        "model": model,
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": usable,
        "flags": [flag for flag in _CPU_FLAGS if flag in flags],
    }


def rz_git() -> dict:
    """The commit of the rz checkout being measured, and whether it has uncommitted changes."""
    import rz

    root = Path(rz.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered by path, size and mtime (hashing a 4 GB model takes seconds)."""
    from rz.model_files import cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = cache_dir() / "bench-sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            cache_file.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass
    return cache[key]


@lru_cache(maxsize=8)
def model_facts(path: Path) -> dict:
    """Name, size, parameters, quantization and the weight bytes one decode step reads; PreflightError if not GGUF."""
    import gguf as gguf_package

    from rz.errors import RzError
    from rz.gguf import GGUFFile

    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"model file {path} does not exist")
    try:
        with GGUFFile(path) as model:
            tensors = {name: (info.nbytes, info.n_elements) for name, info in model.tensors.items()}
            architecture = model.get("general.architecture")
            size_label = model.get("general.size_label")
            file_type = model.get("general.file_type")
            name = model.get("general.name")
            expert_count = model.get(f"{architecture}.expert_count")
            experts_used = model.get(f"{architecture}.expert_used_count")
    except RzError as error:
        raise PreflightError(f"{path.name} is not a usable GGUF file: {error}") from None
    try:
        quantization = gguf_package.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quantization = str(file_type)
    total_bytes = sum(nbytes for nbytes, _ in tensors.values())
    parameters = sum(count for _, count in tensors.values())
    # A decode step reads every weight once, except the token embedding, of which it reads one
    # row, unless the output projection is tied to it (no output.weight) and reads it whole.
    embedding = tensors.get("token_embd.weight", (0, 0))[0]
    per_token = total_bytes - embedding if "output.weight" in tensors else total_bytes
    # A mixture of experts reads only the chosen experts' rows of its 3-D expert tensors
    # (one token: expert_used_count of expert_count), so GB/s is of the active bytes.
    if expert_count and experts_used:
        expert_bytes = sum(nbytes for tensor, (nbytes, _) in tensors.items() if "_exps." in tensor)
        per_token -= expert_bytes - expert_bytes * experts_used // expert_count
    return {
        "path": str(path.resolve()),
        "file_name": path.name,
        "file_bytes": path.stat().st_size,
        "name": name,
        "architecture": architecture,
        "size_label": size_label,
        "quantization": quantization,
        "parameters": parameters,
        "tensor_bytes": total_bytes,
        "weight_bytes_per_token": per_token,
        "description": " ".join(str(p) for p in (architecture, size_label or _count(parameters), quantization) if p),
    }


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"


def proc_bytes(path: str, field: str) -> int | None:
    """A 'Field:  N kB' line of a Linux /proc file, in bytes; None elsewhere."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _packages() -> dict:
    import rz

    versions = {name: _version(name) for name in _PACKAGES}
    versions["rz"] = versions["rz"] or rz.__version__  # a source checkout is not an installed distribution
    return versions


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
