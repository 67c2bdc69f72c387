"""Mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks the top-k experts
of each token, and their SwiGLU MLPs' outputs are summed with the router's weights (llama.cpp's
build_moe_ffn); Qwen2-MoE adds a shared expert every token goes through, scaled by a sigmoid gate.

The experts stay quantized as llama.cpp stores them: 3-D tensors [n_expert, rows, K], each expert's
matrix a slice of rows. On an x86-64 CPU the C++ experts' kernel (rz_kernels.moe_matmul) reads each
chosen expert's rows in place: all pairs' gate/up in one call, then all pairs' down in another
(where XLA's path would take the C++ kernel: decode steps, and K-quants' prompts). Elsewhere,
XLA's paths: a step with few tokens runs each (token, chosen expert) pair on that expert's slice
alone, so decode reads only the chosen experts' weights; a longer step groups its (token, expert)
pairs by expert and runs each expert on its own tokens, GROUP_ROWS at a time.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from rz.config import ModelConfig
from rz.models.layers import linear, swiglu, swiglu_mlp
from rz.weights import matrix, vector
from rz_kernels.moe_matmul import expert_matrix, experts_kernel_serves, qmatmul_experts_cpu
from rz_kernels.quants import QTensor


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SharedExpert:
    gate_inp: jax.Array  # [n_embd]: its sigmoid gate's weights (ffn_gate_inp_shexp)
    gate: QTensor  # [n_ff_shared_expert, n_embd]
    up: QTensor  # [n_ff_shared_expert, n_embd]
    down: QTensor  # [n_embd, n_ff_shared_expert]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Experts:
    router: QTensor  # [n_expert, n_embd] (ffn_gate_inp)
    gate: QTensor  # [n_expert, n_ff_expert, n_embd]
    up: QTensor  # [n_expert, n_ff_expert, n_embd]
    down: QTensor  # [n_expert, n_embd, n_ff_expert]
    shared: SharedExpert | None  # Qwen2-MoE's; None elsewhere


def expert_specs(layer: int, cfg: ModelConfig) -> Experts:
    blk, n_expert, n_embd, n_ff = f"blk.{layer}", cfg.n_expert, cfg.n_embd, cfg.n_ff_expert
    shared = None
    if cfg.n_ff_shared_expert:
        n_shared = cfg.n_ff_shared_expert
        shared = SharedExpert(
            gate_inp=vector(f"{blk}.ffn_gate_inp_shexp.weight", n_embd),
            gate=matrix(f"{blk}.ffn_gate_shexp.weight", n_shared, n_embd),
            up=matrix(f"{blk}.ffn_up_shexp.weight", n_shared, n_embd),
            down=matrix(f"{blk}.ffn_down_shexp.weight", n_embd, n_shared),
        )
    return Experts(
        router=matrix(f"{blk}.ffn_gate_inp.weight", n_expert, n_embd),
        gate=matrix(f"{blk}.ffn_gate_exps.weight", n_expert, n_ff, n_embd),
        up=matrix(f"{blk}.ffn_up_exps.weight", n_expert, n_ff, n_embd),
        down=matrix(f"{blk}.ffn_down_exps.weight", n_expert, n_embd, n_ff),
        shared=shared,
    )


def route(logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Router logits f32 [M, n_expert] -> (weights f32 [M, k], expert ids int32 [M, k]).

    Softmax over all experts, then the top k, renormalized to sum to 1 where the architecture does
    (norm_w): the same as Mixtral's top-k-then-softmax, and Qwen3-MoE's norm_topk_prob.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, cfg.n_expert_used)
    if cfg.normalize_expert_weights:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids


def feed_forward(experts: Experts, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The normed input h [B, T, n_embd] through the chosen experts -> f32 [B, T, n_embd]."""
    x = h.reshape(-1, h.shape[-1])
    weights, ids = route(linear(x, experts.router), cfg)
    out = _routed(experts, x, weights, ids, cfg)
    if experts.shared is not None:
        shared = experts.shared
        gate = jax.nn.sigmoid(x @ shared.gate_inp)[:, None]
        out = out + swiglu_mlp(x, shared.gate, shared.up, shared.down) * gate
    return out.reshape(h.shape)


def _routed(experts: Experts, x: jax.Array, weights: jax.Array, ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The chosen experts' SwiGLU outputs, weighted and summed per token: f32 [M, n_embd]."""
    each_choice = x.shape[0] * cfg.n_expert_used < cfg.n_expert

    def xla(experts, x, weights, ids):
        return _each_choice(experts, x, weights, ids) if each_choice else _by_expert(experts, x, weights, ids, cfg)

    def cpu(experts, x, weights, ids):
        # The kernel takes the step where XLA's path would send its matmuls (a row per choice, or
        # GROUP_ROWS per group) to the C++ kernel: it then rounds as that path does (a prompt's
        # 32-block experts keep XLA's exact f32 GEMM, as dense weights do), reading the experts in place.
        if experts_kernel_serves((experts.gate, experts.up, experts.down), 1 if each_choice else GROUP_ROWS):
            return _indexed(experts, x, weights, ids)
        return xla(experts, x, weights, ids)

    return jax.lax.platform_dependent(experts, x, weights, ids, cpu=cpu, default=xla)


def _indexed(experts: Experts, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
    """The C++ experts' kernel: every pair's gate and up in one call, their SwiGLU's down in another."""
    m, k = ids.shape
    gate, up = jnp.split(qmatmul_experts_cpu(x, ids, (experts.gate, experts.up)), [experts.gate.shape[1]], axis=1)
    down = qmatmul_experts_cpu(swiglu(gate, up), ids, (experts.down,))
    return jnp.sum(down.reshape(m, k, -1) * weights[..., None], axis=1)


def _expert(experts: Experts, e: jax.Array) -> tuple[QTensor, QTensor, QTensor]:
    """Expert e's gate, up and down matrices: slices of the 3-D tensors."""
    return expert_matrix(experts.gate, e), expert_matrix(experts.up, e), expert_matrix(experts.down, e)


def _each_choice(experts: Experts, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
    """One (token, chosen expert) pair at a time: only the chosen experts' weights are read."""
    m, k = ids.shape
    tokens = jnp.repeat(jnp.arange(m), k)

    def step(_, pair):
        token, expert, weight = pair
        return None, swiglu_mlp(x[token][None], *_expert(experts, expert))[0] * weight

    _, outputs = jax.lax.scan(step, None, (tokens, ids.reshape(-1), weights.reshape(-1)))
    return jnp.sum(outputs.reshape(m, k, -1), axis=1)


# Rows of one expert's matmul in a grouped step: a group holds up to this many of the expert's
# tokens, so the work is about (pairs / GROUP_ROWS + n_expert) matmuls of GROUP_ROWS rows.
GROUP_ROWS = 32


def _by_expert(experts: Experts, x: jax.Array, weights: jax.Array, ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The (token, expert) pairs sorted by expert and cut into groups of GROUP_ROWS pairs of one
    expert; each group is one matmul on that expert's slice, its outputs added to its tokens' rows.
    The number of groups depends on the routing, so the loop runs as long as there are groups."""
    m, k = ids.shape
    pairs = m * k
    order = jnp.argsort(ids.reshape(-1), stable=True)
    tokens = jnp.repeat(jnp.arange(m), k)[order]
    pair_weights = weights.reshape(-1)[order]
    counts = jnp.bincount(ids.reshape(-1), length=cfg.n_expert)
    starts = jnp.cumsum(counts) - counts
    groups = (counts + GROUP_ROWS - 1) // GROUP_ROWS
    groups_end = jnp.cumsum(groups)

    def group(g, total):
        expert = jnp.searchsorted(groups_end, g, side="right")
        rows = starts[expert] + (g - (groups_end[expert] - groups[expert])) * GROUP_ROWS + jnp.arange(GROUP_ROWS)
        valid = rows < starts[expert] + counts[expert]
        rows = jnp.minimum(rows, pairs - 1)
        weight = jnp.where(valid, pair_weights[rows], 0.0)[:, None]
        # Padding rows (past the expert's pairs) carry weight 0; the scatter sums rows that meet.
        return total.at[tokens[rows]].add(swiglu_mlp(x[tokens[rows]], *_expert(experts, expert)) * weight)

    return jax.lax.fori_loop(0, groups_end[-1], group, jnp.zeros_like(x, dtype=jnp.float32))
