"""rz_kernels.qmatmul_by_layer and qmatmul_stacked: one layer's weights of many (each layer's own
arrays, or stacked per layer), picked by a run-time index, so that a model's layers can run in one
scan. The C++ kernel is qmatmul_many's, so the outputs are its bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.errors import JaxRuntimeError

from rz_kernels import cpu_ffi, qmatmul_by_layer, qmatmul_many, qmatmul_stacked
from rz_kernels.ggml_types import GGMLType
from rz_kernels.quantized_matmul import by_layer_in_one_call, qmatmul_cpu, qmatmul_layer_cpu, qmatmul_stacked_cpu
from rz_kernels.quants import stack_in_place
from support.kernels import activations, random_qtensor

needs_cpu_kernels = pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")

K = 256
ROWS = (64, 32, 32)  # N of each layer's q/k/v-like weights
# Each layer's weights' types: K-quants mixed with Q6_K, as a Gemma 3 Q4_K_M file's layers differ,
# and 32-block types, so one call rounds x both ways and a layer's arrays differ in count from the others'.
LAYER_TYPES = (
    (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0),
    (GGMLType.Q6_K, GGMLType.Q4_K, GGMLType.Q4_0),
    (GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q5_1),
    (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q6_K),
)
# Decode, decode rows in groups, and the int8 prefill GEMM (more than 16 rows).
M_VALUES = (1, 5, 40)


def make_layers(layer_types=LAYER_TYPES, seed: int = 0) -> list[list]:
    rng = np.random.default_rng(seed)
    return [[random_qtensor(rng, t, (n, K)) for t, n in zip(types, ROWS)] for types in layer_types]


def scanned(matmul, x: jax.Array, by_layer) -> tuple[jax.Array, ...]:
    """matmul(x, layer, by_layer) for every layer in one lax.scan: its outputs stacked by layer."""

    def step(carry, layer):
        return carry, tuple(matmul(x, layer, by_layer))

    return jax.lax.scan(step, None, jnp.arange(len(by_layer), dtype=jnp.int32))[1]


def assert_each_layer(by_index, scan_outputs, expected_of) -> None:
    """by_index(layer) and the scan's outputs for each layer are expected_of(layer), bit for bit."""
    for layer in range(len(LAYER_TYPES)):
        expected = expected_of(layer)
        for j, (y, want) in enumerate(zip(by_index(layer), expected)):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want), err_msg=f"layer {layer}, weight {j}")
            np.testing.assert_array_equal(np.asarray(scan_outputs[j][layer]), np.asarray(want), err_msg=f"scan: layer {layer}, weight {j}")


@pytest.mark.parametrize("m", M_VALUES)
def test_the_layer_kernel_is_the_kernel_on_that_layers_weights(m, cpu_variant):
    by_layer = make_layers()
    x = jnp.asarray(activations(np.random.default_rng(m), m, K))

    def by_index(x, layer, by_layer):
        return (qmatmul_layer_cpu(x, layer, by_layer, variant=cpu_variant),)

    jitted = jax.jit(by_index)
    assert_each_layer(
        lambda layer: jitted(x, jnp.int32(layer), by_layer),
        jax.jit(scanned, static_argnums=0)(by_index, x, by_layer),
        lambda layer: (qmatmul_cpu(x, by_layer[layer], variant=cpu_variant),),
    )


@needs_cpu_kernels
@pytest.mark.parametrize("m", M_VALUES)
def test_qmatmul_by_layer_is_qmatmul_many_on_that_layer_in_one_call(m):
    by_layer = make_layers()
    assert by_layer_in_one_call(by_layer, m)
    x = jnp.asarray(activations(np.random.default_rng(m), m, K)).reshape(1, m, K)  # leading dimensions kept
    jitted = jax.jit(qmatmul_by_layer)
    assert_each_layer(
        lambda layer: jitted(x, jnp.int32(layer), by_layer),
        jax.jit(scanned, static_argnums=0)(qmatmul_by_layer, x, by_layer),
        lambda layer: qmatmul_many(x, by_layer[layer]),
    )
    # One compiled layer body: the scan holds one kernel call, not one per layer.
    hlo = jax.jit(scanned, static_argnums=0).lower(qmatmul_by_layer, x, by_layer).as_text()
    assert hlo.count(cpu_ffi.qmatmul_layer_target(cpu_ffi.selected())) == 1


def test_a_layer_out_of_range_is_an_error(cpu_variant):
    by_layer = make_layers()
    x = jnp.asarray(activations(np.random.default_rng(0), 1, K))
    call = jax.jit(lambda x, layer: qmatmul_layer_cpu(x, layer, by_layer, variant=cpu_variant))
    for layer in (len(by_layer), -1):
        with pytest.raises((ValueError, JaxRuntimeError), match=f"layer {layer} is outside the {len(by_layer)} layers"):
            call(x, jnp.int32(layer)).block_until_ready()


@pytest.mark.parametrize("m", M_VALUES)
def test_a_weight_the_kernel_does_not_take_makes_a_switch_of_the_same_bits(m):
    """An F16 weight takes XLA's path, so the layers become a lax.switch of qmatmul_many's (which
    still runs the kernel on the quantized weights of the layer it picks)."""
    layer_types = LAYER_TYPES[:3] + ((GGMLType.F16, GGMLType.Q6_K, GGMLType.Q8_0),)
    by_layer = make_layers(layer_types, seed=1)
    assert not by_layer_in_one_call(by_layer, m)
    x = jnp.asarray(activations(np.random.default_rng(m), m, K))
    jitted = jax.jit(qmatmul_by_layer)
    assert_each_layer(
        lambda layer: jitted(x, jnp.int32(layer), by_layer),
        jax.jit(scanned, static_argnums=0)(qmatmul_by_layer, x, by_layer),
        lambda layer: qmatmul_many(x, by_layer[layer]),
    )


def test_layers_of_other_shapes_are_rejected():
    rng = np.random.default_rng(2)
    x = jnp.zeros((1, K), jnp.float32)
    layer = [random_qtensor(rng, GGMLType.Q8_0, (32, K)), random_qtensor(rng, GGMLType.Q4_K, (16, K))]
    with pytest.raises(ValueError, match="layer 1's weights have shapes"):
        qmatmul_by_layer(x, 0, [layer, [layer[0], random_qtensor(rng, GGMLType.Q4_K, (32, K))]])
    with pytest.raises(ValueError, match="layer 1's weights have shapes"):
        qmatmul_by_layer(x, 0, [layer, layer[:1]])
    with pytest.raises(ValueError, match="does not contract"):
        qmatmul_by_layer(jnp.zeros((1, 2 * K)), 0, [layer, layer])
    with pytest.raises(ValueError, match="at least one layer"):
        qmatmul_by_layer(x, 0, [])


# ----- weights stacked per layer (rz_kernels.quants.QTensorStack) -----

# Each position's type, the same in every layer (a position whose types differ is not stacked).
STACKED_TYPES = (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_K)
N_STACKED_LAYERS = 3


def make_stacks(seed: int = 3):
    """Each layer's weights, and the same weights stacked in place (their views share the bytes)."""
    rng = np.random.default_rng(seed)
    layers = [[random_qtensor(rng, t, (32 * (1 + i % 2), K)) for i, t in enumerate(STACKED_TYPES)] for _ in range(N_STACKED_LAYERS)]
    made = [stack_in_place([layer[j] for layer in layers]) for j in range(len(STACKED_TYPES))]
    assert all(m is not None for m in made)
    return layers, tuple(stack for stack, _ in made), [[views[layer] for _, views in made] for layer in range(N_STACKED_LAYERS)]


def test_stacking_in_place_shares_the_bytes_and_keeps_each_layers_values():
    layers, stacks, views = make_stacks()
    for stack, j in zip(stacks, range(len(STACKED_TYPES))):
        for layer in range(N_STACKED_LAYERS):
            view = views[layer][j]
            for name, array in stack.arrays.items():
                np.testing.assert_array_equal(np.asarray(view.arrays[name]), np.asarray(layers[layer][j].arrays[name]))
                assert view.arrays[name].unsafe_buffer_pointer() == array.unsafe_buffer_pointer() + layer * view.arrays[name].nbytes
    rng = np.random.default_rng(4)
    mixed = [random_qtensor(rng, GGMLType.Q4_K, (32, K)), random_qtensor(rng, GGMLType.Q6_K, (32, K))]
    assert stack_in_place(mixed) is None  # a position whose types differ stays per layer


@pytest.mark.parametrize("m", M_VALUES)
def test_the_layer_kernel_on_stacked_weights_is_the_kernel_on_that_layers_weights(m, cpu_variant):
    layers, stacks, _ = make_stacks()
    x = jnp.asarray(activations(np.random.default_rng(m), m, K))
    jitted = jax.jit(lambda x, layer, stacks: qmatmul_stacked_cpu(x, layer, stacks, variant=cpu_variant))
    for layer in range(N_STACKED_LAYERS):
        np.testing.assert_array_equal(
            np.asarray(jitted(x, jnp.int32(layer), stacks)), np.asarray(qmatmul_cpu(x, layers[layer], variant=cpu_variant)), err_msg=f"layer {layer}"
        )


@needs_cpu_kernels
@pytest.mark.parametrize("m", M_VALUES)
def test_qmatmul_stacked_is_qmatmul_many_on_that_layer_in_one_call(m):
    layers, stacks, _ = make_stacks()
    x = jnp.asarray(activations(np.random.default_rng(m), m, K)).reshape(1, m, K)

    def over_layers(x, stacks):
        return jax.lax.scan(lambda carry, layer: (carry, tuple(qmatmul_stacked(x, layer, stacks))), None, jnp.arange(N_STACKED_LAYERS))[1]

    outputs = jax.jit(over_layers)(x, stacks)
    for layer in range(N_STACKED_LAYERS):
        for j, want in enumerate(qmatmul_many(x, layers[layer])):
            np.testing.assert_array_equal(np.asarray(outputs[j][layer]), np.asarray(want), err_msg=f"layer {layer}, weight {j}")
    # The scan's one kernel call takes one array per stack and name, not one per layer.
    hlo = jax.jit(over_layers).lower(x, stacks).as_text()
    assert hlo.count(cpu_ffi.qmatmul_layer_target(cpu_ffi.selected())) == 1


def test_a_stacked_layer_out_of_range_is_an_error(cpu_variant):
    _, stacks, _ = make_stacks()
    x = jnp.asarray(activations(np.random.default_rng(0), 1, K))
    call = jax.jit(lambda x, layer: qmatmul_stacked_cpu(x, layer, stacks, variant=cpu_variant))
    for layer in (N_STACKED_LAYERS, -1):
        with pytest.raises((ValueError, JaxRuntimeError), match=f"layer {layer} is outside the {N_STACKED_LAYERS} stacked layers"):
            call(x, jnp.int32(layer)).block_until_ready()
