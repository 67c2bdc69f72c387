"""Compute kernels for rz: fused-dequantization matmuls and attention, each with a pure-jnp reference.

    y = qmatmul(x, qt)                      # x [..., K] @ dequantize(qt).T, by the fastest path here
    q, k, v = qmatmul_many(x, (wq, wk, wv)) # several weights on one input, one kernel call on CPU
    q, k, v = qmatmul_by_layer(x, l, qkv_by_layer)  # layer l's (wq, wk, wv), l traced (a scan's index)
    q, k, v = qmatmul_stacked(x, l, (wq_stack, wk_stack, wv_stack))  # the same, weights stacked per layer
    o = attention(q, k, v, q_positions, k_positions, window=..., scale=..., softcap=...)
    o = attention(q, k_pool, v_pool, q_positions, pool_positions, block_table=...)  # a paged cache
    k, v, positions = paged_as_slab(k_pool, v_pool, pool_positions, block_table)
    describe_paths()                        # which implementation serves which (op, type, size)

References: rz_kernels.quants.qmatmul_ref, rz_kernels.causal_attention.attention_ref. Modules: quantized_matmul
(dispatch, the C++ CPU kernel's wrapper), moe_matmul (a mixture of experts' matmul on the chosen
experts' rows), qmatmul_pallas, causal_attention, attention_pallas, cpu_ffi.
"""

import jax

from rz_kernels import cache_write, causal_attention, quantized_matmul
from rz_kernels.attention_kv import paged_as_slab
from rz_kernels.causal_attention import attention, attention_ref, attention_weights
from rz_kernels.quantized_matmul import qmatmul, qmatmul_by_layer, qmatmul_many, qmatmul_stacked, select_path


def describe_paths(backend: str | None = None) -> list[dict]:
    """The implementation of each op per size range on `backend` (default: jax's default backend)."""
    backend = backend or jax.default_backend()
    return quantized_matmul.describe_paths(backend) + causal_attention.describe_paths(backend) + cache_write.describe_paths(backend)


__all__ = [
    "attention",
    "attention_ref",
    "attention_weights",
    "describe_paths",
    "paged_as_slab",
    "qmatmul",
    "qmatmul_by_layer",
    "qmatmul_many",
    "qmatmul_stacked",
    "select_path",
]
