"""Shared by every test: pytest puts this directory (tests/) on sys.path, so the helper package
tests/support imports as `support`."""

from rz.bench.llamacpp_setup import use_safe_defaults

# The oracle's llama.cpp models load as rz.bench loads them (without ggml's AMX buffers on a CPU that
# reports AMX, where they crash).
use_safe_defaults()
