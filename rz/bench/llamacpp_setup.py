"""How rz loads llama.cpp (the tests' oracle and the bench's baseline) on every CPU.

llama-cpp-python builds ggml for the machine it is built on, and on a CPU that reports AMX that
includes ggml's AMX kernels. On a Sapphire Rapids VM they crash llama_decode with SIGSEGV on any
batch, on both real models, even four tokens. Weights reach those kernels only as one of ggml's
"extra buffer types" (with REPACK's interleaved layouts), which a model's `use_extra_bufts` turns
off; ggml then computes with its plain CPU kernels. So on a CPU that reports AMX, rz loads llama.cpp
models without the extra buffer types. RZ_BENCH_LLAMA_EXTRA_BUFTS=1 (or 0) decides instead, and
the bench records the setting with every llama.cpp result.
"""

import os
from functools import cache
from pathlib import Path


def _cpu_reports_amx() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and " amx_tile" in line for line in text.splitlines())


def extra_buffer_types() -> bool:
    """Whether llama.cpp models load with ggml's extra CPU buffer types (REPACK, AMX)."""
    setting = os.environ.get("RZ_BENCH_LLAMA_EXTRA_BUFTS")
    if setting is not None:
        return setting != "0"
    return not _cpu_reports_amx()


@cache
def use_safe_defaults() -> None:
    """Make every model that llama-cpp-python loads in this process follow extra_buffer_types()."""
    if extra_buffer_types():
        return
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffer_types
