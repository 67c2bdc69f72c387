"""Tensor parallelism over a JAX mesh: one rules table from logical axes to the mesh's `tensor`
axis, the weights and the KV cache placed by it, and the forward pass run per shard (shard_map).

q/k/v and gate/up are split by output rows (heads, FFN columns), as in Megatron, so each shard runs
attention over its own heads and its own slice of the FFN with the same kernels as one device.
attn_output and ffn_down, which Megatron splits by their contracted dimension and completes with a
psum, are split by output rows too (`Gathered`): their split input is gathered, each shard computes
its rows of the residual update over the whole input, and the rows are gathered. Every weight row
then meets exactly the activations it meets on one device, so tensor parallelism gives one
device's logits to the bit: the C++ kernels round activations to int8 per block, and a psum's
other summation order flips some of those roundings, which compounds over the layers (NMSE 1e-3
against one device on Gemma 3 270M). The communication is about a psum's: an all-gather of the
input and one of the output where a psum is a reduce-scatter and an all-gather. No weight is split
along its contracted dimension, so no shard ever holds part of a quantization block.

The LM head is split by vocabulary rows, its logits gathered for sampling. The embedding, the
norms, the residual stream, sampling and the host scheduler are replicated.

When the mesh is larger than the number of KV heads, each KV head is copied until every shard
holds one whole head (vLLM's replication): the KV cache then holds `kv_copies` copies of each head.
A shape that does not divide is an error naming it; nothing is padded.
"""

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rz import kv_cache
from rz.config import ModelConfig
from rz.errors import UnsupportedModelError
from rz_kernels.quants import QTensor

AXIS = "tensor"

# The rules table: the mesh axis each logical axis is split over (None: replicated on every shard).
RULES: dict[str, str | None] = {
    "heads": AXIS,
    "kv_heads": AXIS,
    "ffn": AXIS,
    "vocab": AXIS,  # the LM head's rows: each shard computes the logits of its slice of the vocabulary
    "residual": AXIS,  # the rows of attn_output and ffn_down: each shard computes a slice of the residual update
    "gathered": None,  # their contracted dimension, gathered before the product (Gathered)
    "lookup": None,  # the token embedding's rows: a lookup needs every row on every shard
    "embed": None,
    "head_dim": None,
    "rope": None,
}

# The logical axes of each weight, by its field name in the families' Weights pytrees ([N, K] for a
# matrix: output rows first, then the contracted dimension).
WEIGHT_AXES: dict[str, tuple[str, ...]] = {
    "token_embd": ("lookup", "embed"),
    "wq": ("heads", "embed"),
    "wk": ("kv_heads", "embed"),
    "wv": ("kv_heads", "embed"),
    "bq": ("heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "rope_freq_factors": ("rope",),
    "wo": ("residual", "gathered"),
    "bo": ("embed",),  # added once, after the sum across the mesh
    "w_gate": ("ffn", "embed"),
    "w_up": ("ffn", "embed"),
    "w_down": ("residual", "gathered"),
    "b_gate": ("ffn",),
    "b_up": ("ffn",),
    "b_down": ("embed",),
    "attn_norm": ("embed",),
    "attn_norm_bias": ("embed",),
    "ffn_norm": ("embed",),
    "post_attn_norm": ("embed",),
    "post_ffn_norm": ("embed",),
    "output_norm": ("embed",),
    "output_norm_bias": ("embed",),
    "output": ("vocab", "embed"),
    "output_bias": ("vocab",),
}

# Weights whose rows are KV heads: copied kv_copies times when the mesh is larger than n_kv_heads.
KV_HEAD_WEIGHTS = frozenset({"wk", "wv", "bk", "bv"})


class ShardingError(UnsupportedModelError):
    """The model cannot be split over the asked tensor-parallel size."""


@partial(jax.tree_util.register_dataclass, data_fields=("weight",), meta_fields=("axis",))
@dataclass(frozen=True)
class Gathered:
    """A shard's output rows of a weight whose input arrives split over `axis` (attn_output,
    ffn_down): rz.models.layers.linear gathers the input, multiplies, and gathers the rows."""

    weight: QTensor
    axis: str


def gather_last(shard: jax.Array, axis: str) -> jax.Array:
    """Inside shard_map: the shards' slices of the last dimension, concatenated in mesh order.

    Gathered on a new leading axis, then moved last: gathered along the last axis itself
    (all_gather(tiled=True)), XLA:CPU gives the result a layout under which a reduction over it
    (a norm, a softmax) sums in another order than over one device's array, and the last bits
    differ (Gemma 3's post-attention norm, in 2,155 of 10,240 elements of its first layer).
    """
    gathered = jax.lax.all_gather(shard, axis, axis=0)
    return jnp.moveaxis(gathered, 0, -2).reshape(*shard.shape[:-1], -1)


@dataclass(frozen=True)
class Plan:
    """How one model is split over a mesh of `size` devices along AXIS."""

    mesh: Mesh
    kv_copies: int  # each KV head is stored this many times (1 unless the mesh outnumbers the KV heads)

    @property
    def size(self) -> int:
        return self.mesh.shape[AXIS]

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config a shard's forward pass sees: its own heads and FFN slice."""
        return replace(
            cfg,
            n_head=cfg.n_head // self.size,
            n_head_kv=cfg.n_head_kv * self.kv_copies // self.size,
            n_ff=cfg.n_ff // self.size,
        )

    def cache_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of the whole (global) KV cache: every copy of every KV head."""
        return replace(cfg, n_head_kv=cfg.n_head_kv * self.kv_copies)


def provide_cpu_devices(count: int) -> None:
    """Give JAX's CPU backend `count` devices, one mesh member each, if JAX has not started yet
    (a command line's --tensor-parallel on a machine without accelerators; accelerators are
    unaffected). Once JAX runs, the devices are what they are: plan() says how to get more."""
    try:
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    except RuntimeError:
        pass  # backends already initialized


def plan(cfg: ModelConfig, tensor_parallel: int, devices: list | None = None) -> Plan:
    """The plan for cfg over the first `tensor_parallel` devices, after checking that every split
    dimension divides (a ShardingError naming the first that does not)."""
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ShardingError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    if cfg.n_expert:
        raise ShardingError(f"tensor parallelism does not split mixture-of-experts layers yet ({cfg.architecture})")
    from rz.models.gemma3 import WIDTH_SCALED_QUERY_LAYERS  # here: rz.models imports this module

    if tensor_parallel > 1 and cfg.n_layer == WIDTH_SCALED_QUERY_LAYERS.get(cfg.architecture):
        # Gemma 2/3 27B scale queries by embedding/heads; a shard's config holds its own heads only.
        raise ShardingError(f"tensor parallelism does not yet scale the queries of the {cfg.n_layer}-layer "
                            f"{cfg.architecture} (27B) as one device does; run it with tensor_parallel=1")
    name = f"{cfg.architecture} model"
    for what, count in (("query heads (attention.head_count)", cfg.n_head), ("FFN columns (feed_forward_length)", cfg.n_ff),
                        ("embedding columns (embedding_length)", cfg.n_embd), ("vocabulary rows (the LM head)", cfg.n_vocab)):
        if count % tensor_parallel:
            raise ShardingError(
                f"the {name}'s {count} {what} do not divide over {tensor_parallel} devices; "
                f"choose a tensor_parallel that divides {count}"
            )
    n_kv = cfg.n_head_kv
    if n_kv % tensor_parallel == 0:
        kv_copies = 1
    elif tensor_parallel % n_kv == 0:
        kv_copies = tensor_parallel // n_kv
    else:
        raise ShardingError(
            f"the {name}'s {n_kv} KV heads (attention.head_count_kv) neither divide over {tensor_parallel} devices "
            f"nor divide {tensor_parallel} (to be replicated); choose a tensor_parallel that divides {n_kv} or is a multiple of it"
        )
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel > len(devices):
        raise ShardingError(
            f"tensor_parallel={tensor_parallel} needs {tensor_parallel} devices, but JAX sees {len(devices)} "
            f"({devices[0].platform}); on CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count={tensor_parallel}"
        )
    return Plan(Mesh(np.asarray(devices[:tensor_parallel]), (AXIS,)), kv_copies)


# ----- weights -----


def _axes(path) -> tuple[str, ...]:
    """The logical axes of the weight at a pytree path, by its field name."""
    names = [key.name for key in path if isinstance(key, jax.tree_util.GetAttrKey)]
    field = names[-1] if names else "?"
    if field not in WEIGHT_AXES:
        raise ShardingError(
            f"tensor parallelism does not know how to split the weight {jax.tree_util.keystr(path)}; "
            "add its logical axes to rz.sharding.WEIGHT_AXES"
        )
    return WEIGHT_AXES[field]


def _spec(axes: tuple[str, ...]) -> P:
    return P(*(RULES[axis] for axis in axes))


def _leaf_specs(leaf, axes: tuple[str, ...]):
    """The PartitionSpecs of one weight: one per array of a QTensor, all split alike (rz_kernels.quants' layout)."""
    spec = _spec(axes)
    if isinstance(leaf, QTensor):
        return QTensor({name: spec for name in leaf.arrays}, leaf.ggml_type, leaf.shape)
    return spec


def _is_weight(leaf) -> bool:
    return isinstance(leaf, QTensor)


def weight_specs(weights: Any) -> Any:
    """The weights pytree with each array's PartitionSpec in its place (shard_map's in_specs)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _leaf_specs(leaf, _axes(path)), weights, is_leaf=_is_weight)


def place(weights: Any, plan: Plan, cfg: ModelConfig) -> Any:
    """The weights split over the plan's mesh by the rules table, KV heads copied as the plan says."""

    def put(path, leaf):
        axes = _axes(path)
        if plan.kv_copies > 1 and axes[0] == "kv_heads":
            leaf = jax.tree.map(partial(_repeat_heads, heads=cfg.n_head_kv, copies=plan.kv_copies), leaf)
            if isinstance(leaf, QTensor):
                leaf = replace(leaf, shape=(leaf.shape[0] * plan.kv_copies, *leaf.shape[1:]))
        specs = _leaf_specs(leaf, axes)
        return jax.tree.map(lambda array, spec: jax.device_put(array, NamedSharding(plan.mesh, spec)), leaf, specs)

    return jax.tree_util.tree_map_with_path(put, weights, is_leaf=_is_weight)


def _repeat_heads(array: jax.Array, heads: int, copies: int) -> jax.Array:
    """Rows [heads * n, ...] with each head's n rows repeated `copies` times in place: h0, h0, h1, h1, ..."""
    per_head = array.reshape(heads, -1, *array.shape[1:])
    return jnp.repeat(per_head, copies, axis=0).reshape(-1, *array.shape[1:])


def _localize(weights: Any, size: int) -> Any:
    """Inside shard_map: each QTensor's shape made its shard's (no weight is split along K), and
    the projections back into the residual stream wrapped in Gathered."""

    def local(path, leaf):
        if not isinstance(leaf, QTensor):
            return leaf
        rows, _ = _axes(path)
        n, k = leaf.shape
        shard = QTensor(leaf.arrays, leaf.ggml_type, (n // size if RULES[rows] else n, k))
        return Gathered(shard, RULES[rows]) if rows == "residual" else shard

    return jax.tree_util.tree_map_with_path(local, weights, is_leaf=_is_weight)


# ----- the KV cache -----


def _cache_specs(cache: kv_cache.KVCache) -> kv_cache.KVCache:
    """Keys and values split over their KV heads (axis 1 of a pool); slot positions and block tables replicated."""

    def pool(one: kv_cache.LayerCache) -> kv_cache.LayerCache:
        heads = P(None, AXIS)
        return kv_cache.LayerCache(
            keys=jax.tree.map(lambda _: heads, one.keys), values=jax.tree.map(lambda _: heads, one.values), positions=P()
        )

    return replace(cache, pools=tuple(pool(one) for one in cache.pools), tables=tuple(P() for _ in cache.tables))


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def init_cache(
    plan: Plan, cfg: ModelConfig, n_rows: int, n_ctx: int, types: kv_cache.CacheTypes, block_size: int, max_write: int | None,
    n_blocks: tuple[int, int] | None = None,
) -> kv_cache.KVCache:
    """An empty KV cache split over the plan's mesh by KV heads (each head's copies included)."""
    cache = kv_cache.init_cache(
        plan.cache_config(cfg), n_rows, n_ctx, types, block_size=block_size, max_write=max_write, n_blocks=n_blocks
    )
    shardings = jax.tree.map(lambda spec: NamedSharding(plan.mesh, spec), _cache_specs(cache))
    return jax.lax.with_sharding_constraint(cache, shardings)


# ----- the forward pass, per shard -----


def forward(plan: Plan, forward_fn: Callable, weights, cache, tokens, positions, tables, *, family, cfg):
    """forward_fn (rz.models.forward) run on every shard with its heads, FFN slice and KV cache shard."""
    local_cfg = plan.local_config(cfg)
    cache_specs = _cache_specs(cache)

    def shard(weights, cache, tokens, positions, tables):
        return forward_fn(_localize(weights, plan.size), cache, tokens, positions, tables, family=family, cfg=local_cfg)

    return jax.shard_map(
        shard, mesh=plan.mesh, in_specs=(weight_specs(weights), cache_specs, P(), P(), P()),
        out_specs=(P(), cache_specs), check_vma=False,
    )(weights, cache, tokens, positions, tables)


def lm_head(plan: Plan, lm_head_fn: Callable, weights, hidden, *, family, cfg):
    """lm_head_fn (rz.models.lm_head) on every shard's vocabulary rows, the logits then gathered:
    sampling reads whole rows, and XLA's partitioner, left to split its top-k by vocabulary,
    fails to compile it (a TopkDecomposer check on XLA:CPU, jax 0.10.2)."""
    local_cfg = plan.local_config(cfg)

    def shard(weights, hidden):
        logits = lm_head_fn(_localize(weights, plan.size), hidden, family=family, cfg=local_cfg)
        return gather_last(logits, RULES["vocab"])

    return jax.shard_map(
        shard, mesh=plan.mesh, in_specs=(weight_specs(weights), P()), out_specs=P(), check_vma=False
    )(weights, hidden)
