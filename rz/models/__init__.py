"""Model families and the forward pass they share: `load_model(gguf, cfg) -> Model`.

A family module (llama.py, qwen3.py, phi2.py, phi3.py, gemma2.py, gemma3.py) provides the functions its FAMILY names (see
rz.models.family): its weights, embedding, transformer block and head. The stack of blocks over
the KV cache is driven from here, once for all families.
"""

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rz import kv_cache, multihost, sharding
from rz.config import SUPPORTED_ARCHITECTURES, ModelConfig
from rz.errors import UnsupportedModelError
from rz.gguf import GGUFFile
from rz.kv_cache import KVCache
import rz_kernels
from rz.models import attention, gemma2, gemma3, llama, phi2, phi3, qwen3
from rz.models.family import Family
from rz.models.layer_stacks import is_matrix, layer_runs, repeat_period, run_members, run_stacks, stack_layers
from rz.models.layers import ByLayer, Rope, RopeTable, rope_table
from rz.weights import load_weights
from rz_kernels.quantized_matmul import by_layer_in_one_call

__all__ = ["SUPPORTED_ARCHITECTURES", "Family", "Model", "load_model", "load_replicas"]


# llama.cpp's qwen2 graph is its llama graph with NeoX RoPE (layers.NEOX_ROPE); the q/k/v biases
# Qwen2 needs are optional tensors of every architecture's attention (weights.attention_projections).
# SmolLM3's is the llama graph with RoPE left out of some layers (ModelConfig.rope_layers);
# Qwen3-MoE's is Qwen3's with experts (ModelConfig.n_expert), as Mixtral's and Qwen2-MoE's are llama's.
FAMILIES: dict[str, Family] = {
    "llama": llama.FAMILY,
    "qwen2": llama.FAMILY,
    "qwen2moe": llama.FAMILY,
    "qwen3": qwen3.FAMILY,
    "qwen3moe": qwen3.FAMILY,
    "smollm3": llama.FAMILY,
    "phi2": phi2.FAMILY,
    "phi3": phi3.FAMILY,
    "gemma2": gemma2.FAMILY,
    "gemma3": gemma3.FAMILY,
}
assert set(FAMILIES) == set(SUPPORTED_ARCHITECTURES)


def forward(
    weights: Any,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    tables: dict[bool, RopeTable] | None = None,
    *,
    family: Family,
    cfg: ModelConfig,
    plan: sharding.Plan | None = None,
) -> tuple[jax.Array, KVCache]:
    """tokens, positions int32 [B, T] (position -1: padding) -> (f32 [B, T, n_embd] after the final norm, cache).

    tables: rope_tables(weights, positions), if the caller made them (see rope_tables).
    plan: the tensor-parallel split of weights and cache (rz.sharding), or None on one device.
    """
    if plan is not None:
        return sharding.forward(plan, forward, weights, cache, tokens, positions, tables, family=family, cfg=cfg)
    with jax.named_scope("embed"):
        x = family.embed(weights, tokens, cfg)
        if tables is None:
            tables = rope_tables(weights, positions, family=family, cfg=cfg)
        writes = write_slots(cache, positions)
    period = loop_period(weights, cfg, tokens.size)
    run = _unrolled if period is None else partial(_looped, period=period)
    x, pools = run(weights, cache, x, positions, tables, writes, family=family, cfg=cfg)
    with jax.named_scope("final_norm"):
        hidden = family.final_norm(weights, x, cfg)
    return hidden, replace(cache, pools=pools)


def _unrolled(weights, cache: KVCache, x, positions, tables, writes, *, family: Family, cfg: ModelConfig):
    """The layers one after another in the step's graph: (x, the cache's pools)."""
    pools = list(cache.pools)
    for layer, layer_weights in enumerate(weights.layers):
        sliding = cfg.sliding_layers[layer]
        view = kv_cache.layer_view(pools[sliding], cache.tables[sliding][: x.shape[0]], cache.first_block(layer), writes[sliding])
        with jax.named_scope(f"block_{layer}"):
            # A block depends on its index only through its kind (see ModelConfig.layer_kind): the first
            # layer of that kind stands for it, so that the layers of a kind share one trace (see _block).
            x, view = _block(layer_weights, view, x, positions, tables[sliding], layer=cfg.layer_kind(layer), family=family, cfg=cfg)
        pools[sliding] = view.layer
    return x, tuple(pools)


def _looped(weights, cache: KVCache, x, positions, tables, writes, *, period: int, family: Family, cfg: ModelConfig):
    """The layers as a loop over groups of `period` layers (loop_period), whose body is one group:
    (x, the cache's pools). A run of alike layers in the group (layer_stacks.layer_runs: Gemma 3's
    five sliding ones) is an inner loop over one layer, so the body holds one layer per run. Each
    matmul takes its layer's weight by the loops' index (ByLayer), and each layer its blocks of its
    kind's pool by offset, so the loops copy neither. The weights come stacked per run (rz.models.
    layer_stacks: at load, or here in the graph where the model was not stacked), the small
    vectors (norms, biases) sliced per iteration."""
    n_groups = len(weights.layers) // period
    runs = layer_runs(weights, cfg)
    stacks = getattr(weights.layers, "stacks", None)
    if stacks is not None and tuple(stack.run for stack in stacks) == runs:
        groups = [(stack.treedef, list(stack.matrices), list(stack.vectors)) for stack in stacks]
    else:
        groups = [run_stacks([weights.layers[l] for l in run_members(len(weights.layers), runs, r)]) for r in range(len(runs))]

    def layer(x, pool, treedef, matrices, vectors, index, layer_of_kind, start):
        sliding = cfg.sliding_layers[start]
        leaves = [vector if matrix is None else ByLayer(matrix, index) for matrix, vector in zip(matrices, vectors)]
        view = kv_cache.layer_view(pool, cache.tables[sliding][: x.shape[0]], layer_of_kind * cache.layer_blocks[sliding], writes[sliding])
        x, view = _block(
            jax.tree.unflatten(treedef, leaves), view, x, positions, tables[sliding], layer=cfg.layer_kind(start), family=family, cfg=cfg
        )
        return x, view.layer

    def group(carry, xs):
        x, pools = carry
        index, vectors = xs
        pools = list(pools)
        for (start, length), (treedef, matrices, _), stacked in zip(runs, groups, vectors):
            sliding = cfg.sliding_layers[start]
            first_of_kind = index * cfg.sliding_layers[:period].count(sliding) + cfg.sliding_layers[:start].count(sliding)
            with jax.named_scope(f"block_{start}"):
                if length == 1:
                    x, pools[sliding] = layer(x, pools[sliding], treedef, matrices, stacked, index, first_of_kind, start)
                    continue

                def alike(carry, ys, treedef=treedef, matrices=matrices, length=length, start=start, first_of_kind=first_of_kind):
                    x, pool = carry
                    i, layer_vectors = ys
                    return layer(x, pool, treedef, matrices, layer_vectors, index * length + i, first_of_kind + i, start), None

                (x, pools[sliding]), _ = jax.lax.scan(alike, (x, pools[sliding]), (jnp.arange(length, dtype=jnp.int32), stacked))
        return (x, tuple(pools)), None

    # Each run's vectors [groups * length, ...] as [groups, length, ...] for a run of several layers.
    per_group = [
        [v if v is None or length == 1 else v.reshape(n_groups, length, *v.shape[1:]) for v in vectors]
        for (_, length), (_, _, vectors) in zip(runs, groups)
    ]
    xs = (jnp.arange(n_groups, dtype=jnp.int32), per_group)
    (x, pools), _ = jax.lax.scan(group, (x, cache.pools), xs)
    return x, pools


def loop_period(weights: Any, cfg: ModelConfig, rows: int) -> int | None:
    """The run of layers a step of `rows` rows loops over (layer_stacks.repeat_period), or None
    where the layers are unrolled.

    A loop needs the layer-indexed matmul to be one kernel call (rz_kernels.quantized_matmul.by_layer_in_one_call:
    the C++ CPU kernel at this many rows); an XLA path would pick a layer's weight by a switch over
    all of them. A mixture of experts stays unrolled. RZ_LAYER_LOOP=0 unrolls every step (to compare)."""
    period = repeat_period(weights, cfg)
    if period is None:
        return None
    matrices = [[leaf for leaf in jax.tree.leaves(layer, is_leaf=is_matrix) if is_matrix(leaf)] for layer in weights.layers]
    if not all(by_layer_in_one_call([(w,) for w in column], rows) for column in zip(*matrices)):
        return None
    return period


def write_slots(cache: KVCache, positions: jax.Array) -> dict[bool, kv_cache.WriteSlots]:
    """Where a chunk at positions [B, T] goes in each kind of layer's blocks (sliding: True, global:
    False), computed once for all the layers of a kind (each layer adds its offset in the pool).

    Behind an optimization barrier: XLA would otherwise copy the index arithmetic into every
    layer's scatter fusions, and each instruction of a compiled step stays resident with its
    executable (its HLO, kept twice when loaded from the compilation cache; the measurements are
    in benchmarks/results/memory-session22.md)."""
    return jax.lax.optimization_barrier({
        sliding: kv_cache.write_slots(cache.tables[sliding][: positions.shape[0]], positions, cache.pools[sliding].block_size)
        for sliding in set(cache.kinds)
    })


# One block, jitted: JAX traces and lowers it once per kind of layer (and per weight types) and
# calls that one function from every layer of the kind; XLA inlines the calls, so the compiled
# step is the same graph, and tracing a deep model costs one layer per kind instead of every layer.
@partial(jax.jit, static_argnames=("layer", "family", "cfg"))
def _block(layer_weights, layer_cache, x, positions, rope_table, *, layer: int, family: Family, cfg: ModelConfig):
    return family.block(layer_weights, layer_cache, x, positions, rope_table, layer, cfg)


def rope_tables(weights: Any, positions: jax.Array, *, family: Family, cfg: ModelConfig) -> dict[bool, RopeTable]:
    """The RoPE table of each kind of layer (sliding: True, global: False) at positions [..., T].

    XLA:CPU fuses the cos and sin into their users, and so computes them again for every head of
    every layer. So the steps take their tables made outside them: a decode call makes the tables
    of all its steps before its loop (XLA does not fuse across the loop's boundary), and a prefill
    chunk's come from a small compiled call of their own (rope_tables_for).
    """
    return rope_tables_for(family.rope_freq_factors(weights), positions, cfg=cfg)


def rope_tables_for(freq_factors: jax.Array | None, positions: jax.Array, *, cfg: ModelConfig) -> dict[bool, RopeTable]:
    """rope_tables, given the family's rope_freq_factors(weights)."""
    return {
        sliding: rope_table(positions, Rope.for_layer(cfg, sliding), freq_factors)
        for sliding in sorted(set(cfg.sliding_layers))
    }


def lm_head(weights: Any, hidden: jax.Array, *, family: Family, cfg: ModelConfig, plan: sharding.Plan | None = None) -> jax.Array:
    """hidden f32 [..., n_embd] -> logits f32 [..., n_vocab] (split by vocabulary over a plan's mesh)."""
    if plan is not None:
        return sharding.lm_head(plan, lm_head, weights, hidden, family=family, cfg=cfg)
    with jax.named_scope("lm_head"):
        return family.lm_head(weights, hidden, cfg)


def attention_probs(weights: Any, tokens: jax.Array, layer: int, *, family: Family, cfg: ModelConfig) -> jax.Array:
    """Attention weights f32 [n_head, T, T] of one layer over a prompt tokens [T] (a reference path)."""
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    cache = kv_cache.init_cache(cfg, 1, tokens.shape[1])
    x = family.embed(weights, tokens, cfg)
    tables = rope_tables(weights, positions, family=family, cfg=cfg)
    for below in range(layer):
        sliding = cfg.sliding_layers[below]
        x, _ = family.block(weights.layers[below], cache.view(below, 1), x, positions, tables[sliding], below, cfg)
    queries, keys, _, scale = family.attention_inputs(weights.layers[layer], x, tables[cfg.sliding_layers[layer]], layer, cfg)
    probs = rz_kernels.attention_weights(
        queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3), positions, positions,
        window=attention.layer_window(cfg, layer), scale=scale, softcap=cfg.attn_logit_softcap,
    )
    return probs[0]


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: its config, its weights pytree, and its family; the methods are the module's
    pure functions with this model's family and config."""

    cfg: ModelConfig
    weights: Any
    family: Family
    plan: sharding.Plan | None = None  # tensor parallelism: how weights and cache are split (None: one device)
    # How an engine makes its device calls, launch(step, *args, **static): directly, or, on a mesh
    # of several processes, through rz.multihost (process 0 leads, the others follow).
    launch: Callable = multihost.call

    def forward(self, weights: Any, cache: KVCache, tokens: jax.Array, positions: jax.Array, tables=None):
        """forward() of this model: (hidden after the final norm, cache)."""
        return forward(weights, cache, tokens, positions, tables, family=self.family, cfg=self.cfg)

    def lm_head(self, weights: Any, hidden: jax.Array) -> jax.Array:
        return lm_head(weights, hidden, family=self.family, cfg=self.cfg)

    def rope_tables(self, weights: Any, positions: jax.Array) -> dict[bool, RopeTable]:
        return rope_tables(weights, positions, family=self.family, cfg=self.cfg)

    def attention_probs(self, weights: Any, tokens: jax.Array, layer: int) -> jax.Array:
        """attention_probs() of this model: f32 [n_head, T, T] for a prompt tokens [T]."""
        return attention_probs(weights, tokens, layer, family=self.family, cfg=self.cfg)

    def init_cache(
        self, n_rows: int, n_ctx: int, types: kv_cache.CacheTypes = kv_cache.CacheTypes(), *,
        block_size: int = kv_cache.BLOCK_SIZE, max_write: int | None = None, n_blocks: tuple[int, int] | None = None,
    ) -> KVCache:
        """kv_cache.init_cache for this model: n_rows sequences of up to n_ctx positions (split as the plan says)."""
        if self.plan is not None:
            return sharding.init_cache(self.plan, self.cfg, n_rows, n_ctx, types, block_size, max_write, n_blocks)
        return kv_cache.init_cache(self.cfg, n_rows, n_ctx, types, block_size=block_size, max_write=max_write, n_blocks=n_blocks)


def load_model(gguf: GGUFFile, cfg: ModelConfig, tensor_parallel: int = 1) -> Model:
    """The model in gguf, weights loaded (matrices quantized) onto the default device, or split
    over `tensor_parallel` devices (rz.sharding; checked to divide before anything is read)."""
    family = _family(gguf, cfg)
    if tensor_parallel == 1:
        return Model(cfg, stack_layers(load_weights(gguf, family.tensor_specs(cfg)), cfg), family)
    plan = sharding.plan(cfg, tensor_parallel)
    multihost.check_mesh(plan.mesh)
    model = Model(cfg, sharding.place(load_weights(gguf, family.tensor_specs(cfg)), plan, cfg), family, plan)
    return replace(model, launch=multihost.launcher(model)) if multihost.spans_processes(plan.mesh) else model


def load_replicas(gguf: GGUFFile, cfg: ModelConfig, tensor_parallel: int, replicas: int) -> list[Model]:
    """Data parallelism: `replicas` copies of the model, the r-th over devices r*tensor_parallel
    onward (a mesh of its own, even of one device), the file read once."""
    family = _family(gguf, cfg)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise sharding.ShardingError(f"data_parallel must be a positive integer, got {replicas!r}")
    devices = jax.devices()
    if jax.process_count() > 1:
        raise sharding.ShardingError("data parallelism over several processes is not supported; run one server per host")
    if tensor_parallel * replicas > len(devices):
        raise sharding.ShardingError(
            f"{replicas} replicas of {tensor_parallel} devices each need {tensor_parallel * replicas} devices, but JAX sees "
            f"{len(devices)} ({devices[0].platform}); on CPU, start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={tensor_parallel * replicas}"
        )
    plans = [sharding.plan(cfg, tensor_parallel, devices[r * tensor_parallel :]) for r in range(replicas)]
    weights = load_weights(gguf, family.tensor_specs(cfg))
    return [Model(cfg, sharding.place(weights, plan, cfg), family, plan) for plan in plans]


def _family(gguf: GGUFFile, cfg: ModelConfig) -> Family:
    if cfg.architecture not in FAMILIES:
        raise UnsupportedModelError(
            f"{gguf.path}: architecture {cfg.architecture!r} is not supported; "
            f"rz supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return FAMILIES[cfg.architecture]
