"""The host side of a paged KV cache: which pool block holds which positions of each sequence,
and which cached blocks already hold a prompt's prefix.

Layout (the contract with rz.kv_cache): a pool of fixed-size blocks per layer kind, one for the
global layers and one for the sliding-window layers, each kind with its own block ids (every
layer of a kind has its own arrays, indexed by the kind's ids). A sequence has one table per
kind, `table_length` block ids (NO_BLOCK: none), and position p lives in entry
(p // block_size) % table_length, slot p % block_size. A global table never wraps. A sliding
table is a ring just long enough for the window before a chunk plus the chunk itself (the model
writes a chunk, then attends): a logical block that no window needs any more gives its entry to
the next one.

Prefix caching, as vLLM's: a full block of committed tokens gets a hash chained from the one
before it, and stays in its pool's hash map after its sequences leave, unreferenced, until the
free list runs dry and it is evicted, least recently used first. A prompt maps the longest
chain of full blocks its pools hold, never its last token (whose logits are needed); a sliding
pool needs only the blocks the first recomputed query sees.

A sequence's last, partly written block is kept too when it leaves, keyed by the hash of the
chain before it and by its tokens, as llama.cpp's server keeps a slot's whole prompt: a prompt
that continues the chain and starts with at least half of those tokens takes the block over (it
is unreferenced, so nothing is copied; it serves one prompt) and computes only from the first
token that differs. Without it a chat's next turn recomputes up to a block less one of the turn
before. A block that serves others as it is (a running sequence's, a cached full one whose chain
diverges from the prompt's inside it, a kept one the prompt shares less than half of) is copied
instead, when it holds more of the prompt's next tokens: the allocator takes a fresh block and
the engine copies the source into it before the prompt's first chunk (SequenceBlocks.copies);
eight clients sending one system prompt then compute it once. Either way, slots past the matched
tokens hold another sequence's later positions; attention masks them as it masks any future
position, and the new prompt's writes replace them.

Admission reserves a sequence's peak block count, so that an admitted sequence never runs out
of blocks (nothing is preempted); the blocks themselves are taken as writes reach them.
"""

import hashlib
import os
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import jax

from rz.config import ModelConfig
from rz.errors import ContextOverflowError, RequestError
from rz_kernels import attention_kv

NO_BLOCK = -1  # a table entry that holds no block
POSITION_BYTES = 4  # each slot's int32 position, per layer (rz.kv_cache masks by them)
_MiB = 2**20


class KVCacheCapacityError(ContextOverflowError):
    """A request fits the context but needs more KV cache than the whole pool holds: it could never
    run, however long it waited (shorten the prompt, lower max_tokens, or start with a larger
    kv_cache_tokens). gRPC's RESOURCE_EXHAUSTED; HTTP 400, as a context overflow (not worth retrying)."""


@dataclass(frozen=True)
class PoolPlan:
    """One pool kind: its blocks, its tables' length, and the bytes of one block across the kind's layers."""

    sliding: bool
    n_layers: int
    n_blocks: int
    table_length: int
    block_bytes: int  # keys, values and positions of block_size slots in every layer of the kind

    @property
    def total_bytes(self) -> int:
        return self.n_blocks * self.block_bytes


@dataclass(frozen=True)
class BlockPlan:
    """How many blocks each pool kind has and how long its tables are, for one model and context."""

    block_size: int
    n_ctx: int
    max_write: int  # the most positions written past a sequence's committed ones (a prefill chunk)
    window: int  # the sliding window; 0 without sliding layers
    cache_type_k: str
    cache_type_v: str
    pools: tuple[PoolPlan, ...]  # the global pool first, then the sliding one: only the kinds the model has

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        *,
        n_ctx: int,
        n_slots: int,
        block_size: int,
        max_write: int,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        kv_cache_tokens: int | None = None,
        memory_bytes: int | None = None,
    ) -> "BlockPlan":
        """The pools for n_slots sequences of up to n_ctx positions, or for a budget of
        kv_cache_tokens global positions (sliding rings for as many sequences as it holds, at
        most n_slots); without a budget, as many as memory_bytes holds, but at least one n_ctx
        sequence's."""
        for name, value in (("n_ctx", n_ctx), ("n_slots", n_slots), ("block_size", block_size), ("max_write", max_write)):
            _check_positive(name, value)
        if block_size & (block_size - 1):
            raise RequestError(f"block_size must be a power of two, got {block_size}")
        if kv_cache_tokens is not None:
            _check_positive("kv_cache_tokens", kv_cache_tokens)
            if kv_cache_tokens < block_size:
                raise RequestError(f"kv_cache_tokens ({kv_cache_tokens}) must hold at least one block of {block_size} tokens")
        max_write = min(max_write, n_ctx)
        global_table = _blocks(n_ctx, block_size)
        # Before a chunk's first query, window - 1 earlier positions; then the chunk; then one
        # block more for a window and chunk that straddle block boundaries.
        ring = min(_blocks(cfg.sliding_window + max_write, block_size) + 1, global_table)
        layers = {kind: cfg.sliding_layers.count(kind) for kind in (False, True) if kind in cfg.sliding_layers}
        layer_bytes = _layer_block_bytes(cfg, block_size, cache_type_k, cache_type_v)
        block_bytes = {kind: layers.get(kind, 0) * layer_bytes for kind in (False, True)}
        types = f"cache types K {cache_type_k}, V {cache_type_v}"
        if kv_cache_tokens is not None:
            n_global = _blocks(kv_cache_tokens, block_size)
            # A sequence holds no more sliding blocks than global ones, so as many as the global
            # pool's never make the sliding pool the tighter (with between one and n_slots rings).
            n_sliding = min(n_slots * ring, max(ring, n_global))
            needed = n_global * block_bytes[False] + n_sliding * block_bytes[True]
            if memory_bytes is not None and needed > memory_bytes:
                raise RequestError(
                    f"kv_cache_tokens={kv_cache_tokens} needs {needed / _MiB:.1f} MiB of KV cache ({types}), "
                    f"more than the {memory_bytes / _MiB:.1f} MiB available: lower kv_cache_tokens, or use q8_0 cache types"
                )
        else:
            # As many sequences of n_ctx as memory holds, at most n_slots; the rest in global blocks.
            per_sequence = global_table * block_bytes[False] + ring * block_bytes[True]
            n_sequences = n_slots if memory_bytes is None else min(n_slots, memory_bytes // per_sequence)
            if n_sequences == 0:
                raise RequestError(
                    f"one sequence of n_ctx={n_ctx} needs {per_sequence / _MiB:.1f} MiB of KV cache ({types}), "
                    f"more than the {memory_bytes / _MiB:.1f} MiB available: lower n_ctx, or use q8_0 cache types"
                )
            n_sliding = n_sequences * ring
            n_global = n_slots * global_table
            if memory_bytes is not None and block_bytes[False]:
                n_global = min(n_global, (memory_bytes - n_sliding * block_bytes[True]) // block_bytes[False])
        counts = {False: n_global, True: n_sliding}
        pools = tuple(
            PoolPlan(kind, layers[kind], counts[kind], table, block_bytes[kind])
            for kind, table in ((False, global_table), (True, ring))
            if kind in layers
        )
        return cls(block_size, n_ctx, max_write, cfg.sliding_window if True in layers else 0, cache_type_k, cache_type_v, pools)

    def pool(self, sliding: bool) -> PoolPlan:
        return next(pool for pool in self.pools if pool.sliding == sliding)

    @property
    def total_bytes(self) -> int:
        return sum(pool.total_bytes for pool in self.pools)

    @property
    def pool_tokens(self) -> int:
        """The positions the pools hold in all: the global pool's (without global layers, the sliding one's)."""
        return self.pools[0].n_blocks * self.block_size

    @property
    def capacity(self) -> int:
        """The most positions one sequence can hold: the context's, or fewer in a smaller global
        pool (a sliding pool always holds a whole ring)."""
        global_blocks = [pool.n_blocks for pool in self.pools if not pool.sliding]
        return min([self.n_ctx] + [n * self.block_size for n in global_blocks])

    def peak_blocks(self, n_tokens: int) -> dict[bool, int]:
        """Per kind, the most blocks a sequence of positions 0..n_tokens-1 holds at once."""
        return {pool.sliding: min(_blocks(n_tokens, self.block_size), pool.table_length) for pool in self.pools}

    def summary(self) -> str:
        """One line for the start-up log."""
        kinds = []
        for pool in self.pools:
            if pool.sliding:
                shape = f"{pool.n_blocks / pool.table_length:g} rings of {pool.table_length} (window {self.window})"
            else:
                shape = f"{pool.n_blocks * self.block_size} tokens ({pool.n_blocks / pool.table_length:g} x n_ctx {self.n_ctx})"
            kinds.append(f"{'sliding' if pool.sliding else 'global'} {pool.n_blocks} blocks = {shape}, {pool.total_bytes / _MiB:.1f} MiB")
        return (
            f"KV cache: blocks of {self.block_size} positions, K {self.cache_type_k}, V {self.cache_type_v}; "
            f"{'; '.join(kinds)}; {self.total_bytes / _MiB:.1f} MiB in all"
        )


@dataclass(eq=False)
class SequenceBlocks:
    """One admitted sequence's tables and what its blocks hold. The engine reads `tables` (upload
    them when grow says they changed) and `n_cached`; the rest is the allocator's."""

    tables: dict[bool, list[int]]  # per kind (sliding?), the block id in each entry, NO_BLOCK if none
    n_cached: int  # prompt tokens mapped from the cache (full blocks and a partial one's first tokens; fewer than the prompt)
    tokens: list[int]  # the prompt, then the tokens committed since
    n_committed: int  # positions whose KV is written and recorded (commit)
    span: int  # the positions [0, span) the reservation covers: no write reaches past them
    peaks: dict[bool, int]  # blocks reserved per kind
    hashes: list[bytes]  # the chain hash of each full block of `tokens` hashed so far
    logical: dict[bool, list[int]]  # per kind and entry, the logical block (p // block_size) it holds, -1 if none
    registered: dict[bool, dict[int, bytes]]  # per kind, the blocks this sequence put in the cache, and their hashes
    # Per kind, (source, destination): blocks the device must copy before the first prefill chunk
    # (a running sequence's, a cached full or a kept partly written block holds the prompt's next
    # tokens past the mapped ones, as _copy_hit finds them; the engine copies and clears it).
    copies: dict[bool, tuple[int, int]] = field(default_factory=dict)
    released: bool = False


@dataclass(frozen=True)
class PoolStats:
    free: int  # never written since the start or the last clear, or freed unhashed
    cached: int  # unreferenced full blocks that a prompt can still map (evictable)
    in_use: int  # mapped by at least one sequence
    total: int
    reserved: int  # blocks the admitted sequences' reservations still promise beyond those they hold (an upper bound)


@dataclass(frozen=True)
class BlockStats:
    pools: dict[bool, PoolStats]  # per kind (sliding?)
    hit_tokens: int  # prompt tokens served from the cache since the start
    prompt_tokens: int  # prompt tokens admitted since the start

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class BlockPool:
    """One kind's blocks: reference counts, the hash map of cached full blocks, the free list, and
    the unreferenced cached blocks from least to most recently used."""

    def __init__(self, plan: PoolPlan):
        self.plan = plan
        self.refs = [0] * plan.n_blocks
        self.hash_of: list[bytes | None] = [None] * plan.n_blocks
        self.by_hash: dict[bytes, int] = {}
        # Freed blocks go first in line: blocks are taken where they were last written, and the
        # pages of those never written stay out of memory (rz_kernels.zero_pages).
        self.free: deque[int] = deque(range(plan.n_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        # Unreferenced partly written blocks: each one's chain hash before it and its tokens, and
        # by that hash, the blocks that follow it (rz.kv_blocks' docstring).
        self.partial_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self.partials: dict[bytes, dict[int, None]] = {}
        # The same of the hashed full blocks: a prompt that shares their first tokens only copies them.
        self.full_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self.fulls: dict[bytes, dict[int, None]] = {}
        self.reserved = 0  # the peaks of the admitted sequences, summed
        self.held = 0  # the blocks in the admitted sequences' tables, summed (a shared block once per table)

    @property
    def in_use(self) -> int:
        return self.plan.n_blocks - len(self.free) - len(self.evictable)

    @property
    def promised(self) -> int:
        """Blocks in use or promised to admitted sequences, never above n_blocks, so that every
        take within a reservation finds a free or evictable block.

        A global table holds each block until its sequence leaves, so a block that several
        sequences share counts once, and a prefix shared by many requests admits more of them.
        A ring drops blocks as it goes; one that another sequence still maps stays in use while
        its ring takes a fresh block, so a sliding pool counts every sequence's whole peak."""
        if self.plan.sliding:
            return self.reserved
        return self.in_use + self.reserved - self.held

    def can_reserve(self, peak: int, hits: Sequence[int]) -> bool:
        """Whether a sequence of `peak` blocks that maps the cached blocks `hits` fits the promise."""
        if self.plan.sliding:
            return self.reserved + peak <= self.plan.n_blocks
        revived = sum(self.refs[block] == 0 for block in hits)
        return self.promised + revived + peak - len(hits) <= self.plan.n_blocks

    def take(self) -> int:
        """A block for one table: a free one, else the least recently used cached one."""
        if not self.free:
            self.forget(next(iter(self.evictable)))
        block = self.free.popleft()
        self.refs[block] = 1
        self.held += 1
        return block

    def map(self, block: int) -> None:
        """A cached block into one more table."""
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1
        self.held += 1

    def drop(self, block: int) -> None:
        """A block out of one table: unreferenced, it is cached (the most recently used) if hashed or
        kept as a partial block, else free."""
        self.refs[block] -= 1
        self.held -= 1
        if self.refs[block] == 0:
            if self.hash_of[block] is not None or block in self.partial_of:
                self.evictable[block] = None
            else:
                self.free.appendleft(block)

    def register(self, block: int, block_hash: bytes, parent_hash: bytes, tokens: Sequence[int]) -> bool:
        """Make a full block mappable by its hash, and findable by the chain before it (parent_hash)
        and its tokens; False if another block already holds the same tokens."""
        if block_hash in self.by_hash:
            return False
        self.by_hash[block_hash] = block
        self.hash_of[block] = block_hash
        self.full_of[block] = (parent_hash, tuple(tokens))
        self.fulls.setdefault(parent_hash, {})[block] = None
        return True

    def following(self, prefix_hash: bytes) -> list[tuple[int, tuple[int, ...]]]:
        """(block, tokens) of every cached full or kept partial block after the chain prefix_hash."""
        return [(block, self.full_of[block][1]) for block in self.fulls.get(prefix_hash, ())] + [
            (block, self.partial_of[block][1]) for block in self.partials.get(prefix_hash, ())
        ]

    def keep_partial(self, block: int, prefix_hash: bytes, tokens: Sequence[int]) -> None:
        """Keep a leaving sequence's partly written block (still in its table: drop it next) for a
        prompt that continues the chain `prefix_hash` with the same first tokens."""
        self.partial_of[block] = (prefix_hash, tuple(tokens))
        self.partials.setdefault(prefix_hash, {})[block] = None

    def longest_partial(self, prefix_hash: bytes, tokens: Sequence[int], worth_taking: bool = False) -> tuple[int, int]:
        """(block, n): the kept partial block after the chain prefix_hash whose tokens start with the
        longest run of `tokens`, and that run's length; (NO_BLOCK, 0) if none starts with tokens[0].

        worth_taking: only blocks whose tokens the run covers at least half of. Taken over, a block
        no longer serves the prompt that continues all of it (a chat's next turn), so a prompt
        that shares only its first few tokens (a BOS token) leaves it kept and computes them."""
        best = (NO_BLOCK, 0)
        for block in self.partials.get(prefix_hash, ()):
            kept = self.partial_of[block][1]
            n = _common(kept, tokens)
            if n > best[1] and (2 * n >= len(kept) or not worth_taking):
                best = (block, n)
        return best

    def adopt(self, block: int) -> None:
        """A kept (unreferenced) partial block into one table, as the table's own writable block."""
        self._unkeep(block)
        del self.evictable[block]
        self.refs[block] = 1
        self.held += 1

    def _unkeep(self, block: int) -> None:
        prefix_hash, _ = self.partial_of.pop(block)
        del self.partials[prefix_hash][block]
        if not self.partials[prefix_hash]:
            del self.partials[prefix_hash]

    def forget(self, block: int) -> None:
        """Unhash a block, or stop keeping a partial one (nothing maps it any more); an unreferenced
        one goes to the free list."""
        block_hash = self.hash_of[block]
        if block in self.partial_of:
            self._unkeep(block)
        elif block_hash is None:
            return
        else:
            del self.by_hash[block_hash]
            self.hash_of[block] = None
            parent_hash, _ = self.full_of.pop(block)
            del self.fulls[parent_hash][block]
            if not self.fulls[parent_hash]:
                del self.fulls[parent_hash]
        if self.refs[block] == 0:
            del self.evictable[block]
            self.free.appendleft(block)

    def stats(self) -> PoolStats:
        return PoolStats(len(self.free), len(self.evictable), self.in_use, self.plan.n_blocks, self.reserved - self.held)


class KVBlocks:
    """The block allocator: admission with prefix reuse, tables grown as writes reach them,
    blocks hashed as their tokens are committed, and released to the cache."""

    def __init__(self, plan: BlockPlan):
        self.plan = plan
        self.pools = {pool.sliding: BlockPool(pool) for pool in plan.pools}
        self.hit_tokens = 0
        self.prompt_tokens = 0
        self.live: dict[int, SequenceBlocks] = {}  # the admitted sequences, by id, in admission order

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """ContextOverflowError if a request does not fit the context, KVCacheCapacityError if it
        could not run even alone in an empty pool."""
        needed = n_prompt + max_tokens
        if needed > self.plan.n_ctx:
            raise ContextOverflowError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} positions, "
                f"more than the context size {self.plan.n_ctx}; shorten the prompt, lower max_tokens, "
                "or load the model with a larger n_ctx"
            )
        if needed > self.plan.capacity:
            raise KVCacheCapacityError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} positions of KV cache, "
                f"more than the {self.plan.capacity} the whole cache holds; shorten the prompt, lower max_tokens, "
                "or start with a larger kv_cache_tokens"
            )

    def admit(self, prompt_tokens: Sequence[int], max_tokens: int, cache_prompt: bool = True) -> SequenceBlocks | None:
        """A sequence's tables with the longest cached prefix of its prompt mapped (cache_prompt),
        and its peak blocks reserved; None if the pools cannot promise them now (wait for a release).
        KVCacheCapacityError if they never could."""
        tokens = list(prompt_tokens)
        if not tokens:
            raise RequestError("the prompt is empty: give at least one token")
        self.check_fits(len(tokens), max_tokens)
        bs = self.plan.block_size
        # Positions are written up to max_write past the committed ones, whose last is at most
        # the prompt plus max_tokens less one (the last sampled token is never fed back).
        span = min(len(tokens) + max_tokens - 1 + self.plan.max_write, self.plan.capacity)
        peaks = self.plan.peak_blocks(span)
        # The last prompt token is computed again, for its logits: only blocks before it count.
        hashes = _chain_hashes(b"", tokens[: (len(tokens) - 1) // bs * bs], bs) if cache_prompt else []
        n_hit = self._longest_hit(hashes)
        hits = {kind: self._hit_blocks(kind, hashes, n_hit) for kind in self.pools}
        partials, n_partial = self._partial_hit(tokens, hashes, n_hit) if cache_prompt else ({}, 0)
        sources, n_copied = self._copy_hit(tokens, hashes, n_hit) if cache_prompt else ({}, 0)
        # A copy needs a block to copy into besides its source and the hits (which taking one must not evict).
        spare = all(
            len(pool.free) + len(pool.evictable) > sum(block in pool.evictable for _, block in hits[kind]) + (sources[kind] in pool.evictable)
            for kind, pool in self.pools.items() if kind in sources
        )
        if n_copied > n_partial and spare:
            partials, n_partial = {}, n_copied
        else:
            sources = {}
        for kind, block in partials.items():
            hits[kind].append((n_hit, block))
        if not all(pool.can_reserve(peaks[kind], [block for _, block in hits[kind]]) for kind, pool in self.pools.items()):
            return None
        seq = SequenceBlocks(
            tables={pool.sliding: [NO_BLOCK] * pool.table_length for pool in self.plan.pools},
            n_cached=n_hit * bs + n_partial,
            tokens=tokens,
            n_committed=n_hit * bs + n_partial,
            span=span,
            peaks=peaks,
            hashes=hashes[:n_hit],
            logical={pool.sliding: [-1] * pool.table_length for pool in self.plan.pools},
            registered={kind: {} for kind in self.pools},
        )
        for kind, pool in self.pools.items():
            pool.reserved += peaks[kind]
            table, logical = seq.tables[kind], seq.logical[kind]
            for j, block in hits[kind]:
                if block in pool.partial_of:
                    pool.adopt(block)
                else:
                    pool.map(block)
                table[j % len(table)], logical[j % len(table)] = block, j
            if kind in sources:
                # Within the reservation: the peak counts every block the table will hold. The
                # source, if unreferenced, is mapped meanwhile, so that taking a block never evicts it.
                entry, source = n_hit % len(table), sources[kind]
                pool.map(source)
                table[entry], logical[entry] = pool.take(), n_hit
                pool.drop(source)
                seq.copies[kind] = (source, table[entry])
        self.live[id(seq)] = seq
        self.hit_tokens += seq.n_cached
        self.prompt_tokens += len(tokens)
        return seq

    def grow(self, seq: SequenceBlocks, start: int, end: int) -> bool:
        """Writable blocks in the entries of positions [start, end), taken within the reservation
        (in a ring, in place of a block no window needs any more); whether any entry changed."""
        self._check_live(seq)
        if not seq.n_committed <= start <= end <= min(seq.span, seq.n_committed + self.plan.max_write):
            raise ValueError(
                f"positions [{start}, {end}) are not writable: a write starts at the committed length "
                f"({seq.n_committed}) or after, and ends at most max_write ({self.plan.max_write}) past it, "
                f"within the {seq.span} positions reserved"
            )
        changed = False
        for kind, pool in self.pools.items():
            table, logical = seq.tables[kind], seq.logical[kind]
            for j in range(start // self.plan.block_size, _blocks(end, self.plan.block_size)):
                entry = j % len(table)
                if logical[entry] == j:
                    # Only full committed blocks are shared, and writes land after them.
                    if pool.refs[table[entry]] != 1 or pool.hash_of[table[entry]] is not None:
                        raise RuntimeError(f"block {table[entry]} (logical {j}) is shared or cached, and about to be written")
                    continue
                if logical[entry] > j:
                    raise RuntimeError(f"logical block {j} was recycled by block {logical[entry]}: a rollback past max_write")
                if table[entry] != NO_BLOCK:
                    pool.drop(table[entry])
                table[entry], logical[entry] = pool.take(), j
                changed = True
        return changed

    def commit(self, seq: SequenceBlocks, n_written: int, new_tokens: Sequence[int] = ()) -> None:
        """Record the sequence's new tokens and that positions [0, n_written) hold their KV
        (speculation commits only the accepted ones); blocks that became full are hashed and
        cached, so that other prompts can map them at once."""
        self._check_live(seq)
        if not seq.n_committed <= n_written <= len(seq.tokens) + len(new_tokens):
            raise ValueError(
                f"cannot commit {n_written} positions: {seq.n_committed} are committed, "
                f"{len(seq.tokens) + len(new_tokens)} tokens known"
            )
        bs = self.plan.block_size
        last = (n_written - 1) // bs
        if n_written > seq.n_committed and any(logical[last % len(logical)] != last for logical in seq.logical.values()):
            raise ValueError(f"cannot commit {n_written} positions: position {n_written - 1} has no block (grow first)")
        seq.tokens.extend(new_tokens)
        full = n_written // bs
        previous = seq.hashes[-1] if seq.hashes else b""
        seq.hashes.extend(_chain_hashes(previous, seq.tokens[len(seq.hashes) * bs : full * bs], bs))
        for j in range(seq.n_committed // bs, full):
            for kind, pool in self.pools.items():
                entry = j % len(seq.tables[kind])
                block = seq.tables[kind][entry]
                # A block that a ring has already recycled (a late commit) is not cached.
                parent_hash = seq.hashes[j - 1] if j else b""
                if seq.logical[kind][entry] == j and pool.register(block, seq.hashes[j], parent_hash, seq.tokens[j * bs : (j + 1) * bs]):
                    seq.registered[kind][block] = seq.hashes[j]
        seq.n_committed = n_written

    def release(self, seq: SequenceBlocks, failed: bool = False) -> None:
        """The sequence leaves: its blocks go back, full hashed ones to the cache, and its
        reservation with them. failed (cancelled mid-step, or an engine error): its KV may be
        incomplete, so nothing it cached stays cached, unless another sequence maps it now."""
        self._check_live(seq)
        seq.released = True
        del self.live[id(seq)]
        bs, last = self.plan.block_size, seq.n_committed // self.plan.block_size
        for kind, pool in self.pools.items():
            table, logical = seq.tables[kind], seq.logical[kind]
            entry, kept = last % len(table), seq.tokens[last * bs : seq.n_committed]
            prefix_hash = seq.hashes[last - 1] if last else b""
            # Its last block, if partly written, unless another kept block holds its tokens already.
            if kept and not failed and logical[entry] == last and pool.longest_partial(prefix_hash, kept)[1] < len(kept):
                pool.keep_partial(table[entry], prefix_hash, kept)
            # The last blocks first, so the first of a chain (which serve more prompts) are evicted last.
            for entry in sorted(range(len(table)), key=logical.__getitem__, reverse=True):
                if table[entry] != NO_BLOCK:
                    pool.drop(table[entry])
                table[entry], logical[entry] = NO_BLOCK, -1
            if failed:
                for block, block_hash in seq.registered[kind].items():
                    # Unless evicted since (and maybe taken by another sequence).
                    if pool.refs[block] == 0 and pool.hash_of[block] == block_hash:
                        pool.forget(block)
            seq.registered[kind].clear()
            pool.reserved -= seq.peaks[kind]

    def stats(self) -> BlockStats:
        return BlockStats({kind: pool.stats() for kind, pool in self.pools.items()}, self.hit_tokens, self.prompt_tokens)

    def clear_cache(self) -> None:
        """Forget every cached block: no prompt maps one until new blocks are committed."""
        for pool in self.pools.values():
            for block in list(pool.by_hash.values()) + list(pool.partial_of):
                pool.forget(block)

    def forget_prompts_starting(self, first_tokens: Sequence[int]) -> None:
        """Forget the cached blocks of every prompt that starts with first_tokens (a chain's first
        block, full or kept partly written, whose tokens start with them), and every block cached
        after them. Other prompts' blocks stay cached."""
        first_tokens = tuple(first_tokens)
        for pool in self.pools.values():
            found = [block for block, tokens in pool.following(b"") if tokens[: len(first_tokens)] == first_tokens]
            doomed = []
            while found:
                block = found.pop()
                doomed.append(block)
                if pool.hash_of[block] is not None:
                    found += [after for after, _ in pool.following(pool.hash_of[block])]
            for block in doomed:
                pool.forget(block)

    def _longest_hit(self, hashes: Sequence[bytes]) -> int:
        """How many of the prompt's leading full blocks every pool can serve: the global pool all
        of them, a sliding pool those that the first recomputed query sees."""
        n_blocks = len(hashes)
        if False in self.pools:
            by_hash = self.pools[False].by_hash
            n_blocks = next((j for j, block_hash in enumerate(hashes) if block_hash not in by_hash), n_blocks)
        if True in self.pools:
            by_hash = self.pools[True].by_hash
            longest, last_missing = 0, -1
            for k in range(1, n_blocks + 1):
                if hashes[k - 1] not in by_hash:
                    last_missing = k - 1
                if last_missing < self._first_seen(k):
                    longest = k
            n_blocks = longest
        return n_blocks

    def _partial_hit(self, tokens: Sequence[int], hashes: Sequence[bytes], n_hit: int) -> tuple[dict[bool, int], int]:
        """The kept partial block of each kind that continues a prompt's n_hit cached blocks, and
        how many of its tokens every kind's serves (at most up to the prompt's last token); ({}, 0) if none."""
        following, prefix_hash = self._after_chain(tokens, hashes, n_hit, self.plan.block_size)
        if not following:
            return {}, 0
        return _served({kind: pool.longest_partial(prefix_hash, following, worth_taking=True) for kind, pool in self.pools.items()})

    def _copy_hit(self, tokens: Sequence[int], hashes: Sequence[bytes], n_hit: int) -> tuple[dict[bool, int], int]:
        """The block of each kind, after the prompt's n_hit cached blocks, whose tokens start with the
        longest run of the prompt's next tokens (fewer than a block, and not its last token): a
        running sequence's, a cached full one's (the chain diverges inside it) or a kept partial
        one's; and how many of its tokens every kind's serves; ({}, 0) if none. Its first slots
        are copied: the block may be written on, and serves others as it is."""
        bs = self.plan.block_size
        start = n_hit * bs
        following, prefix_hash = self._after_chain(tokens, hashes, n_hit, bs - 1)
        if not following:
            return {}, 0
        candidates = {kind: pool.following(prefix_hash) for kind, pool in self.pools.items()}
        for seq in self.live.values():
            if seq.n_committed > start and (not n_hit or seq.hashes[n_hit - 1 : n_hit] == [prefix_hash]):
                held = tuple(seq.tokens[start : min(start + bs, seq.n_committed)])
                for kind, table in seq.tables.items():
                    if seq.logical[kind][n_hit % len(table)] == n_hit:
                        candidates[kind].append((table[n_hit % len(table)], held))
        return _served({kind: max(((block, _common(held, following)) for block, held in blocks), key=lambda c: c[1], default=(NO_BLOCK, 0))
                        for kind, blocks in candidates.items()})

    def _after_chain(self, tokens: Sequence[int], hashes: Sequence[bytes], n_hit: int, length: int) -> tuple[Sequence[int], bytes]:
        """The prompt's next tokens after its n_hit cached blocks (at most `length`, never its last
        token, which is always computed), and the chain hash they continue."""
        start = n_hit * self.plan.block_size
        return tokens[start : min(start + length, len(tokens) - 1)], (hashes[n_hit - 1] if n_hit else b"")

    def copied(self, seq: SequenceBlocks) -> None:
        """The engine has launched the sequence's block copies (the device runs them before any later call)."""
        seq.copies.clear()

    def _first_seen(self, n_blocks: int) -> int:
        """The first logical block a sliding query at position n_blocks * block_size sees (keys above p - window)."""
        return max(0, n_blocks * self.plan.block_size - self.plan.window + 1) // self.plan.block_size

    def _hit_blocks(self, kind: bool, hashes: Sequence[bytes], n_hit: int) -> list[tuple[int, int]]:
        """(logical block, cached block) of the kind's blocks that a prefix of n_hit blocks maps."""
        first = self._first_seen(n_hit) if kind else 0
        return [(j, self.pools[kind].by_hash[hashes[j]]) for j in range(first, n_hit)]

    @staticmethod
    def _check_live(seq: SequenceBlocks) -> None:
        if seq.released:
            raise RuntimeError("the sequence's blocks were released")


def memory_budget(share: float = 0.5) -> int:
    """Bytes a KV cache may take by default: a share of the memory free now, on the accelerator
    where there is one (what it reports free), else on the host."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(share * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    return int(share * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _chain_hashes(previous: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The hash of each full block of `tokens`, each chained from the one before (previous: the
    hash before the first, b"" at position 0), so that equal hashes mean equal prefixes."""
    hashes = []
    for start in range(0, len(tokens) // block_size * block_size, block_size):
        previous = hashlib.blake2b(previous + array("q", tokens[start : start + block_size]).tobytes(), digest_size=32).digest()
        hashes.append(previous)
    return hashes


def _layer_block_bytes(cfg: ModelConfig, block_size: int, cache_type_k: str, cache_type_v: str) -> int:
    """The bytes of one block in one layer: keys and values as their cache types store them, and positions."""

    def stored_bytes(cache_type: str, head_dim: int, what: str) -> int:
        try:
            attention_kv.check_cache_type(cache_type, what)
            shapes = jax.eval_shape(partial(attention_kv.empty, cache_type, (cfg.n_head_kv, block_size, head_dim)))
        except ValueError as error:
            raise RequestError(str(error)) from None
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))

    keys = stored_bytes(cache_type_k, cfg.head_dim, "cache_type_k")
    return keys + stored_bytes(cache_type_v, cfg.head_dim_v, "cache_type_v") + block_size * POSITION_BYTES


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token runs."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _served(found: dict[bool, tuple[int, int]]) -> tuple[dict[bool, int], int]:
    """Per kind, (a block, how many of the prompt's next tokens it holds) -> the blocks and the
    tokens every kind's serves; ({}, 0) if some kind's serves none."""
    n = min(n for _, n in found.values())
    return ({kind: block for kind, (block, _) in found.items()}, n) if n else ({}, 0)


def _blocks(n_positions: int, block_size: int) -> int:
    return -(-n_positions // block_size)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{name} must be a positive integer, got {value!r}")
