"""rz.models.forward's loop over layers: the same numbers as the layers unrolled, bit for bit.

Where the layer-indexed matmul is one C++ kernel call (rz_kernels.by_layer_in_one_call), a step
runs its layers as a loop over groups of identical layers; RZ_LAYER_LOOP=0 unrolls them. Both
write the same cache and give the same hidden states, at a prompt's chunk and at decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rz_kernels
from rz.models import loop_period
from rz_run import load
from tiny_models import K_QUANT_SHAPE, write_tiny_model

pytestmark = pytest.mark.skipif(not rz_kernels.cpu_ffi.available(), reason="the layer loop needs the C++ CPU kernels")

# (architecture, weight type, overrides) -> the period the loop should find.
MODELS = {
    "llama-q8_0": (("llama", "Q8_0", {}), 1),
    "gemma3-q8_0-sliding-every-other": (("gemma3", "Q8_0", dict(n_layer=6)), 2),
    "gemma3-q4_k-one-global-in-three": (("gemma3", "Q4_K", dict(K_QUANT_SHAPE, n_layer=6, sliding_window_pattern=3)), 3),
}


def run(model, cache, tokens, positions):
    """One forward pass, traced afresh (RZ_LAYER_LOOP is read when a step is traced)."""
    return jax.jit(lambda weights, cache, tokens, positions: model.forward(weights, cache, tokens, positions))(
        model.weights, cache, tokens, positions
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_looped_layers_equal_unrolled_ones(tmp_path, monkeypatch, name):
    (architecture, weight_type, overrides), period = MODELS[name]
    model = load(write_tiny_model(tmp_path / "m.gguf", architecture, weight_type=weight_type, **overrides))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, 300, (1, 12)), jnp.int32)
    chunks = [(prompt, jnp.arange(12, dtype=jnp.int32)[None]), (prompt[:, :1], jnp.asarray([[12]], jnp.int32))]
    results = {}
    for loop in ("1", "0"):
        monkeypatch.setenv("RZ_LAYER_LOOP", loop)
        assert loop_period(model.weights, model.cfg, 12) == (period if loop == "1" else None)
        cache, outputs = model.init_cache(1, 64), []
        for tokens, positions in chunks:
            hidden, cache = run(model, cache, tokens, positions)
            outputs.append(hidden)
        results[loop] = (outputs, cache)
    for looped, unrolled in zip(*(jax.tree.leaves(results[loop]) for loop in ("1", "0"))):
        np.testing.assert_array_equal(np.asarray(looped), np.asarray(unrolled))


def test_layers_that_do_not_repeat_stay_unrolled(tmp_path):
    """SmolLM3's last layer has no RoPE: its four layers have no shorter repeating run."""
    model = load(write_tiny_model(tmp_path / "m.gguf", "smollm3", weight_type="Q8_0"))
    assert loop_period(model.weights, model.cfg, 1) is None


def test_weights_without_a_cpu_kernel_stay_unrolled(tmp_path):
    """F32 weights take XLA's matmul, which cannot pick a layer's weight in place."""
    model = load(write_tiny_model(tmp_path / "m.gguf", "llama", weight_type="F32"))
    assert loop_period(model.weights, model.cfg, 1) is None
