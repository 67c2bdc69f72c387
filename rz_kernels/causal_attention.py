"""Causal self-attention with grouped-query heads, masks from absolute positions, optional sliding window.

    o = attention(q, k, v, q_positions, k_positions, window=0, scale=1.0, softcap=0.0)

    q            [B, Hq, T, D]   queries (T = 1 for a decode step)
    k, v         [B', Hkv, S, D], [B', Hkv, S, Dv], B' >= B (a cache may hold idle rows past
                 the batch in use: sequence b reads row b); query head h reads KV head h // (Hq / Hkv).
                 Each stored as any of rz_kernels.attention_kv's cache types (f32, f16, bf16,
                 q8_0), K and V independently; every implementation reads them as stored.
    q_positions  int32 [B, T]    absolute position of each query
    k_positions  int32 [B', S]   absolute position held by each key slot; -1: an empty slot
    -> o         f32 [B, Hq, T, Dv]

or, with block_table, K/V in a paged pool (rz_kernels.attention_kv.paged_as_slab):

    k, v         [N, Hkv, block_size, D], [N, Hkv, block_size, Dv]: the pool's blocks
    k_positions  int32 [N, block_size]   the position each pool slot holds; -1: empty
    block_table  int32 [B', n_table]     sequence b's slot i lives in block block_table[b, i // block_size]
                 at i % block_size; -1: absent (never read). S = n_table * block_size slots, as in a slab.

Every implementation computes on a pool what it computes on the slab paged_as_slab gathers from it
(the C++ kernels bit for bit); the C++ and Pallas kernels read the pool in place.

A query at position p sees the key at position k iff 0 <= k <= p and, with window > 0, k > p -
window (llama.cpp's masks; rz.kv_cache keeps one position per slot, ring buffers included, so
the slots' order does not matter). Scores are q.k * scale, then softcap * tanh(s / softcap) if
softcap > 0. A query that sees no key (padding) gets zeros.

Implementations: `attention_ref` (materialized scores, the reference twin); `attention_cpu`
(decode steps by the C++ kernel `decode_attention_cpu`, which streams K/V once; prompts by the C++
flash attention `prompt_attention_cpu`, whose queries-times-keys product is in int16 for an f16 or
bf16 K in an AVX-512 VNNI build (takes_int16_scores) and whose weights-times-values product is in
bf16 for an f16 or bf16 V on a CPU with AVX-512 BF16 (takes_bf16_values); without the kernels,
the reference's math in query chunks, so memory stays bounded); the Pallas kernels in
attention_pallas (flash attention for prefill, split-sequence decode attention). `attention`
picks one per backend and T.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels import attention_kv, cpu_ffi, quantized_matmul
from rz_kernels.attention_kv import Q8_0Rows, paged_as_slab
from rz_kernels.attention_scores import capped, visible

log = logging.getLogger("rz_kernels")

# Up to this many queries per sequence, a step takes the decode kernels (split over the sequence):
# the C++ one on CPU, the Pallas one on GPU.
DECODE_MAX_T = 16
# The CPU formulation materializes scores for this many queries at a time.
CPU_QUERY_CHUNK = 256
# With keys in order, a chunk of queries attends over the first slots up to its latest position,
# rounded up to this span times a power of two (a few compiled branches per cache size), instead
# of the whole cache: scoring 1,100 tokens in a 2,048-slot cache scored every chunk against all 2,048.
MIN_KEY_SPAN = 256


def _grouped_softmax(q, k, q_positions, k_positions, window, scale, softcap, precision):
    """Attention weights f32 [B, Hkv, Hq / Hkv, T, S], query heads grouped per KV head (no K repeat);
    a query that sees no key gets all zeros."""
    batch, n_head, length, head_dim = q.shape
    n_kv = k.shape[1]
    grouped = q.reshape(batch, n_kv, n_head // n_kv, length, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bkgtd,bksd->bkgts", grouped, attention_kv.to_f32(k), precision=precision)
    scores = capped(scores * scale, softcap)
    mask = visible(q_positions[:, :, None], k_positions[:, None, :], window)[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def _grouped_attention(q, k, v, q_positions, k_positions, window, scale, softcap, precision):
    """Materialized-score attention with query heads grouped per KV head: no K/V repeat."""
    batch, n_head, length, _ = q.shape
    weights = _grouped_softmax(q, k, q_positions, k_positions, window, scale, softcap, precision)
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, attention_kv.to_f32(v), precision=precision)
    return out.reshape(batch, n_head, length, v.shape[-1])


def attention_weights(
    q, k, q_positions, k_positions, *, block_table=None, window: int = 0, scale: float = 1.0, softcap: float = 0.0
):
    """The reference's softmax weights f32 [B, Hq, T, S] (an attention map); shapes as attention_ref."""
    k, _, k_positions = _as_slab(q, k, k, k_positions, block_table)
    batch, n_head, length, _ = q.shape
    weights = _grouped_softmax(q, k, q_positions, k_positions, window, scale, softcap, jax.lax.Precision.HIGHEST)
    return weights.reshape(batch, n_head, length, k.shape[2])


@functools.partial(jax.jit, static_argnames=("window", "scale", "softcap"))
def attention_ref(
    q, k, v, q_positions, k_positions, *, block_table=None, window: int = 0, scale: float = 1.0, softcap: float = 0.0
):
    """The reference: every score materialized, f32 at HIGHEST precision. Shapes in the module docstring
    (a pool is first gathered into a slab)."""
    k, v, k_positions = _as_slab(q, k, v, k_positions, block_table)
    return _grouped_attention(q, k, v, q_positions, k_positions, window, scale, softcap, jax.lax.Precision.HIGHEST)


def decode_attention_cpu(
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
    keys_in_order: bool = False,
    variant: cpu_ffi.Variant | None = None,
):
    """The C++ decode kernel (rz_kernels/cpu/attention.cc): K/V (any cache type) streamed once, split
    over the sequence across threads. Shapes as attention_ref; head dims multiples of 8.

    keys_in_order promises that slot s holds position s or is empty (a KV cache that never wraps;
    with a block table, logical slot s: a table whose entry j holds positions j * block_size on),
    so the kernel stops at the latest query position instead of scanning every slot. block_table:
    K/V are a paged pool, read in place through it. variant picks a build of the kernel (default:
    the one this CPU runs)."""
    variant = cpu_ffi.active(variant)
    return _ffi_attention(
        cpu_ffi.attention_target(variant), q, k, v, q_positions, k_positions, block_table,
        window=window, scale=scale, softcap=softcap, keys_in_order=keys_in_order,
    )


def prompt_attention_cpu(
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
    keys_in_order: bool = False,
    bf16_values: bool | None = None,
    int16_scores: bool | None = None,
    variant: cpu_ffi.Variant | None = None,
):
    """The C++ prompt kernel (rz_kernels/cpu/attention_prompt.cc): a flash attention over K/V as
    stored, tiles of query rows across threads, each query's result independent of the others in
    the call. Shapes and keys_in_order as decode_attention_cpu; head dims multiples of 16.
    bf16_values: weights times values in bf16 products (default: where takes_bf16_values says).
    int16_scores: queries times keys in int16 products (default: where takes_int16_scores says)."""
    variant = cpu_ffi.active(variant)
    if bf16_values is None:
        bf16_values = takes_bf16_values(v, variant)
    if int16_scores is None:
        int16_scores = takes_int16_scores(k, variant)
    return _ffi_attention(
        cpu_ffi.prompt_attention_target(variant), q, k, v, q_positions, k_positions, block_table,
        window=window, scale=scale, softcap=softcap, keys_in_order=keys_in_order, bf16_values=bool(bf16_values),
        int16_scores=bool(int16_scores),
    )


def takes_bf16_values(v, variant: cpu_ffi.Variant | None = None) -> bool:
    """Whether the prompt kernel multiplies the softmax's weights by V in bf16 products by default:
    where V is stored as a 16-bit float (f16 or bf16) and the CPU has AVX-512 BF16, whose vdpbf16ps
    does twice the multiply-adds of an f32 FMA. The weights and an f16 V lose their lowest bits
    (llama.cpp's own P.V keeps its output in f16); the sums stay f32, and so do the scores. An f32
    cache stays exact; q8_0 keeps f32 products."""
    return _sixteen_bit_float(v) and cpu_ffi.has_bf16_values(cpu_ffi.active(variant))


def takes_int16_scores(k, variant: cpu_ffi.Variant | None = None) -> bool:
    """Whether the prompt kernel multiplies queries by keys in int16 products by default: where K is
    stored as a 16-bit float (f16 or bf16) and the build has AVX-512 VNNI, whose vpdpwssd does twice
    the multiply-adds of an f32 FMA. Each query row and key slot is scaled to integers as fine as
    its head dim allows (steps of 1/5,792 of its largest element for a 64-wide head), about as
    precise as llama.cpp's f16 queries. An f32 cache stays exact; q8_0 keeps f32 products."""
    return _sixteen_bit_float(k) and cpu_ffi.has_int16_scores(cpu_ffi.active(variant))


def _sixteen_bit_float(stored) -> bool:
    """Whether a stored K or V is f16 or bf16 (the types the prompt kernel's 16-bit products take)."""
    return not isinstance(stored, Q8_0Rows) and stored.dtype in (jnp.float16, jnp.bfloat16)


def _ffi_attention(target: str, q, k, v, q_positions, k_positions, block_table, *, window, scale, softcap, keys_in_order, **more):
    """One call of a C++ attention kernel: both take the same operands and attributes (a slab's
    block table is an empty array); `more`: the prompt kernel's own attributes."""
    batch, n_head, length, _ = q.shape
    out = jax.ShapeDtypeStruct((batch, n_head, length, v.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(
        q.astype(jnp.float32),
        *_ffi_operands(k),
        *_ffi_operands(v),
        q_positions.astype(jnp.int32),
        k_positions.astype(jnp.int32),
        jnp.zeros((0,), jnp.int32) if block_table is None else block_table.astype(jnp.int32),
        window=np.int32(window),
        scale=np.float32(scale),
        softcap=np.float32(softcap),
        keys_in_order=bool(keys_in_order),
        **more,
    )


def _ffi_operands(stored) -> tuple[jax.Array, jax.Array]:
    """A stored K or V as the kernel's (values, scales) buffers: a float type has no scales (an
    empty f16 array stands in), q8_0 its int8 quants and f16 block scales."""
    if isinstance(stored, Q8_0Rows):
        return stored.quants, stored.scales
    return stored, jnp.zeros((0,), jnp.float16)


def _as_slab(q, k, v, k_positions, block_table):
    """K/V and their positions as a slab of q's batch: a pool gathered through the table's first rows
    (paged_as_slab), a slab as it is (_first_rows)."""
    if block_table is None:
        return _first_rows(q, k, v, k_positions)
    return paged_as_slab(k, v, k_positions, block_table[: q.shape[0]])


def _first_rows(q, k, v, k_positions):
    """K/V and their positions cut to q's batch: a cache may hold rows past the batch in use, which
    only the C++ kernels read in place."""
    batch = q.shape[0]
    if k.shape[0] == batch:
        return k, v, k_positions

    def cut(leaf):
        return leaf[:batch]

    return jax.tree.map(cut, k), jax.tree.map(cut, v), k_positions[:batch]


# ----- which path serves which step: the one decision, read by dispatch, describe_paths and the log -----


def _cpu_path(t: int, head_dims: tuple[int, int] = (64, 64)) -> str:
    """Decode steps and prompts each take their C++ kernel where it is built and fits the head dims
    (_kernel_fits); everything else the grouped einsums, in query chunks."""
    if cpu_ffi.available():
        kernel = "cpu_ffi_decode" if t <= DECODE_MAX_T else "cpu_ffi_prompt"
        if _kernel_fits(kernel, head_dims):
            return kernel
    return "xla_grouped_chunked"


def _cuda_path(t: int, pool_block: int | None = None) -> str:
    """Prompts take the flash kernel; decode steps take XLA unless RZ_PALLAS_DECODE=1 (see
    rz_kernels.quantized_matmul's docstring); RZ_PALLAS=0 sends everything to XLA, and so does a
    paged pool of blocks (pool_block slots each) that the Pallas kernels cannot read (a tiny test
    model's small blocks)."""
    if not quantized_matmul.pallas_enabled():
        return "xla_reference"
    if pool_block is not None and not _pallas().reads_blocks_of(pool_block):
        return "xla_reference"
    if t <= DECODE_MAX_T:
        return "pallas_decode_attention" if quantized_matmul.pallas_decode_enabled() else "xla_reference"
    return "pallas_flash_attention"


def _kernel_fits(kernel: str, head_dims: tuple[int, int]) -> bool:
    """Both C++ kernels read every cache type (q8_0 needs head dims of whole 32-blocks, which the
    cache type itself checks); the decode one takes head dims in multiples of 8, the prompt one of 16."""
    multiple = 8 if kernel == "cpu_ffi_decode" else 16
    return all(dim % multiple == 0 for dim in head_dims)


def _head_dims(q, v) -> tuple[int, int]:
    return q.shape[3], v.shape[3]


@functools.partial(jax.jit, static_argnames=("window", "scale", "softcap", "keys_in_order"))
def attention_cpu(
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
    keys_in_order: bool = False,
):
    """The CPU formulation: decode steps (T <= 16) and prompts by their C++ kernels; without them
    (no build, or head dims they do not take), attention_xla_chunked."""
    options = {"block_table": block_table, "window": window, "scale": scale, "softcap": softcap, "keys_in_order": keys_in_order}
    path = _cpu_path(q.shape[2], _head_dims(q, v))
    if path == "cpu_ffi_decode":
        return decode_attention_cpu(q, k, v, q_positions, k_positions, **options)
    if path == "cpu_ffi_prompt":
        return prompt_attention_cpu(q, k, v, q_positions, k_positions, **options)
    return attention_xla_chunked(q, k, v, q_positions, k_positions, **options)


@functools.partial(jax.jit, static_argnames=("window", "scale", "softcap", "chunk", "keys_in_order"))
def attention_xla_chunked(
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
    chunk: int = CPU_QUERY_CHUNK,
    keys_in_order: bool = False,
):
    """The reference's grouped einsums, queries in chunks of `chunk` so that a long prompt never
    materializes more than [B, Hq, chunk, S] scores. With keys_in_order, each query chunk reads
    only the slots up to its latest position (_used_span). A pool is gathered into a slab first."""
    k, v, k_positions = _as_slab(q, k, v, k_positions, block_table)
    length = q.shape[2]

    def attend(q_chunk, p_chunk):
        if keys_in_order:
            return _used_span(q_chunk, k, v, p_chunk, k_positions, window, scale, softcap)
        return _grouped_attention(q_chunk, k, v, p_chunk, k_positions, window, scale, softcap, None)

    if length <= chunk:
        return attend(q, q_positions)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    q_chunks = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(*q.shape[:2], n_chunks, chunk, q.shape[3])
    p_chunks = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1).reshape(q.shape[0], n_chunks, chunk)

    def one(args):
        return attend(*args)

    out = jax.lax.map(one, (jnp.moveaxis(q_chunks, 2, 0), jnp.moveaxis(p_chunks, 1, 0)))
    return jnp.moveaxis(out, 0, 2).reshape(*q.shape[:2], n_chunks * chunk, v.shape[-1])[:, :, :length]


def _key_spans(n_keys: int) -> list[int]:
    """The spans a chunk with keys in order may attend over: MIN_KEY_SPAN doubling, then all n_keys."""
    spans = []
    span = MIN_KEY_SPAN
    while span < n_keys:
        spans.append(span)
        span *= 2
    return [*spans, n_keys]


def _used_span(q, k, v, q_positions, k_positions, window, scale, softcap):
    """_grouped_attention over the first slots of k/v, the smallest of _key_spans that holds every
    position up to the latest query's: with keys in order (slot s holds position s or nothing, or a
    stale later one that causality hides), no query sees a slot past it, so the result is the same."""
    spans = _key_spans(k.shape[2])

    def over(span):
        def attend(q, k, v, q_positions, k_positions):
            cut = jax.tree.map(lambda leaf: leaf[:, :, :span], (k, v))
            return _grouped_attention(q, *cut, q_positions, k_positions[:, :span], window, scale, softcap, None)

        return attend

    needed = jnp.max(q_positions) + 1
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(spans), needed), len(spans) - 1)
    return jax.lax.switch(index, [over(span) for span in spans], q, k, v, q_positions, k_positions)


def describe_paths(backend: str | None = None) -> list[dict]:
    """Which implementation serves which number of queries per sequence T on `backend`."""
    backend = backend or jax.default_backend()
    path_of = {"cpu": _cpu_path, "cuda": _cuda_path}.get(backend)
    if path_of is None:
        return [{"op": "attention", "backend": backend, "path": "xla_reference", "t_min": 1, "t_max": None}]
    rows = [
        {"op": "attention", "backend": backend, "path": path_of(t_min), "t_min": t_min, "t_max": t_max}
        for t_min, t_max in ((1, DECODE_MAX_T), (DECODE_MAX_T + 1, None))
    ]
    for row in rows:
        if row["path"].startswith("cpu_ffi"):
            row["note"] = f"variant {cpu_ffi.selected().name}"
        if row["path"] == "cpu_ffi_prompt" and cpu_ffi.has_int16_scores(cpu_ffi.selected()):
            row["note"] += "; an f16 or bf16 K in int16 products (AVX-512 VNNI)"
        if row["path"] == "cpu_ffi_prompt" and cpu_ffi.has_bf16_values(cpu_ffi.selected()):
            row["note"] += "; an f16 or bf16 V in bf16 products (AVX-512 BF16)"
    return rows


def _reference(q, k, v, q_positions, k_positions, block_table, *, window, scale, softcap):
    k, v, k_positions = _as_slab(q, k, v, k_positions, block_table)
    return attention_ref(q, k, v, q_positions, k_positions, window=window, scale=scale, softcap=softcap)


def _pallas():
    """rz_kernels.attention_pallas, imported where a GPU path needs it (as quantized_matmul's)."""
    from rz_kernels import attention_pallas

    return attention_pallas


def _cuda_kernel(path: str):
    """The function behind a _cuda_path name."""
    if path == "xla_reference":
        return attention_ref
    return {"pallas_decode_attention": _pallas().decode_attention, "pallas_flash_attention": _pallas().flash_attention}[path]


def _cuda(q, k, v, q_positions, k_positions, block_table, *, window, scale, softcap):
    kernel = _cuda_kernel(_cuda_path(q.shape[2], None if block_table is None else k_positions.shape[1]))
    if block_table is None:
        k, v, k_positions = _first_rows(q, k, v, k_positions)
    else:
        block_table = block_table[: q.shape[0]]
    return kernel(q, k, v, q_positions, k_positions, block_table=block_table, window=window, scale=scale, softcap=softcap)


def _cpu_with(**options):
    """attention_cpu with its options, taking the block table as a positional operand (as
    platform_dependent passes it)."""

    def run(q, k, v, q_positions, k_positions, block_table):
        return attention_cpu(q, k, v, q_positions, k_positions, block_table=block_table, **options)

    return run


_logged: set[tuple] = set()


def attention(
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
    keys_in_order: bool = False,
):
    """Attention by the backend's implementation: attention_cpu on CPU, the Pallas kernels on CUDA.

    block_table: K/V are a paged pool (module docstring). keys_in_order (slot s holds position s or
    is empty) lets the CPU kernels skip the slots past the latest query; it never changes the result."""
    types = f"{attention_kv.cache_type_of(k)}/{attention_kv.cache_type_of(v)}"
    layout = "slab" if block_table is None else f"pool, table {block_table.shape}"
    key = (q.shape, k.shape, types, window, layout)
    if key not in _logged and log.isEnabledFor(logging.INFO):  # the cuda path may import Pallas
        _logged.add(key)
        cpu = _cpu_path(q.shape[2], _head_dims(q, v))
        cuda = _cuda_path(q.shape[2], None if block_table is None else k_positions.shape[1])
        log.info(
            "rz_kernels.attention q %s, k %s (%s), K/V %s, window %d -> cpu: %s, cuda: %s",
            q.shape,
            k.shape,
            layout,
            types,
            window,
            cpu,
            cuda,
        )
    options = {"window": window, "scale": scale, "softcap": softcap}
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        q_positions,
        k_positions,
        block_table,
        cpu=_cpu_with(keys_in_order=keys_in_order, **options),
        default=functools.partial(_reference, **options),
        **({"cuda": functools.partial(_cuda, **options)} if quantized_matmul.cuda_present() else {}),
    )
