"""rz.models.forward's loop over layers: the same numbers as the layers unrolled, bit for bit.

Where the layer-indexed matmul is one C++ kernel call (rz_kernels.by_layer_in_one_call), a step
runs its layers as a loop over groups of identical layers; RZ_LAYER_LOOP=0 unrolls them. Both
write the same cache and give the same hidden states, at a prompt's chunk and at decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataclasses import replace

import rz_kernels
from rz.config import ModelConfig
from rz.gguf import GGUFFile
from rz.models import FAMILIES, Model, loop_period
from rz.models.layer_stacks import Layers, TypedStacks, is_matrix, layer_runs, run_members, stack_layers
from rz.weights import load_weights
from rz_kernels.ggml_types import GGMLType
from rz_kernels.quants import QTensorStack
from rz_run import load
from support.kernels import random_qtensor
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


def test_loaded_layers_are_stacked_once_in_memory(tmp_path):
    """load_model stacks each run's matrices (rz.models.layer_stacks); each layer's own
    QTensors are views of the stacks, so the bytes are held once."""
    model = load(write_tiny_model(tmp_path / "m.gguf", "gemma3", weight_type="Q8_0", n_layer=6))
    stacks = model.weights.layers.stacks
    assert isinstance(model.weights.layers, Layers) and len(stacks) == 2
    for position, stack in enumerate(stacks):
        members = model.weights.layers[position::2]
        columns = zip(*(jax.tree.leaves(layer, is_leaf=is_matrix) for layer in members))
        for column, matrix in zip(columns, stack.matrices):
            if matrix is None:
                continue
            assert isinstance(matrix, QTensorStack) and matrix.n_layers == 3
            for layer, weight in enumerate(column):
                for name, array in weight.arrays.items():
                    assert array.unsafe_buffer_pointer() == matrix.arrays[name].unsafe_buffer_pointer() + layer * array.nbytes


def test_a_matrix_whose_type_differs_between_layers_is_stacked_per_type_and_loops_the_same(tmp_path, monkeypatch):
    """Q4_K_M files give some layers' ffn_down Q6_K and others Q4_K: that matrix is stacked per
    type (a kernel call on the layer's stack), the others as one, and the loop still gives the
    unrolled layers' bits."""
    path = write_tiny_model(tmp_path / "m.gguf", "gemma3", weight_type="Q4_K", **K_QUANT_SHAPE, n_layer=6, sliding_window_pattern=3)
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    family = FAMILIES[cfg.architecture]
    weights = load_weights(gguf, family.tensor_specs(cfg))
    rng = np.random.default_rng(5)
    down = weights.layers[3].w_down
    layers = list(weights.layers)
    layers[3] = replace(layers[3], w_down=random_qtensor(rng, GGMLType.Q6_K, down.shape))
    model = Model(cfg, stack_layers(replace(weights, layers=tuple(layers)), cfg), family)
    kinds = [type(m) for m in model.weights.layers.stacks[0].matrices if m is not None]
    assert TypedStacks in kinds and QTensorStack in kinds
    typed = next(m for m in model.weights.layers.stacks[0].matrices if isinstance(m, TypedStacks))
    # Run 0 holds layers 0, 1, 3 and 4; layer 3's matrix is the Q6_K one.
    assert typed.groups == (0, 0, 1, 0) and typed.indices == (0, 1, 0, 2)
    assert [stack.n_layers for stack in typed.stacks] == [3, 1]
    prompt = jnp.asarray(rng.integers(3, 300, (1, 12)), jnp.int32)
    results = {}
    for loop in ("1", "0"):
        monkeypatch.setenv("RZ_LAYER_LOOP", loop)
        hidden, cache = run(model, model.init_cache(1, 64), prompt, jnp.arange(12, dtype=jnp.int32)[None])
        results[loop] = (hidden, cache)
    for looped, unrolled in zip(*(jax.tree.leaves(results[loop]) for loop in ("1", "0"))):
        np.testing.assert_array_equal(np.asarray(looped), np.asarray(unrolled))


def test_a_run_of_alike_layers_is_one_layer_in_the_loop_body(tmp_path, monkeypatch):
    """Gemma 3's period holds sliding layers then a global one: the sliding run is stacked as one
    and runs as an inner loop, so the step's graph holds one layer per run, not per position."""
    model = load(write_tiny_model(tmp_path / "m.gguf", "gemma3", weight_type="Q8_0", n_layer=6, sliding_window_pattern=3))
    runs = layer_runs(model.weights, model.cfg)
    assert runs == ((0, 2), (2, 1))
    assert [run_members(6, runs, run) for run in range(2)] == [[0, 1, 3, 4], [2, 5]]
    stacks = model.weights.layers.stacks
    assert [stack.run for stack in stacks] == list(runs)
    assert {m.n_layers for m in stacks[0].matrices if m is not None} == {4}

    def matmul_calls(loop: str) -> int:
        monkeypatch.setenv("RZ_LAYER_LOOP", loop)
        step = jax.jit(lambda weights, cache, tokens, positions: model.forward(weights, cache, tokens, positions))
        tokens = jnp.zeros((1, 4), jnp.int32)
        compiled = step.lower(model.weights, model.init_cache(1, 64), tokens, jnp.arange(4, dtype=jnp.int32)[None]).compile()
        return compiled.as_text().count('custom_call_target="rz_qmatmul')

    assert matmul_calls("1") * 3 == matmul_calls("0")  # two layers in the body against six unrolled
