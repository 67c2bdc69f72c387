"""Shared by every test: pytest puts this directory (tests/) on sys.path, so the helper package
tests/support imports as `support`."""

import gc

import pytest

from rz.bench.llamacpp_setup import use_safe_defaults

# The oracle's llama.cpp models load as rz.bench loads them (without ggml's AMX buffers on a CPU that
# reports AMX, where they crash).
use_safe_defaults()


@pytest.fixture(autouse=True, scope="module")
def release_compiled_executables():
    """Drop every compiled executable when a test module ends.

    JAX keeps each executable for the life of the process, and each holds mapped pages of
    JIT code (~450 mappings per tiny-model rz.LLM). The whole suite in one process compiled
    enough to reach the kernel's vm.max_map_count (65,530), where XLA aborts mid-compile.
    Later modules recompile what they need, mostly from the persistent compilation cache.
    """
    yield
    import jax

    gc.collect()
    jax.clear_caches()
    mapped, limit = _mapped_regions()
    assert mapped < limit * 3 // 4, (
        f"the test process holds {mapped:,} memory mappings of vm.max_map_count's {limit:,} after this module: "
        "something keeps compiled executables alive (XLA aborts when the limit is reached)"
    )


def _mapped_regions() -> tuple[int, int]:
    """(memory mappings this process holds, the kernel's per-process limit); (0, 1) off Linux."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except OSError:
        return 0, 1
