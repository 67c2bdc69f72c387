"""The engine: a KV cache of pooled blocks, `n_slots` rows that run on it, and the compiled steps (rz.steps).

The cache is a pool of blocks per layer, each sequence reading and writing its blocks through
block tables (rz.kv_cache); the allocator (rz.kv_blocks) hands blocks out as writes reach them
and keeps the full blocks of finished sequences, hashed by their tokens, until it needs them
back. A request joins by mapping the cached blocks that hold the longest prefix of its prompt and
prefilling the rest straight into blocks of its own (in chunks, compiled once per chunk length);
it waits while the pools cannot promise the blocks it may need. One compiled decode call
advances every slot at once; a request leaves when it stops, and its slot is free for the next
between two calls. The engine returns sampled tokens; which request runs when, and what its tokens mean,
is the scheduler's (rz.scheduler), which rz.LLM and the gRPC server both drive.
"""

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rz import kv_blocks, kv_cache, steps
from rz.buckets import VERIFY_WIDTHS, Buckets, batch_ladder
from rz.constraints import Vocabulary
from rz.errors import RequestError
from rz.generation import Generation, GenerationRequest, Timings
from rz.host_memory import device_copy, drop_tracing_caches, fresh_array
from rz.kv_blocks import NO_BLOCK, BlockPlan, KVBlocks, SequenceBlocks
from rz.request import MAX_N_LOGPROBS, FinishReason, SamplingParams, check_token_ids
from rz.sampling import SampledTokens, SamplerState, SamplingTensors
from rz.speculative import (
    MODEL_PROPOSERS, CostModel, Speculation, choose_self_draft_layers, chosen_proposer, draft, self_draft_model, validate_proposer,
)
from rz.stopping import StopStringMatcher
from rz.tokenizer import IncrementalDecoder, Tokenizer
from rz_kernels.quantized_matmul import CPU_KERNEL_MAX_M

# Decode steps per compiled call; see Engine.decode for why more than one.
DECODE_STEPS = 4

# The most tokens a verify call feeds (rows times width): up to this many rows, a quantized matmul
# takes the kernel a decode step takes, whose rows do not depend on each other, so a verify call's
# logits are a decode step's to the bit and speculation keeps greedy and seeded output exact.
# Beyond, XLA's f32 GEMM rounds differently (and a batch that large gains little from drafts).
MAX_VERIFY_TOKENS = CPU_KERNEL_MAX_M

# Tokens a row per call that feeds a draft model's cache what it has not seen (rz.steps.feed): a
# verify call's kept tokens fit the first; a prompt, or what a stream decoded plainly, is fed in
# calls of the last.
DRAFT_FEED_WIDTHS = (8, 128)

# Idle slots run through the decode step like the others (the shape is fixed); position -1
# keeps them from writing to the cache, and greedy sampling keeps their cost down.
_IDLE_PARAMS = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)


# What a compiled call produced for one sequence: the step's sampled tokens (on the host) and its row.
SampledRow = tuple[Generation, SampledTokens, int]


class Engine:
    """Compiled steps for one model over a KV cache of n_slots rows, and which sequence holds each row."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        n_ctx: int,
        n_slots: int,
        buckets: Buckets | None = None,
        decode_steps: int = DECODE_STEPS,
        cache_types: kv_cache.CacheTypes = kv_cache.CacheTypes(),
        speculative: str | None = None,
        self_draft_layers: int | None = None,
        draft_model=None,
        block_size: int = kv_cache.BLOCK_SIZE,
        kv_cache_tokens: int | None = None,
        memory_bytes: int | None = None,
    ):
        """kv_cache_tokens: the global layers' pool in positions (rz.kv_blocks.BlockPlan); by default
        n_slots full contexts, or as many as memory_bytes holds (by default kv_blocks.memory_budget())."""
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be at least 1, got {decode_steps}")
        validate_proposer(speculative)
        self.speculative = speculative  # the proposer of a request that names none (rz.speculative)
        self.model = model
        self.decode_steps = decode_steps
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self.buckets = buckets or Buckets.for_context(n_ctx)
        self.cache_types = cache_types
        self.compilations: dict[str, float] = {}
        self._model_static = {"family": model.family, "cfg": model.cfg, "plan": model.plan}
        self._rope_freq_factors = model.family.rope_freq_factors(model.weights)
        # The longest chunk a step writes at once, which a sliding layer's ring of blocks must hold
        # with the window (kv_cache.table_lengths): a prefill chunk or a verify call.
        self.max_write = max(self.buckets.max_chunk, *VERIFY_WIDTHS)
        self.block_size = block_size
        self.plan = BlockPlan.for_model(
            model.cfg, n_ctx=n_ctx, n_slots=n_slots, block_size=block_size, max_write=self.max_write,
            cache_type_k=cache_types.k, cache_type_v=cache_types.v, kv_cache_tokens=kv_cache_tokens,
            memory_bytes=kv_blocks.memory_budget() if memory_bytes is None and kv_cache_tokens is None else memory_bytes,
        )
        self.blocks = KVBlocks(self.plan)
        # No write reaches past the positions the pools can hold (a decode step drops them).
        self.capacity = self.plan.capacity
        n_blocks = tuple(self.plan.pool(kind).n_blocks if kind in model.cfg.sliding_layers else 0 for kind in (False, True))
        self.cache = self.model.launch(
            self.model.init_cache, n_slots, n_ctx, cache_types, block_size=block_size, max_write=self.max_write,
            n_blocks=n_blocks,
        )
        # Each slot's block tables on the host (every entry NO_BLOCK while the slot is free), put
        # on the device before every call (_put_tables).
        self._host_tables = tuple(np.array(table) for table in self.cache.tables)
        self._sequence_blocks: dict[Generation, SequenceBlocks] = {}  # every sequence admitted and not released
        self.slots: list[Generation | None] = [None] * n_slots
        self.prompt_tokens_computed = 0  # prompt tokens run through prefill chunks (reused ones are not)
        self._sampler_state = SamplerState.create([_IDLE_PARAMS] * n_slots, [[]] * n_slots)
        # Whether a step computes log-probabilities is an argument of the one compiled variant,
        # not a variant of its own: a compiled step holds memory in proportion to its size.
        self._logprobs_flags = (device_copy(np.bool_(False)), device_copy(np.bool_(True)))
        # So are a batch's token masks (all ones without constraints) and how many of a decode
        # call's steps run (one where a row is constrained).
        self._all_allowed: dict[int, jax.Array] = {}
        self._step_counts = {n: device_copy(np.int32(n)) for n in {1, self.decode_steps}}
        self._tensors_dirty = True
        self._tensors = None
        self._tensors_rows = 0
        self.batch_sizes = batch_ladder(n_slots)
        # A decode call launched but not yet read back (see decode), and a counter of changes to
        # which sequence holds which slot: a call may follow the one in flight on the device only
        # while that assignment is the one it was launched with.
        self._in_flight: _DecodeCall | None = None
        self._assignment = 0
        # What decode steps and verify calls cost here, for the speculating streams' choices, and
        # how many tokens they drafted and kept (the spec_decode counters).
        self.costs = CostModel()
        # The `self` proposer's draft: the model's first layers, drafting in the first layers of the
        # cache (rz.speculative); a model of one layer has none.
        self.self_draft = None
        if model.cfg.n_layer > 1 or self_draft_layers is not None:
            self.self_draft = self_draft_model(model, choose_self_draft_layers(model.cfg.n_layer, self_draft_layers))
            self.costs.assumed_draft_token["self"] = self.self_draft.cfg.n_layer / model.cfg.n_layer
        # The `draft` proposer's model (a second GGUF of the same vocabulary), drafting in a cache of
        # its own (of the target's cache types), and which tokens each of that cache's rows holds
        # from position 0 on: before it drafts, a row is fed what it lacks of its stream's text
        # (rollback is these positions).
        self.draft_model = draft_model
        if draft_model is not None:
            self._draft_max_write = max(DRAFT_FEED_WIDTHS[-1], *VERIFY_WIDTHS)
            self.draft_cache = draft_model.init_cache(n_slots, n_ctx, cache_types, block_size=block_size, max_write=self._draft_max_write)
            self._draft_held = [np.zeros(0, np.int32)] * n_slots
            self.costs.assumed_draft_token["draft"] = _weight_bytes(draft_model) / _weight_bytes(model)
        self.n_drafted = 0
        self.n_accepted = 0
        self._vocabulary: Vocabulary | None = None  # for structured output, built by its first request
        self._vocabulary_lock = threading.Lock()

    # ----- host side -----

    def validate(self, request: GenerationRequest) -> None:
        """Reject a request that cannot be served, before it takes a slot or any compute."""
        if not request.prompt_ids:
            raise RequestError("the prompt is empty: give at least one token of text")
        request.options.validate()
        check_token_ids(request.prompt_ids, self.model.cfg.n_vocab)
        check_token_ids([token for token, _ in request.options.sampling.logit_bias], self.model.cfg.n_vocab, "logit_bias token ids")
        if request.options.constraint is not None:
            self.vocabulary.matcher(request.options.constraint)
        self.blocks.check_fits(len(request.prompt_ids), request.options.max_tokens)

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary that structured-output constraints compile against (validate runs on server threads)."""
        with self._vocabulary_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.tokenizer, self.model.cfg.n_vocab)
            return self._vocabulary

    def batch_bucket(self, n_rows: int) -> int:
        """The smallest decode batch (a compiled shape) that holds the first n_rows slots."""
        return next(size for size in self.batch_sizes if size >= n_rows)

    def free_slots(self) -> int:
        return sum(slot is None for slot in self.slots)

    def active(self) -> list[Generation]:
        return [s for s in self.slots if s is not None]

    @property
    def eog_ids(self) -> frozenset[int]:
        """The tokens that end a generation (unless a request ignores them)."""
        return self.tokenizer.eog_ids

    def new_sequence(self, request: GenerationRequest, queued_at: float | None = None) -> Generation:
        """A validated request as a sequence to be admitted, with its text pipeline."""
        self.validate(request)
        constraint = request.options.constraint
        # A verify call samples without token masks, so a constrained sequence does not speculate.
        proposer = chosen_proposer(request.options.speculative, self.speculative) if constraint is None else None
        if proposer == "self" and self.self_draft is None:
            raise RequestError("speculative='self' needs a model of at least two layers to draft with its first ones; use 'ngram'")
        if proposer == "draft" and self.draft_model is None:
            raise RequestError("speculative='draft' needs a draft model: load one with rz.LLM(path, draft_model=PATH) "
                               "or rz serve --draft-model PATH")
        return Generation(
            request=request,
            decoder=IncrementalDecoder(self.tokenizer),
            matcher=StopStringMatcher(request.options.stop),
            timings=Timings(queued_at=queued_at or time.perf_counter()),
            speculation=Speculation(proposer, judged_from=len(request.prompt_ids)) if proposer is not None else None,
            constraint=self.vocabulary.matcher(constraint) if constraint is not None else None,
        )

    # A sequence joins in three parts, so that a scheduler can run decode calls for the sequences
    # already in slots between the chunks of a long prompt.

    def begin_admission(self, sequence: Generation, context: int | None = None) -> "Admission | None":
        """Set up a sequence's prompt prefill, after the longest prefix the cache holds, into blocks
        of its own, to be run chunk by chunk; None while the pools cannot promise the blocks it
        may need (it waits for sequences to leave). It takes a free slot at complete_admission
        (one admission runs at a time).

        `context` asks for the chunks of a prompt of at least that many positions even for a
        shorter prompt: a warm-up compiles a context bucket's chunk length with a one-token prompt.
        """
        if not self.free_slots():
            raise RuntimeError("no free slot: a request is admitted only when a slot is free")
        prompt, options = sequence.request.prompt_ids, sequence.request.options
        blocks = self.blocks.admit(prompt, options.max_tokens, options.cache_prompt)
        if blocks is None:
            return None
        self._sequence_blocks[sequence] = blocks
        if blocks.copies:
            self._copy_blocks(blocks.copies)
            self.blocks.copied(blocks)
        sequence.timings.started_at = time.perf_counter()
        bucket = self.buckets.context_bucket(max(len(prompt), context or 0))
        if blocks.n_cached:
            chunks = self.buckets.tail_chunks(blocks.n_cached, len(prompt), bucket)
        else:
            chunks = self.buckets.chunks(len(prompt), context or 0)
        sequence.n_cached = blocks.n_cached
        return Admission(sequence, chunks, blocks)

    def prefill_chunk(self, admission: "Admission") -> None:
        """Run the admission's next prompt chunk through the model, into the sequence's blocks."""
        start, chunk = admission.chunks[admission.n_done]
        prompt = admission.sequence.request.prompt_ids
        end = min(start + chunk, len(prompt))
        self.blocks.grow(admission.blocks, start, end)
        tokens, positions, last = _padded_chunk(prompt, start, chunk)
        self.prompt_tokens_computed += end - start
        admission.logits = self._on_blocks(
            admission.blocks, f"prefill[{chunk}]", steps.prefill, tokens, positions, self._chunk_tables(positions), last
        )
        # Committed now, so that a prompt admitted next maps these blocks (the device runs the
        # calls in order: this chunk is written before any later call reads it).
        self.blocks.commit(admission.blocks, end)
        admission.n_done += 1

    def _on_blocks(self, blocks: SequenceBlocks, name: str, step: Callable, *args):
        """A step (prefill, score) run on one sequence's blocks, through its block tables alone;
        returns what the step returns before the cache."""
        tables = self.cache.tables
        one_row = tuple(device_copy([blocks.tables.get(kind, [])], np.int32) for kind in (False, True))
        out, cache = self._timed(name, step, self.model.weights, self.cache.with_tables(one_row), *args, **self._model_static)
        self.cache = cache.with_tables(tables)
        return out

    def complete_admission(self, admission: "Admission") -> SampledRow:
        """Sample a prefilled admission's first token; it takes the lowest free slot (decode runs on
        the smallest batch bucket that holds the slots in use), with its blocks."""
        if not admission.prefilled:
            raise RuntimeError(f"the prompt is prefilled up to chunk {admission.n_done} of {len(admission.chunks)}")
        sequence, request = admission.sequence, admission.sequence.request
        slot = self.slots.index(None)
        params = request.options.sampling
        row_state = SamplerState.create([params], [request.prompt_ids])
        allowed, _ = self._token_masks([sequence])
        sampled, row_state = self._timed(
            "first_token", steps.first_token, admission.logits,
            SamplingTensors.from_params([params]), row_state, allowed, self._logprobs_flags[bool(params.n_logprobs)],
            n_top=MAX_N_LOGPROBS,
        )
        self._sampler_state = self.model.launch(steps.join_row, self._sampler_state, jnp.int32(slot), row_state)
        sequence.slot = slot
        self.slots[slot] = sequence
        self._set_tables(slot, admission.blocks)
        self._tensors_dirty = True
        self._assignment += 1
        # Steps run asynchronously: the first token exists once it has been read back.
        sampled = jax.device_get(sampled)
        sequence.timings.first_token_at = time.perf_counter()
        return sequence, sampled, 0

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced next-token logits at every position: f32 [len(ids), vocab]. Every position
        is computed (its logits are wanted), in blocks of its own; they stay cached for the prompts
        that follow (a chat's first turn after scoring its text)."""
        if not ids:
            raise RequestError("cannot score an empty sequence of token ids")
        blocks = self.blocks.admit(ids, 0, cache_prompt=False)
        if blocks is None:
            raise RuntimeError("the KV cache's blocks are promised to the running sequences: score when fewer run")
        failed, logits = True, None
        try:
            for start, chunk in self.buckets.chunks(len(ids)):
                end = min(start + chunk, len(ids))
                self.blocks.grow(blocks, start, end)
                tokens, positions, _ = _padded_chunk(ids, start, chunk)
                chunk_logits = self._on_blocks(blocks, f"score[{chunk}]", steps.score, tokens, positions, self._chunk_tables(positions))
                self.blocks.commit(blocks, end)
                if logits is None:
                    logits = fresh_array((len(ids), chunk_logits.shape[-1]), np.float32)
                # A view of the step's result on the host (no copy on the CPU backend), copied once,
                # into the one array returned: slicing it as a device array first would be a second copy.
                logits[start:end] = np.asarray(chunk_logits)[0, : end - start]
            failed = False
        finally:
            self.blocks.release(blocks, failed=failed)
        return logits

    def decode(self) -> list[SampledRow]:
        """Decode steps for every active slot: `decode_steps` tokens per sequence in one compiled call,
        step by step (the scheduler drops what a sequence would have produced after it finished).

        One call per several tokens spreads the host's cost of a call (hundreds of weight arrays
        to pass, a sync to read the tokens) over them; a request waiting to join waits at most
        that many steps. And while the slots keep their sequences, the next call is launched
        before this one's tokens are read back: it takes this call's last tokens and positions
        on the device, so the device is not idle while the host reads tokens, detokenizes and
        dispatches. Its work for a sequence that turns out to have finished is dropped.

        While a stream speculates (rz.speculative), the calls are not chained: each one is a verify
        call of the streams' drafts when any stream has drafts worth checking, else a decode call.
        """
        call, self._in_flight = self._in_flight, None
        # A verify call samples without token masks: none while a constrained sequence runs.
        if call is None and self.active() and not any(s.constraint is not None for s in self.active()):
            rows = self._active_rows()
            drafts, model_drafts = self._drafts(rows)
            if any(drafts.values()) or any(model_drafts.values()):
                return self._verify(rows, drafts, model_drafts)
        if call is not None and call.assignment != self._assignment:
            # Slots changed hands since the call in flight was launched: read it back (its rows
            # are for the sequences still running) before launching from the host's view.
            if any(sequence.finish_reason is None for sequence in call.sequences):
                return self._collect(call)
            call = None
        started, launched_here = time.perf_counter(), call is None
        if call is None:
            call = self._launch()
            if call is None:
                return []
        needs_more = (
            s.finish_reason is None and len(s.output_ids) + call.n_steps < s.request.options.max_tokens for s in call.sequences
        )
        # A stream that may draft after this call must be looked at with its tokens on the host,
        # and a constrained sequence's next mask depends on the tokens this call samples.
        look = any(self._may_draft(s, call.rows) for s in call.sequences)
        if any(needs_more) and not look and call.allowed is None:
            # Some sequence will still need tokens after this call: queue the next one behind it.
            self._in_flight = self._launch(after=call)
        rows = self._collect(call)
        if launched_here and call.timed:
            # Launched and read back here: its time is the device's and the host's for one call.
            self.costs.record_decode(call.rows, (time.perf_counter() - started) / call.n_steps)
        for sequence in call.sequences:
            if sequence.speculation is not None:
                sequence.speculation.record_plain(call.n_steps)
        return rows

    def _active_rows(self) -> int:
        # Slots are taken lowest first, so the active ones are usually the first few: a step runs
        # on the smallest batch bucket that holds them.
        return self.batch_bucket(max(sequence.slot for sequence in self.active()) + 1)

    def _drafts(self, rows: int) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Each speculating stream's drafts, by slot: as many as pay (see rz.speculative), none
        past its max_tokens; the drafts of a host proposer, and how many a model is to draft on the
        device. None before a plain decode step at this batch has been timed, nor at a batch too
        large to verify (MAX_VERIFY_TOKENS)."""
        if not self._draft_limit(rows) or not self.costs.knows(rows):
            return {}, {}
        drafts, model_drafts = {}, {}
        for sequence in self.active():
            speculation = sequence.speculation
            if speculation is None:
                continue
            limit = self._draft_limit(rows, sequence)
            if speculation.proposer in MODEL_PROPOSERS:
                model_drafts[sequence.slot] = speculation.n_drafts(self.costs, rows, limit)
                continue
            proposed = draft(speculation, (*sequence.request.prompt_ids, *sequence.output_ids), limit)
            drafts[sequence.slot] = proposed[: speculation.n_drafts(self.costs, rows, len(proposed))]
        return drafts, model_drafts

    def _may_draft(self, sequence: Generation, rows: int) -> bool:
        """Whether a stream may draft when looked at after the coming call, judged from the tokens
        on the host (a chained call's behind): the coming call is then not chained, so that its
        tokens are on the host for the look. A model proposer drafts when drafting pays or a probe
        is due, a host proposer only if it has drafts too. Before a decode step at this batch has
        been timed, a speculating stream may: an unchained call is what times it.

        Judging so, a stream that does not draft keeps its decode calls chained, as plain decoding's
        are; a host proposer's drafts are found at most one call late."""
        speculation = sequence.speculation
        if speculation is None or not self._draft_limit(rows):
            return False
        limit = self._draft_limit(rows, sequence)
        history = (*sequence.request.prompt_ids, *sequence.output_ids)
        if speculation.proposer not in MODEL_PROPOSERS:
            speculation.follow(history, limit)  # its drafts judged in hindsight decide whether it drafts
        if not self.costs.knows(rows):
            return True
        n_drafts = speculation.n_drafts(self.costs, rows, limit)
        if speculation.proposer in MODEL_PROPOSERS or not n_drafts:
            return n_drafts > 0
        return bool(draft(speculation, history, n_drafts))

    def _draft_limit(self, rows: int, sequence: Generation | None = None) -> int:
        """The most tokens a stream may draft at this batch (verify calls hold MAX_VERIFY_TOKENS),
        none past a sequence's max_tokens."""
        widest = max((w for w in VERIFY_WIDTHS if rows * w <= MAX_VERIFY_TOKENS), default=1)
        if sequence is None:
            return widest - 1
        return max(0, min(widest - 1, sequence.request.options.max_tokens - len(sequence.output_ids) - 1))

    def _verify(self, rows: int, drafts: dict[int, list[int]], model_drafts: dict[int, int]) -> list[SampledRow]:
        """One verify call (rz.steps.verify) for every active slot, with the drafts of the speculating
        ones (a host proposer's, and those a model drafts on the device first: model_drafts says
        how many): each sequence's kept drafts and next token, position by position."""
        active = self.active()
        n_drafts = {slot: len(tokens) for slot, tokens in drafts.items()} | model_drafts
        width = next(w for w in VERIFY_WIDTHS if w >= 1 + max(n_drafts.values()))
        host_tokens = np.zeros((rows, width), np.int32)
        host_positions = np.full((rows, width), -1, np.int32)
        for sequence in active:
            fed = [sequence.output_ids[-1], *drafts.get(sequence.slot, ())]
            host_tokens[sequence.slot, : len(fed)] = fed
            host_positions[sequence.slot, : 1 + n_drafts.get(sequence.slot, 0)] = sequence.position + np.arange(
                1 + n_drafts.get(sequence.slot, 0)
            )
        for sequence in active:
            self._prepare_writes(sequence, sequence.position, width)
        drafting = {self.slots[slot].speculation.proposer for slot, n in model_drafts.items() if n}
        drafters = tuple(p for p in MODEL_PROPOSERS if p in drafting)
        sampled, n_emitted = self._verify_call(rows, device_copy(host_tokens), device_copy(host_positions), model_drafts, drafters)
        for sequence in active:
            n_drafted, n_kept = n_drafts.get(sequence.slot, 0), int(n_emitted[sequence.slot]) - 1
            if sequence.speculation is not None:
                sequence.speculation.record(n_drafted, n_kept)
            self.n_drafted += n_drafted
            self.n_accepted += n_kept
        emitted = []
        for index in range(width):
            at_step = jax.tree.map(lambda leaf: leaf[index], sampled)
            emitted.extend((s, at_step, s.slot) for s in active if index < n_emitted[s.slot])
        return emitted

    def _verify_call(self, rows: int, tokens, positions, model_drafts: dict[int, int], drafters: tuple[str, ...]):
        """A verify call of tokens, positions [rows, W], after the draft calls of the model proposers
        in drafters; timed for the cost model. Returns its SampledTokens and n_emitted, on the host."""
        width = tokens.shape[1]
        tensors, n_top = self._batch_tensors(rows)
        started, n_compiled = time.perf_counter(), len(self.compilations)
        draft_probabilities = None
        for drafter in drafters:
            tokens, draft_probabilities = self._draft_on_device(
                drafter, rows, width, tokens, model_drafts, tensors, draft_probabilities
            )
        self._put_tables()
        name = f"verify[{rows}, width={width}, logprobs={n_top}, weighed={bool(drafters)}]"
        sampled, n_emitted, self.cache, self._sampler_state = self._timed(
            name, steps.verify, self.model.weights, self.cache, tokens, positions, self._chunk_tables(positions),
            tensors, self._sampler_state, draft_probabilities, **self._model_static, n_top=n_top,
        )
        sampled, n_emitted = jax.device_get((sampled, n_emitted))
        if len(self.compilations) == n_compiled:  # nothing compiled: a measurement of the calls
            for drafter in drafters or (None,):
                self.costs.record_verify(rows, width, time.perf_counter() - started, drafter)
        return sampled, n_emitted

    def compile_speculation(self, rows: int, proposer: str | None = None) -> None:
        """Compile the verify calls (after the draft calls, if it is a model) of a proposer, by
        default the engine's, at a batch bucket, on idle rows, which they leave as they were: a
        warm-up (rz.warm_up) while no sequence runs."""
        if self.active():
            raise RuntimeError("speculation's steps are compiled on idle rows, while no sequence runs")
        proposer = proposer or self.speculative
        drafters = (proposer,) if proposer in MODEL_PROPOSERS else ()
        for width in VERIFY_WIDTHS:
            if rows * width <= MAX_VERIFY_TOKENS:
                idle = jnp.full((rows, width), -1, jnp.int32)
                self._verify_call(rows, jnp.zeros((rows, width), jnp.int32), idle, {}, drafters)
        if proposer == "draft":
            for width in DRAFT_FEED_WIDTHS:
                self._feed_draft_model(np.zeros((rows, width), np.int32), np.full((rows, width), -1, np.int32))

    def _draft_on_device(self, drafter: str, rows: int, width: int, tokens, model_drafts: dict[int, int], tensors,
                         draft_probabilities):
        """A model proposer's width - 1 drafts for its slots in model_drafts that draft, in place of
        tokens[:, 1:] (int32 [rows, width]), and every row's draft distributions (f32 [rows, width - 1,
        n_vocab]): the model's for those rows, elsewhere draft_probabilities (an earlier model's
        drafts), or without them a point mass at each of the host's drafts."""
        drafting = np.zeros(rows, bool)
        last_positions = np.full(rows, -1, np.int32)
        sequences = [s for s in self.active() if model_drafts.get(s.slot, 0) and s.speculation.proposer == drafter]
        for sequence in sequences:
            drafting[sequence.slot] = True
            last_positions[sequence.slot] = sequence.position
        if drafter == "self":
            draft_model, n_layers = self.self_draft, self.self_draft.cfg.n_layer
            self._put_tables()
            cache = self.cache.first_layers(n_layers)
        else:
            draft_model, cache = self.draft_model, self._fed_draft_cache(rows, sequences)
        drafted, probabilities, cache = self._timed(
            f"{drafter}[{rows}, drafts={width - 1}]", steps.draft, draft_model.weights, cache,
            tokens[:, 0], device_copy(last_positions), tensors, self._sampler_state,
            family=draft_model.family, cfg=draft_model.cfg, plan=draft_model.plan, n_ctx=self.capacity, n_drafts=width - 1,
        )
        if drafter == "self":
            self.cache = self.cache.with_first_layers(cache)
        else:
            # Drafting writes each row's last token and drafts too, but a ring layer gets its slots
            # back (rz.steps.draft): held from here on is what came before the last token.
            self.draft_cache = cache
            for sequence in sequences:
                self._draft_held[sequence.slot] = np.asarray(_fed_tokens(sequence), np.int32)
        return self.model.launch(steps.with_model_drafts, tokens, drafted, probabilities, device_copy(drafting), draft_probabilities)

    def _fed_draft_cache(self, rows: int, sequences: Sequence[Generation]) -> kv_cache.KVCache:
        """The draft model's cache with each of sequences' rows fed what it does not hold of the
        tokens its target row holds (_fed_tokens: those after the longest prefix it holds), in calls
        of up to DRAFT_FEED_WIDTHS[-1] tokens a row."""
        pending = {}
        ring_slots, ring_reach = kv_cache.ring(self.draft_model.cfg, self.n_ctx, self.block_size, self._draft_max_write)
        for sequence in sequences:
            text = np.asarray(_fed_tokens(sequence), np.int32)
            held = self._draft_held[sequence.slot]
            differs = np.flatnonzero(held[: len(text)] != text[: len(held)])
            start = int(differs[0]) if len(differs) else min(len(held), len(text))
            # Drafting wrote up to a verify call's width past what the row held: a ring that may
            # have lost keys the feed from `start` needs (kv_cache.ring) is fed from the start.
            if ring_slots and len(held) + max(VERIFY_WIDTHS) > max(ring_slots, start + ring_reach):
                start = 0
            if start < len(text):
                pending[sequence.slot] = (start, text[start:])
        while pending:
            longest = max(len(tokens) for _, tokens in pending.values())
            width = next((w for w in DRAFT_FEED_WIDTHS if w >= longest), DRAFT_FEED_WIDTHS[-1])
            host_tokens = np.zeros((rows, width), np.int32)
            host_positions = np.full((rows, width), -1, np.int32)
            for slot, (start, tokens) in pending.items():
                piece = tokens[:width]
                host_tokens[slot, : len(piece)] = piece
                host_positions[slot, : len(piece)] = start + np.arange(len(piece))
            self._feed_draft_model(host_tokens, host_positions)
            pending = {slot: (start + width, tokens[width:]) for slot, (start, tokens) in pending.items() if len(tokens) > width}
        return self.draft_cache

    def _feed_draft_model(self, tokens: np.ndarray, positions: np.ndarray) -> None:
        """One call of rz.steps.feed into the draft model's cache: tokens, positions int32 [rows, width]."""
        draft, positions = self.draft_model, device_copy(positions)
        tables = steps.chunk_rope_tables(draft.family.rope_freq_factors(draft.weights), positions, cfg=draft.cfg)
        self.draft_cache = self._timed(
            f"draft feed[{tokens.shape[0]}, width={tokens.shape[1]}]", steps.feed, draft.weights, self.draft_cache,
            device_copy(tokens), positions, tables, family=draft.family, cfg=draft.cfg, plan=draft.plan,
        )

    def _launch(self, after: "_DecodeCall | None" = None) -> "_DecodeCall | None":
        """Launch one decode call: from the host's view of the slots, or chained after a call."""
        if after is not None:
            rows, sequences, tokens, positions = after.rows, after.sequences, after.next_tokens, after.next_positions
        else:
            active = self.active()
            if not active:
                return None
            rows = self._active_rows()
            host_tokens = np.zeros(rows, np.int32)
            host_positions = np.full(rows, -1, np.int32)
            for sequence in active:
                host_tokens[sequence.slot] = sequence.output_ids[-1]
                host_positions[sequence.slot] = sequence.position
            sequences, tokens, positions = tuple(active), device_copy(host_tokens), device_copy(host_positions)
        tensors, n_top = self._batch_tensors(rows)
        # A chained call runs after an unconstrained one (see decode): no row is constrained.
        allowed, constrained = self._token_masks(self.slots[:rows] if after is None else [None] * rows)
        # Each mask holds for one token only: a batch with a constrained row runs one step per call.
        n_steps = 1 if constrained else self.decode_steps
        # The host's positions are a call behind a chained call's.
        for sequence in sequences:
            self._prepare_writes(sequence, sequence.position + (after.n_steps if after is not None else 0), n_steps)
        self._put_tables()
        name = f"decode[{rows}, steps={self.decode_steps}]"
        timed = name in self.compilations
        sampled, self.cache, self._sampler_state, next_tokens, next_positions = self._timed(
            name, steps.decode, self.model.weights, self.cache, tokens, positions, tensors, self._sampler_state, allowed,
            self._logprobs_flags[n_top > 0], self._step_counts[n_steps], **self._model_static, n_ctx=self.capacity,
            n_top=MAX_N_LOGPROBS, n_steps=self.decode_steps,
        )
        return _DecodeCall(
            rows, n_steps, sequences, self._assignment, sampled, next_tokens, next_positions, timed, allowed if constrained else None
        )

    def _batch_tensors(self, rows: int) -> tuple[SamplingTensors, int]:
        """The sampling settings of the first `rows` slots, and their log-probability width."""
        if self._tensors_dirty or self._tensors_rows != rows:
            params = [s.request.options.sampling if s is not None else _IDLE_PARAMS for s in self.slots[:rows]]
            self._tensors = SamplingTensors.from_params(params)
            self._n_top = _logprob_width(params)
            self._tensors_rows = rows
            self._tensors_dirty = False
        return self._tensors, self._n_top

    def _token_masks(self, rows: Sequence[Generation | None]) -> tuple[jax.Array, bool]:
        """The allowed-token bitmask of each row (all ones but for constrained sequences), and
        whether any row is constrained. An unconstrained batch's all-ones masks are made once per
        batch size, and the step skips them (rz.sampling)."""
        matchers = [row.constraint if row is not None else None for row in rows]
        if any(matcher is not None for matcher in matchers):
            return device_copy(self.vocabulary.masks(matchers)), True
        if len(rows) not in self._all_allowed:
            n_words = -(-self.model.cfg.n_vocab // 32)
            self._all_allowed[len(rows)] = device_copy(np.full((len(rows), n_words), -1, np.int32))
        return self._all_allowed[len(rows)], False

    def _collect(self, call: "_DecodeCall") -> list[SampledRow]:
        """Read a call's tokens back: each step's row of every sequence it ran for, step by step."""
        try:
            sampled = jax.device_get(call.sampled)
        except Exception:
            self._in_flight = None  # a call chained after a failed one cannot be read either
            raise
        rows = []
        for index in range(call.n_steps):
            at_step = jax.tree.map(lambda leaf: leaf[index], sampled)
            rows.extend((sequence, at_step, sequence.slot) for sequence in call.sequences)
        return rows

    def release(self, sequence: Generation) -> None:
        """Give back the blocks a sequence holds and the slot, if it holds one, before the next call.

        Its full blocks stay cached for the prompts that start with its tokens: every token but
        the last sampled one has been fed to the model (a call still in flight writes them before
        any later call reads them). After a failure, what its blocks hold is unknown: none stays."""
        holds_slot = 0 <= sequence.slot < self.n_slots and self.slots[sequence.slot] is sequence
        failed = sequence.finish_reason is FinishReason.ERROR
        blocks = self._sequence_blocks.pop(sequence, None)
        if blocks is not None:
            if holds_slot and not failed:
                self._commit(sequence, blocks)
            self.blocks.release(blocks, failed=failed)
        if holds_slot:
            self.slots[sequence.slot] = None
            for table in self._host_tables:
                table[sequence.slot] = NO_BLOCK
            self._tensors_dirty = True
            self._assignment += 1

    # ----- blocks -----

    def _commit(self, sequence: Generation, blocks: SequenceBlocks) -> None:
        """Record the tokens the sequence has fed so far (their blocks become mappable once full)."""
        fed = _fed_tokens(sequence)
        if len(fed) > blocks.n_committed:
            self.blocks.commit(blocks, len(fed), fed[len(blocks.tokens) :])

    def _prepare_writes(self, sequence: Generation, start: int, n_positions: int) -> None:
        """Before a call that writes a running sequence's positions [start, start + n_positions):
        what it fed is committed, and those positions have blocks (none past its reservation: a
        call launched ahead runs past a sequence's end, and writes there are dropped)."""
        blocks = self._sequence_blocks.get(sequence)
        if blocks is None:
            return
        self._commit(sequence, blocks)
        end = min(start + n_positions, blocks.span)
        if start < end and self.blocks.grow(blocks, start, end):
            self._set_tables(sequence.slot, blocks)

    def compile_block_copy(self) -> None:
        """Compile the copy an admission may ask for (a warm-up, rz.warm_up), with no block to copy."""
        self._copy_blocks({})

    def _copy_blocks(self, copies: dict[bool, tuple[int, int]]) -> None:
        """Launch the block copies (per kind, source and destination) an admission asks for: a
        block that holds the prompt's next tokens among others' (rz.kv_blocks), before any chunk."""
        pairs = [copies.get(kind, (NO_BLOCK, NO_BLOCK)) for kind in (False, True)]
        sources, destinations = (tuple(device_copy([pair[i]], np.int32) for pair in pairs) for i in (0, 1))
        self.cache = self._timed("copy_blocks", steps.copy_blocks, self.cache, sources, destinations)

    def _set_tables(self, slot: int, blocks: SequenceBlocks) -> None:
        for kind, table in zip((False, True), self._host_tables):
            if kind in blocks.tables:
                table[slot] = blocks.tables[kind]

    def _put_tables(self) -> None:
        """The slots' block tables onto the device, for the call about to run. Put there before every
        call, not only after a change, so that every call takes tables placed alike (a call's own
        output tables may be placed otherwise, and would compile the next call once more)."""
        self.cache = self.cache.with_tables(tuple(device_copy(table) for table in self._host_tables))

    def _chunk_tables(self, positions):
        return self._timed(
            f"rope_tables[{positions.shape[1]}]", steps.chunk_rope_tables, self._rope_freq_factors, positions,
            cfg=self.model.cfg,
        )

    # How many shape variants of the compiled steps exist (in this process, for every engine).
    compiled_variants = staticmethod(steps.compiled_variants)

    def _timed(self, name: str, step: Callable, *args, **static):
        """Call a compiled step, recording how long its first call (compilation included) took."""
        if name in self.compilations:
            return self.model.launch(step, *args, **static)
        start = time.perf_counter()
        result = jax.block_until_ready(self.model.launch(step, *args, **static))
        self.compilations[name] = time.perf_counter() - start
        drop_tracing_caches()
        return result


@dataclass(eq=False)
class Admission:
    """A request on its way into a slot: its prompt prefilled chunk by chunk into its blocks."""

    sequence: Generation  # slot -1 until complete_admission
    chunks: tuple[tuple[int, int], ...]  # (start, padded length) of each prompt chunk after the cached prefix
    blocks: SequenceBlocks | None = None  # its block tables (rz.kv_blocks)
    n_done: int = 0
    logits: jax.Array | None = None  # of the last position prefilled so far

    @property
    def prefilled(self) -> bool:
        return self.n_done == len(self.chunks)

    def wait(self) -> None:
        """Block until the chunks launched so far have run (steps are dispatched asynchronously)."""
        jax.block_until_ready(self.logits)


@dataclass(frozen=True)
class _DecodeCall:
    """A launched decode call: what it computes for whom, and its results on the device."""

    rows: int
    n_steps: int
    sequences: tuple[Generation, ...]  # the sequences in its slots when it was launched
    assignment: int  # Engine._assignment at launch
    sampled: SampledTokens  # leaves [n_steps, rows, ...], still on the device
    next_tokens: jax.Array  # what a call chained after it takes
    next_positions: jax.Array
    timed: bool  # its shape was compiled before: its time is a measurement of the step
    allowed: jax.Array | None  # the token masks it ran with (None: unconstrained)


def _weight_bytes(model) -> int:
    # Layers' stacks (rz.models.layer_stacks) hold the layers' own bytes again: counted once.
    return sum(leaf.nbytes for leaf in jax.tree.leaves(replace(model.weights, layers=tuple(model.weights.layers))))


def _logprob_width(rows: Sequence[SamplingParams]) -> int:
    # The widest or none: decode and first-token steps take it as a run-time flag, a verify call
    # as one of its two compiled variants.
    return MAX_N_LOGPROBS if any(p.n_logprobs for p in rows) else 0


def _fed_tokens(sequence: Generation) -> tuple[int, ...]:
    """The tokens fed to the model so far, whose KV its row holds: all but the last sampled one."""
    return (*sequence.request.prompt_ids, *sequence.output_ids[:-1])


def _padded_chunk(ids: Sequence[int], start: int, bucket: int):
    """tokens/positions [1, bucket] for ids[start:start+bucket], padded with position -1."""
    piece = np.asarray(ids[start : start + bucket], np.int32)
    tokens = np.zeros((1, bucket), np.int32)
    positions = np.full((1, bucket), -1, np.int32)
    tokens[0, : len(piece)] = piece
    positions[0, : len(piece)] = np.arange(start, start + len(piece))
    return device_copy(tokens), device_copy(positions), device_copy([len(piece) - 1], np.int32)
