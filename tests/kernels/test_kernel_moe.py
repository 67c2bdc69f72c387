"""rz_kernels.moe_matmul: the C++ experts' kernel (rz_kernels/cpu/qmatmul_moe.cc) against the dense
kernel on each expert, against the reference twin (NMSE <= 5e-4, llama.cpp's test-backend-ops
bound), and rz.models.moe's layer through it against its XLA paths."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz.models import moe
from rz_kernels import cpu_ffi
from rz_kernels.ggml_types import GGMLType
from rz_kernels.moe_matmul import expert_matrix, experts_kernel_serves, qmatmul_experts_cpu, qmatmul_experts_ref
from rz_kernels.quantized_matmul import CPU_FFI_ARRAYS, qmatmul_cpu
from support.kernels import activations, nmse, random_qtensor

TOLERANCE = 5e-4
N_EXPERT = 6
# (tokens, experts per token): a batch-1 decode step (one call over all its experts), a small
# batch (a call per expert, its rows in the decode tiles), and a prompt whose experts get more
# than 16 rows (the prefill tiles).
ROUTINGS = ((1, 2), (3, 2), (40, 3))


def experts_variant(variant: cpu_ffi.Variant) -> cpu_ffi.Variant:
    if not cpu_ffi.has_experts_kernel(variant):
        pytest.skip(f"the {variant.name} variant has no experts' kernel (its experts take XLA's paths)")
    return variant


def routing(rng: np.random.Generator, m: int, k: int) -> jax.Array:
    return jnp.asarray(np.stack([rng.choice(N_EXPERT, k, replace=False) for _ in range(m)]).astype(np.int32))


@pytest.mark.parametrize("ggml_type", sorted(CPU_FFI_ARRAYS), ids=lambda t: t.name)
def test_each_pair_is_its_experts_dense_matmul(ggml_type, cpu_variant):
    """Each pair's row is bit for bit the dense kernel's on that expert's rows (gathered in token
    order), whether x has a row per token (gate/up) or per pair (down); and within the tolerance
    of the reference twin."""
    variant = experts_variant(cpu_variant)
    rng = np.random.default_rng(int(ggml_type))
    k_dim = 256
    gate, up = random_qtensor(rng, ggml_type, (N_EXPERT, 40, k_dim)), random_qtensor(rng, ggml_type, (N_EXPERT, 24, k_dim))
    for m, k in ROUTINGS:
        ids = routing(rng, m, k)
        for rows in (m, m * k):
            x = jnp.asarray(activations(rng, rows, k_dim))
            y = np.asarray(qmatmul_experts_cpu(x, ids, (gate, up), variant=variant))
            pair_rows = np.asarray(x) if rows == m * k else np.repeat(np.asarray(x), k, axis=0)
            flat = np.asarray(ids).reshape(-1)
            for e in np.unique(flat):
                pairs = np.flatnonzero(flat == e)
                dense = qmatmul_cpu(jnp.asarray(pair_rows[pairs]), [expert_matrix(gate, int(e)), expert_matrix(up, int(e))], variant=variant)
                np.testing.assert_array_equal(y[pairs], np.asarray(dense), err_msg=f"M={m} k={k} x rows={rows} expert {e}")
            reference = np.concatenate([np.asarray(qmatmul_experts_ref(x, ids, qt)) for qt in (gate, up)], axis=1)
            assert nmse(y, reference) <= TOLERANCE, (m, k, rows)


def test_bad_arguments_are_refused(cpu_variant):
    variant = experts_variant(cpu_variant)
    rng = np.random.default_rng(3)
    weight = random_qtensor(rng, GGMLType.Q8_0, (N_EXPERT, 8, 64))
    x = jnp.asarray(activations(rng, 2, 64))
    with pytest.raises(ValueError, match="do not fit"):
        qmatmul_experts_cpu(x[:, :32], jnp.zeros((2, 2), jnp.int32), (weight,), variant=variant)
    with pytest.raises(Exception, match="expert id is out of range"):
        jax.block_until_ready(qmatmul_experts_cpu(x, jnp.full((2, 2), N_EXPERT, jnp.int32), (weight,), variant=variant))


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_the_layer_through_the_kernel_matches_its_xla_paths(monkeypatch, ggml_type, tokens):
    """rz.models.moe.feed_forward with the experts' kernel and with its XLA paths (each choice at 1
    and 2 tokens, grouped by expert at 40): the same layer within the tolerance."""
    rows = 1 if tokens * 2 < N_EXPERT else moe.GROUP_ROWS
    if not experts_kernel_serves([random_qtensor(np.random.default_rng(0), ggml_type, (1, 8, 256))], rows):
        pytest.skip(f"the C++ experts' kernel does not take {ggml_type.name} experts at {tokens} tokens here")
    rng = np.random.default_rng(tokens)
    n_embd, n_ff = 256, 512 if ggml_type in (GGMLType.Q4_K,) else 96
    cfg = types.SimpleNamespace(n_expert=N_EXPERT, n_expert_used=2, normalize_expert_weights=True)
    experts = moe.Experts(
        router=random_qtensor(rng, GGMLType.Q8_0, (N_EXPERT, n_embd)),
        gate=random_qtensor(rng, ggml_type, (N_EXPERT, n_ff, n_embd)),
        up=random_qtensor(rng, ggml_type, (N_EXPERT, n_ff, n_embd)),
        down=random_qtensor(rng, ggml_type, (N_EXPERT, n_embd, n_ff)),
        shared=None,
    )
    h = jnp.asarray(activations(rng, tokens, n_embd))[None]
    through_kernel = np.asarray(moe.feed_forward(experts, h, cfg))
    monkeypatch.setattr(moe, "experts_kernel_serves", lambda weights, rows: False)
    through_xla = np.asarray(moe.feed_forward(experts, h, cfg))
    assert nmse(through_kernel, through_xla) <= TOLERANCE
