"""JAX's persistent compilation cache, on by default, so a second process starts fast."""

import os
from pathlib import Path

import jax

from rz.model_files import cache_dir

_enabled_dir: Path | None = None


def default_compilation_cache_dir() -> Path:
    """$RZ_COMPILATION_CACHE, else a folder in rz's cache directory."""
    return Path(os.environ.get("RZ_COMPILATION_CACHE", cache_dir() / "xla"))


def enable_compilation_cache(setting: str | Path | None | bool = True) -> Path | None:
    """Turn the persistent cache on (True: the default folder; a path: that folder) or leave it off.

    JAX holds one cache directory per process, so the first setting wins; later calls with
    another folder keep the first.
    """
    global _enabled_dir
    if setting is False or setting is None:
        return _enabled_dir
    if _enabled_dir is not None:
        return _enabled_dir
    directory = default_compilation_cache_dir() if setting is True else Path(setting)
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every step, however quick to compile: start-up time is the sum of many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled_dir = directory
    return directory
