"""Attention as Pallas kernels for GPUs (Triton backend): flash attention for prefill, split-sequence decode.

Both walk the keys in blocks with an online softmax (FlashAttention-2): no [T, S] score matrix
is ever materialized. Masks come from positions (see rz_kernels.causal_attention for the contract), so
a key block in which no query of the tile sees any key is skipped, which is what makes causal
prefill and sliding windows cheap whatever the slot order of a ring buffer.

  - flash_attention: grid (batch, query head, query block); each program loops over all keys.
  - decode_attention: grid (batch, KV head, sequence split); each program holds all the query
    heads of its KV group (G * T rows, padded to 16 for tl.dot) and one split of the sequence,
    and returns unnormalized partial outputs with their running max and sum; XLA merges the
    splits. Long contexts get many programs even at batch 1, and K/V are read once.

With a block table (a paged pool, see rz_kernels.causal_attention), a key block is one pool block:
each program is given its KV head's whole pool and reads the block a table entry names, entry by
entry (the table read in the kernel, as vLLM's paged attention does: Triton has no scalar prefetch
to drive an index_map); an absent entry (-1) is skipped before anything of its block is read.

K and V come as any of rz_kernels.attention_kv's cache types, each leaf (a float array, or q8_0's
quants and scales) a block input of its own, converted to f32 one key block at a time in the kernel.

Reference twin: rz_kernels.causal_attention.attention_ref. interpret=True runs them on any backend.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rz_kernels.attention_kv import Q8_0_BLOCK
from rz_kernels.attention_scores import capped, visible

DOT_MIN_ROWS = 16  # tl.dot's smallest tile dimension


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _stored_leaves(stored) -> list[jax.Array]:
    """A K or V's arrays, each to be one block input: a float array, or q8_0's quants and scales."""
    return jax.tree.leaves(stored)


def _rows_f32(refs, at) -> jax.Array:
    """One key block of a K or V given as its leaves' refs, as f32 [n, D]: `at` is a slice of a
    sequence's slots (a slab) or a pool block's index (a pool)."""
    if len(refs) == 1:
        return refs[0][at].astype(jnp.float32)
    quants, scales = refs[0][at].astype(jnp.float32), refs[1][at].astype(jnp.float32)
    n, width = quants.shape
    expanded = jnp.broadcast_to(scales[:, :, None], (n, width // Q8_0_BLOCK, Q8_0_BLOCK)).reshape(n, width)
    return quants * expanded


def _slab_blocks(block_k: int):
    """Key block j of a slab's slots: always present, slots [j * block_k, (j + 1) * block_k)."""
    return lambda j: (None, pl.ds(j * block_k, block_k))


def _table_blocks(table_ref, first=0):
    """Key block j of a pool: the block of table entry first + j, present unless the entry is -1."""

    def locate(j):
        entry = table_ref[first + j]
        return entry >= 0, entry

    return locate


def _attend_blocks(q, q_pos, k_refs, v_refs, k_pos_ref, *, n_blocks, locate, window, scale, softcap):
    """Online softmax of q [R, D] over n_blocks key blocks of the refs -> (acc [R, Dv], max [R], sum [R]).

    locate(j) -> (present, at): block j's rows are refs[at], its positions k_pos_ref[at]; a block
    not present (None: always present) is never read. acc is unnormalized: the output is acc / sum.
    Rows that see no key end with sum 0.
    """
    rows = q.shape[0]
    dv = v_refs[0].shape[-1]

    def block(j, carry):
        present, at = locate(j)

        def visit(carry):
            seen = visible(q_pos[:, None], k_pos_ref[at][None, :], window)

            def update(carry):
                acc, running_max, running_sum = carry
                scores = jax.lax.dot_general(
                    q, _rows_f32(k_refs, at), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
                scores = capped(scores * scale, softcap)
                scores = jnp.where(seen, scores, -jnp.inf)
                new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
                # A row with nothing seen yet keeps max -inf; subtracting 0 instead keeps exp() at 0, not NaN.
                shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
                weights = jnp.exp(scores - shift[:, None])
                correction = jnp.exp(running_max - shift)
                running_sum = running_sum * correction + jnp.sum(weights, axis=1)
                acc = acc * correction[:, None] + jnp.dot(
                    weights, _rows_f32(v_refs, at), preferred_element_type=jnp.float32
                )
                return acc, new_max, running_sum

            any_seen = jnp.max(seen.astype(jnp.int32)) > 0
            return jax.lax.cond(any_seen, update, _unchanged, carry)

        return visit(carry) if present is None else jax.lax.cond(present, visit, _unchanged, carry)

    init = (
        jnp.zeros((rows, dv), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    return jax.lax.fori_loop(0, n_blocks, block, init)


def _unchanged(carry):
    return carry


def _kernel_refs(refs, n_k, n_v, paged):
    """A kernel's refs, in pallas_call's order: q, K's leaves, V's leaves, query and key positions,
    the block table where paged, then the outputs."""
    q_ref, k_refs, v_refs = refs[0], refs[1 : 1 + n_k], refs[1 + n_k : 1 + n_k + n_v]
    rest = refs[1 + n_k + n_v :]
    q_pos_ref, k_pos_ref = rest[:2]
    table_ref = rest[2] if paged else None
    return q_ref, k_refs, v_refs, q_pos_ref, k_pos_ref, table_ref, rest[3 if paged else 2 :]


def reads_blocks_of(block_size: int) -> bool:
    """Whether the kernels can read a paged pool of blocks of block_size slots (a power of two, a whole dot tile)."""
    return block_size >= DOT_MIN_ROWS and not block_size & (block_size - 1)


def _check_block_size(block_size: int) -> None:
    if not reads_blocks_of(block_size):
        raise ValueError(f"the Pallas kernels read pool blocks of a power of two >= {DOT_MIN_ROWS} slots, got {block_size}")


def _pool_specs(leaves, n_kv_of):
    """Block specs giving a program every pool block of its KV head (n_kv_of(*program ids)): the
    kernel reads the blocks its table names, one at a time."""
    return [
        pl.BlockSpec((leaf.shape[0], None, leaf.shape[2], leaf.shape[3]), lambda *ids: (0, n_kv_of(*ids), 0, 0))
        for leaf in leaves
    ]


def _flash_kernel(*refs, n_k, n_v, paged, block_k, **options):
    q_ref, k_refs, v_refs, q_pos_ref, k_pos_ref, table_ref, (o_ref,) = _kernel_refs(refs, n_k, n_v, paged)
    locate = _table_blocks(table_ref) if paged else _slab_blocks(block_k)
    acc, _, total = _attend_blocks(
        q_ref[...].astype(jnp.float32), q_pos_ref[...], k_refs, v_refs, k_pos_ref, locate=locate, **options
    )
    o_ref[...] = acc / jnp.where(total > 0, total, 1.0)[:, None]


@functools.partial(jax.jit, static_argnames=("window", "scale", "softcap", "block_q", "block_k", "interpret"))
def flash_attention(
    q,
    k,
    v,
    q_positions,
    k_positions,
    *,
    block_table=None,
    window: int = 0,
    scale: float = 1.0,
    softcap: float = 0.0,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
):
    """Prefill attention, shapes as rz_kernels.causal_attention: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> f32 [B, Hq, T, Dv].

    T and S are padded to the blocks (padding queries and keys see nothing); D and Dv must be powers
    of two. With block_table [B, n_table], k/v are a pool [N, Hkv, block_size, D] (block_size a power
    of two >= 16) with positions [N, block_size], read a pool block at a time through the table
    (block_k does not apply).
    """
    batch, n_head, length, head_dim = q.shape
    n_kv, dv = k.shape[1], v.shape[3]
    group = n_head // n_kv
    block_q = min(block_q, max(DOT_MIN_ROWS, _next_power_of_two(length)))
    length_padded = pl.cdiv(length, block_q) * block_q
    q = _pad_axis(q, 2, length_padded)
    q_positions = _pad_axis(q_positions.astype(jnp.int32), 1, length_padded, -1)
    k_positions = k_positions.astype(jnp.int32)
    if block_table is None:
        n_keys = k.shape[2]
        block_k = min(block_k, max(DOT_MIN_ROWS, _next_power_of_two(n_keys)))
        keys_padded = pl.cdiv(n_keys, block_k) * block_k
        k_leaves = [_pad_axis(leaf, 2, keys_padded) for leaf in _stored_leaves(k)]
        v_leaves = [_pad_axis(leaf, 2, keys_padded) for leaf in _stored_leaves(v)]
        kv_specs = [
            pl.BlockSpec((None, None, keys_padded, leaf.shape[3]), lambda b, h, i: (b, h // group, 0, 0))
            for leaf in (*k_leaves, *v_leaves)
        ]
        key_inputs = [_pad_axis(k_positions, 1, keys_padded, -1)]
        key_specs = [pl.BlockSpec((None, keys_padded), lambda b, h, i: (b, 0))]
        n_blocks = keys_padded // block_k
    else:
        _check_block_size(k.shape[2])
        block_k = k.shape[2]
        k_leaves, v_leaves = _stored_leaves(k), _stored_leaves(v)
        kv_specs = _pool_specs((*k_leaves, *v_leaves), lambda b, h, i: h // group)
        table = block_table.astype(jnp.int32)
        key_inputs = [k_positions, table]
        key_specs = [
            pl.BlockSpec(k_positions.shape, lambda b, h, i: (0, 0)),
            pl.BlockSpec((None, table.shape[1]), lambda b, h, i: (b, 0)),
        ]
        n_blocks = table.shape[1]
    kernel = functools.partial(
        _flash_kernel, n_k=len(k_leaves), n_v=len(v_leaves), paged=block_table is not None, n_blocks=n_blocks,
        block_k=block_k, window=window, scale=scale, softcap=softcap,
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, n_head, length_padded // block_q),
        in_specs=[
            pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
            *kv_specs,
            pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
            *key_specs,
        ],
        out_specs=pl.BlockSpec((None, None, block_q, dv), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, n_head, length_padded, dv), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="flash_attention",
    )(q, *k_leaves, *v_leaves, q_positions, *key_inputs)
    return out[:, :, :length]


def _decode_kernel(*refs, n_k, n_v, paged, block_k, **options):
    q_ref, k_refs, v_refs, q_pos_ref, k_pos_ref, table_ref, (o_ref, max_ref, sum_ref) = _kernel_refs(refs, n_k, n_v, paged)
    if paged:  # this split's entries of the table
        locate = _table_blocks(table_ref, pl.program_id(2) * options["n_blocks"])
    else:
        locate = _slab_blocks(block_k)
    acc, running_max, total = _attend_blocks(
        q_ref[...].astype(jnp.float32), q_pos_ref[...], k_refs, v_refs, k_pos_ref, locate=locate, **options
    )
    o_ref[...] = acc
    max_ref[...] = running_max
    sum_ref[...] = total


@functools.partial(jax.jit, static_argnames=("window", "scale", "softcap", "block_k", "split_k", "interpret"))
def decode_attention(
    q,
    k,
    v,
    q_positions,
    k_positions,
    *,
    block_table=None,
    window: int = 0,
    scale: float = 1.0,
    softcap: float = 0.0,
    block_k: int = 64,
    split_k: int | None = None,
    interpret: bool = False,
):
    """Decode attention (few queries per sequence), shapes and block_table as flash_attention; the
    sequence is split over split_k programs per KV head (default: about one per 512 keys, at most 16),
    each over a run of its slots, or of its table's entries."""
    batch, n_head, length, head_dim = q.shape
    n_kv, dv = k.shape[1], v.shape[3]
    group = n_head // n_kv
    rows = group * length
    rows_padded = max(DOT_MIN_ROWS, _next_power_of_two(rows))
    if block_table is None:
        block_k = min(block_k, max(DOT_MIN_ROWS, _next_power_of_two(k.shape[2])))
        n_blocks = pl.cdiv(k.shape[2], block_k)
    else:
        _check_block_size(k.shape[2])
        block_k, n_blocks = k.shape[2], block_table.shape[1]
    split_k = split_k or max(1, min(16, n_blocks * block_k // 512))
    blocks_per_split = pl.cdiv(n_blocks, split_k)

    # Row r = g * T + t of KV head h is query head h * G + g at step t.
    q_rows = _pad_axis(q.reshape(batch, n_kv, rows, head_dim), 2, rows_padded)
    row_positions = _pad_axis(jnp.tile(q_positions.astype(jnp.int32), (1, group)), 1, rows_padded, -1)
    k_positions = k_positions.astype(jnp.int32)
    if block_table is None:
        keys_padded = split_k * blocks_per_split * block_k
        split = keys_padded // split_k
        k_leaves = [_pad_axis(leaf, 2, keys_padded) for leaf in _stored_leaves(k)]
        v_leaves = [_pad_axis(leaf, 2, keys_padded) for leaf in _stored_leaves(v)]
        kv_specs = [
            pl.BlockSpec((None, None, split, leaf.shape[3]), lambda b, h, s: (b, h, s, 0))
            for leaf in (*k_leaves, *v_leaves)
        ]
        key_inputs = [_pad_axis(k_positions, 1, keys_padded, -1)]
        key_specs = [pl.BlockSpec((None, split), lambda b, h, s: (b, s))]
    else:
        k_leaves, v_leaves = _stored_leaves(k), _stored_leaves(v)
        kv_specs = _pool_specs((*k_leaves, *v_leaves), lambda b, h, s: h)
        # Padded with absent entries to whole splits.
        table = _pad_axis(block_table.astype(jnp.int32), 1, split_k * blocks_per_split, -1)
        key_inputs = [k_positions, table]
        key_specs = [
            pl.BlockSpec(k_positions.shape, lambda b, h, s: (0, 0)),
            pl.BlockSpec((None, table.shape[1]), lambda b, h, s: (b, 0)),
        ]
    kernel = functools.partial(
        _decode_kernel, n_k=len(k_leaves), n_v=len(v_leaves), paged=block_table is not None, n_blocks=blocks_per_split,
        block_k=block_k, window=window, scale=scale, softcap=softcap,
    )
    partial_out, partial_max, partial_sum = pl.pallas_call(
        kernel,
        grid=(batch, n_kv, split_k),
        in_specs=[
            pl.BlockSpec((None, None, rows_padded, head_dim), lambda b, h, s: (b, h, 0, 0)),
            *kv_specs,
            pl.BlockSpec((None, rows_padded), lambda b, h, s: (b, 0)),
            *key_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_padded, dv), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows_padded), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows_padded), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, n_kv, split_k, rows_padded, dv), jnp.float32),
            jax.ShapeDtypeStruct((batch, n_kv, split_k, rows_padded), jnp.float32),
            jax.ShapeDtypeStruct((batch, n_kv, split_k, rows_padded), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(q_rows, *k_leaves, *v_leaves, row_positions, *key_inputs)
    out = merge_splits(partial_out, partial_max, partial_sum)
    return out[:, :, :rows].reshape(batch, n_head, length, dv)


def merge_splits(partial_out: jax.Array, partial_max: jax.Array, partial_sum: jax.Array) -> jax.Array:
    """Combine per-split online-softmax states [..., split, R, Dv], [..., split, R] -> normalized [..., R, Dv]."""
    peak = jnp.max(partial_max, axis=-2, keepdims=True)
    peak = jnp.where(peak == -jnp.inf, 0.0, peak)
    weight = jnp.exp(partial_max - peak)
    total = jnp.sum(partial_sum * weight, axis=-2)
    out = jnp.sum(partial_out * weight[..., None], axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]
