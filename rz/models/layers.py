"""The building blocks every model family shares: norms, RoPE, linear layers on quantized weights, MLPs.

Each follows the ggml op llama.cpp's graph builders use for it, in f32.
"""

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rz.config import ModelConfig
from rz.models.layer_stacks import TypedStacks
from rz.sharding import Gathered, gather_last
from rz_kernels.quants import QTensor, QTensorStack, dequantize
from rz_kernels import qmatmul, qmatmul_by_layer, qmatmul_many, qmatmul_stacked


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, fixed_order: bool = False) -> jax.Array:
    """x / rms(x) * weight over the last axis (ggml_rms_norm then ggml_mul).

    Gemma's (1 + w) needs no special case: llama.cpp's converter stores the 1 in the weight.
    fixed_order sums the squares in an order that does not depend on how many rows are normalized
    together (sum_halving): the per-head norms need it, since a tensor-parallel shard holds fewer heads.
    """
    if fixed_order:
        mean_square = sum_halving(jnp.square(x)) / x.shape[-1]
    else:
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(mean_square + eps) * weight


def sum_halving(x: jax.Array) -> jax.Array:
    """The sum over the last axis (kept, of size 1), adding its second half to its first until one
    element is left: elementwise adds, so each row's order is the graph's. XLA:CPU's reduction
    sums a row in an order that depends on the number of rows (below 16 rows another than above),
    so a shard holding one of Gemma 3's four heads (8 rows for an 8-token prompt, against 32)
    normalized it differently in the last bit, which the K-quant kernels' int8 rounding of
    activations then grew (NMSE 1.4e-4 at tensor parallelism 4)."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        folded = x[..., :half] + x[..., half : 2 * half]
        x = jnp.concatenate([folded, x[..., 2 * half :]], axis=-1) if x.shape[-1] % 2 else folded
    return x


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / std * weight + bias over the last axis (ggml_norm, ggml_mul, ggml_add)."""
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(variance + eps) * weight + bias


@partial(jax.tree_util.register_dataclass, data_fields=("weights", "layer"), meta_fields=())
@dataclass(frozen=True)
class ByLayer:
    """The same weight of every layer of a stack, of which the layer `layer` (int32 [], known when
    the step runs: a loop's index over layers, rz.models.forward) is the one a matmul takes.
    The kernel reads that layer's arrays in place; nothing is sliced or copied."""

    weights: tuple[QTensor, ...] | QTensorStack | TypedStacks  # every layer's QTensor, or them stacked (per type)
    layer: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weights[0].shape if isinstance(self.weights, tuple) else self.weights.shape


def linear(x: jax.Array, weight: QTensor | ByLayer | Gathered, bias: jax.Array | None = None) -> jax.Array:
    """x [..., K] @ weight[N, K].T (+ bias) -> f32 [..., N]: the one place matmuls on weights go through.

    rz_kernels.qmatmul picks the path per backend and shape (on CPU the C++ kernel, which rounds
    the activations to int8 per block as llama.cpp does; rz_kernels.quants.qmatmul_ref is the reference).
    A tensor-parallel shard's rows of a weight whose input is split (rz.sharding.Gathered) take
    the whole input, gathered, and give their rows of y, gathered. In a loop over layers
    (rz.models.forward) the weight is the loop's layer's (ByLayer).
    """
    if isinstance(weight, Gathered):
        y = gather_last(_matmul(gather_last(x, weight.axis), weight.weight), weight.axis)
    else:
        y = _matmul(x, weight)
    return y if bias is None else y + bias


def _matmul(x: jax.Array, weight: QTensor | ByLayer) -> jax.Array:
    if isinstance(weight, ByLayer):
        return _by_layer(x, (weight,))[0]
    return qmatmul(x, weight)


def _by_layer(x: jax.Array, weights: tuple[ByLayer, ...]) -> list[jax.Array]:
    """The loop layer's matmuls: the stacked weights in one kernel call, a matrix stacked per type
    (its type differs between layers; rz.models.layer_stacks) in a call on its layer's stack, and
    the per-layer ones in another."""
    layer = weights[0].layer
    stacked = [i for i, w in enumerate(weights) if isinstance(w.weights, QTensorStack)]
    typed = [i for i, w in enumerate(weights) if isinstance(w.weights, TypedStacks)]
    apart = [i for i, w in enumerate(weights) if isinstance(w.weights, tuple)]
    outputs = [None] * len(weights)
    if stacked:
        for i, y in zip(stacked, qmatmul_stacked(x, layer, [weights[i].weights for i in stacked])):
            outputs[i] = y
    for i in typed:
        outputs[i] = _typed_matmul(x, layer, weights[i].weights)
    if apart:
        for i, y in zip(apart, qmatmul_by_layer(x, layer, list(zip(*(weights[i].weights for i in apart))))):
            outputs[i] = y
    return outputs


def _typed_matmul(x: jax.Array, layer: jax.Array, typed: TypedStacks) -> jax.Array:
    """x @ layer `layer`'s matrix, held in one of typed's stacks: a switch over the stacks, each
    branch the layer-indexed kernel on its stack at the layer's place there."""
    group = jnp.asarray(np.asarray(typed.groups, np.int32))[layer]
    index = jnp.asarray(np.asarray(typed.indices, np.int32))[layer]
    branches = [partial(lambda stack, x, index: qmatmul_stacked(x, index, [stack])[0], stack) for stack in typed.stacks]
    return jax.lax.switch(group, branches, x, index)


def linear_many(x: jax.Array, weights: tuple[QTensor, ...] | tuple[ByLayer, ...], biases: tuple[jax.Array | None, ...]) -> list[jax.Array]:
    """[linear(x, w, b) for each pair], computed together: one kernel call on CPU (q/k/v, gate/up)."""
    if isinstance(weights[0], ByLayer):
        outputs = _by_layer(x, weights)
    else:
        outputs = qmatmul_many(x, weights)
    return [y if b is None else y + b for y, b in zip(outputs, biases)]


def embed(table: QTensor, tokens: jax.Array) -> jax.Array:
    """Rows of a [n_vocab, n_embd] table -> f32 [*tokens.shape, n_embd], dequantizing only those rows.

    Every array of a QTensor is laid out [*rows, ...], so gathering rows of each gathers rows of the tensor.
    """
    arrays = {name: array[tokens] for name, array in table.arrays.items()}
    return dequantize(QTensor(arrays, table.ggml_type, (*tokens.shape, table.shape[-1])))


def gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (ggml_gelu)."""
    return jax.nn.gelu(x, approximate=True)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def swiglu_mlp(
    x: jax.Array, w_gate: QTensor, w_up: QTensor, w_down: QTensor, biases: tuple[jax.Array | None, ...] = (None,) * 3
) -> jax.Array:
    """down(silu(gate(x)) * up(x)), biases (gate, up, down) added where given: the llama MLP and each of its experts."""
    gate, up = linear_many(x, (w_gate, w_up), biases[:2])
    return linear(swiglu(gate, up), w_down, biases[2])


def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return gelu(gate) * up


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): squashes logits into (-cap, cap)."""
    return cap * jnp.tanh(x / cap)


# llama.cpp's llama_model_rope_type: which elements RoPE pairs up. Llama rotates consecutive pairs
# (2i, 2i+1), because its converter permutes Q and K rows to that order; the others rotate
# (i, i + rope_dim/2), the Hugging Face "rotate_half" order, called NeoX in ggml.
NEOX_ROPE = {
    "llama": False, "smollm3": False,
    "qwen2": True, "qwen2moe": True, "qwen3": True, "qwen3moe": True,
    "phi2": True, "phi3": True, "gemma2": True, "gemma3": True,
}

# ggml's YaRN defaults, which none of the supported architectures overrides.
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding of one layer: which values rotate, how fast, and how scaled."""

    dim: int  # the first `dim` values of each head rotate; the rest pass through (partial rotary)
    base: float
    freq_scale: float  # linear and YaRN scaling: positions are multiplied by it
    neox: bool
    yarn_context: int  # YaRN: the training context its frequency ramp is built from; 0 without YaRN
    magnitude: float  # scale of the rotated values (ggml's mscale): the attn_factor, and YaRN's

    @classmethod
    def for_layer(cls, cfg: ModelConfig, sliding: bool) -> "Rope":
        """The RoPE llama.cpp applies on a layer: sliding layers have their own base, and Gemma 3's
        are never scaled (llama.cpp's rope_freq_scale_train_swa: 1 for Gemma 3, else the global scale)."""
        factor = cfg.rope_scaling_factor if cfg.rope_scaling != "none" else 1.0
        freq_scale = 1.0 if sliding and cfg.architecture == "gemma3" else 1.0 / factor
        yarn = cfg.rope_scaling == "yarn"
        # llama.cpp scales the rotated values by the file's attn_factor with or without YaRN
        # (Phi-3's LongRoPE files carry one).
        magnitude = cfg.rope_attn_factor
        if yarn:
            # llama.cpp's yarn_attn_factor cancels ggml's 1 + 0.1 ln(1/freq_scale) for factors above 1.
            attn_factor = cfg.rope_attn_factor * (1.0 if factor > 1 else 1.0 / (1.0 + 0.1 * math.log(factor)))
            magnitude = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
        return cls(
            dim=cfg.rope_dim,
            base=cfg.rope_base_sliding if sliding else cfg.rope_base,
            freq_scale=freq_scale,
            neox=NEOX_ROPE[cfg.architecture],
            yarn_context=cfg.rope_scaling_original_context if yarn else 0,
            magnitude=magnitude,
        )

    def inverse_frequencies(self) -> np.ndarray:
        """base^(-2i/dim) for each rotated pair i, as float64 constants."""
        return self.base ** (-np.arange(0, self.dim, 2, dtype=np.float64) / self.dim)

    def yarn_mix(self) -> np.ndarray:
        """YaRN's per-pair weight of the unscaled angle against the scaled one (ggml_rope_yarn_corr_dims)."""

        def correction_dim(n_rotations: float) -> float:
            return self.dim * math.log(self.yarn_context / (n_rotations * 2 * math.pi)) / (2 * math.log(self.base))

        low = max(0.0, math.floor(correction_dim(YARN_BETA_FAST)))
        high = min(self.dim - 1.0, math.ceil(correction_dim(YARN_BETA_SLOW)))
        pair = np.arange(self.dim // 2, dtype=np.float64)
        return 1.0 - np.clip((pair - low) / max(0.001, high - low), 0.0, 1.0)


def no_rope_freq_factors(weights) -> None:
    """A family's rope_freq_factors where no pair's RoPE angle is rescaled (every family but Llama 3's)."""
    return None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RopeTable:
    """The cos and sin of each position's RoPE angles, f32 [B, T, 1, rope.dim // 2] (YaRN's
    magnitude folded in), for every layer of a kind (sliding or global)."""

    cos: jax.Array
    sin: jax.Array


def rope_table(positions: jax.Array, rope: Rope, freq_factors: jax.Array | None = None) -> RopeTable:
    """The RoPE table of absolute positions [B, T] (ggml_rope_ext's angles).

    freq_factors [rope.dim // 2], if given, divide each pair's angle (Llama 3's rope_freqs).
    """
    inverse_frequencies = jnp.asarray(rope.inverse_frequencies(), jnp.float32)
    if freq_factors is not None:
        inverse_frequencies = inverse_frequencies / freq_factors
    unscaled = positions.astype(jnp.float32)[..., None] * inverse_frequencies
    angles = unscaled * rope.freq_scale
    if rope.yarn_context:
        mix = jnp.asarray(rope.yarn_mix(), jnp.float32)
        angles = angles * (1 - mix) + unscaled * mix
    return RopeTable(
        cos=(jnp.cos(angles) * rope.magnitude)[:, :, None, :], sin=(jnp.sin(angles) * rope.magnitude)[:, :, None, :]
    )


def apply_rope(x: jax.Array, table: RopeTable, rope: Rope) -> jax.Array:
    """Rotate x [B, T, H, D] by the angles of its positions in `table` (ggml_rope_ext)."""
    cos, sin = table.cos, table.sin
    rotated, passed = x[..., : rope.dim], x[..., rope.dim :]
    if rope.neox:
        first, second = jnp.split(rotated, 2, axis=-1)
    else:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    out_first = first * cos - second * sin
    out_second = first * sin + second * cos
    if rope.neox:
        rotated = jnp.concatenate([out_first, out_second], axis=-1)
    else:
        rotated = jnp.stack([out_first, out_second], axis=-1).reshape(rotated.shape)
    return jnp.concatenate([rotated, passed], axis=-1)
