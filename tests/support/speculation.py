"""What the speculative-decoding tests share: an engine whose drafts always pay, a batch run through
the scheduler, and the comparison of greedy outputs that allows the kernels' near ties."""

import gc

import jax
import numpy as np
from scipy import stats

from rz.buckets import Buckets
from rz.engine import Engine
from rz.generation import Generation, GenerationRequest
from rz.request import FinishReason, RequestOptions, SamplingParams
from rz.scheduler import Scheduler
from rz.speculative import CostModel

# A verify call feeds a quantized matmul more rows than a decode step, and the CPU kernel's
# accumulation order depends on the row count, as it does between batch sizes of plain decoding:
# greedy output may part from plain decoding's where the two best logits are closer than the
# kernels' disagreement, and only there. Measured on Gemma 3 (24 prompts, 32 tokens): plain decoding
# at batch 1 and at batch 4 part on 6 prompts; speculation at batch 4 parts from plain at batch 4
# on 7, the largest gap at a parting 3% of the best logit (SmolLM2: 0.4%).
NEAR_TIE = 0.05


class DraftingAlwaysPays(CostModel):
    """Costs under which every draft pays, so that verify calls run whatever this machine's timings."""

    def knows(self, rows: int) -> bool:
        return True

    def relative_verify_cost(self, rows: int, width: int, drafter: str | None = None) -> float:
        return 1.0


def release_executables() -> None:
    """Drop every compiled executable, between models: each holds mapped pages of JIT code, and a
    module's verify and draft shapes of several models together neared vm.max_map_count, where XLA
    aborts mid-compile (see tests/conftest.py). Later cases recompile from the persistent cache."""
    gc.collect()
    jax.clear_caches()


def small_blocks_and_chunks(n_ctx: int) -> dict:
    """Engine arguments for blocks of 8 slots and chunks of at most 16 tokens: a tiny Gemma 3's rings
    (window 8) hold 32 slots, which its streams wrap."""
    return {"buckets": Buckets.for_context(n_ctx, largest=16), "block_size": 8}


def drafting_engine(llm, n_slots: int, self_draft_layers: int | None = None, draft_model=None, **options) -> Engine:
    """options: more Engine arguments (cache_types)."""
    engine = Engine(
        llm.model, llm.tokenizer, llm.n_ctx, n_slots, self_draft_layers=self_draft_layers, draft_model=draft_model,
        **small_blocks_and_chunks(llm.n_ctx), **options,
    )
    engine.costs = DraftingAlwaysPays()
    return engine


def plain_engine(llm, n_slots: int, **options) -> Engine:
    """A plainly decoding engine of drafting_engine's cache layout: the plain runs that speculative
    ones are compared with share their prefill and decode executables (each cache shape compiles its
    own), and differ from them in speculation only. options: as drafting_engine's."""
    return Engine(llm.model, llm.tokenizer, llm.n_ctx, n_slots, **small_blocks_and_chunks(llm.n_ctx), **options)


def run(engine: Engine, prompts, options) -> list[Generation]:
    """Generate for every prompt in one batch; options: one RequestOptions for all, or one per prompt."""
    options = options if isinstance(options, list) else [options] * len(prompts)
    scheduler = Scheduler(engine)
    sequences = [scheduler.add(GenerationRequest(tuple(p), o)) for p, o in zip(prompts, options)]
    for _ in scheduler.drain():
        pass
    return sequences


def assert_same_up_to_near_ties(llm, prompts, got: list[Generation], want: list[Generation]) -> None:
    """Each pair of outputs is equal, or parts where the plain run's two best logits were a near tie."""
    for prompt, spec, plain in zip(prompts, got, want):
        if spec.output_ids == plain.output_ids:
            continue
        at = next(i for i, (a, b) in enumerate(zip(spec.output_ids, plain.output_ids)) if a != b)
        best_two = np.sort(llm.score(list(prompt) + plain.output_ids[:at])[-1])[-2:]
        assert best_two[1] - best_two[0] < NEAR_TIE * abs(best_two[1]), f"output parts at token {at} without a near tie: {best_two}"


def repetitive_prompts(n: int, n_vocab: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so that prompt lookup has something to draft from."""
    rng = np.random.default_rng(7)
    prompts = []
    for _ in range(n):
        phrase = rng.integers(3, n_vocab, rng.integers(3, 7)).tolist()
        prompts.append([1] + phrase * int(rng.integers(2, 5)) + rng.integers(3, n_vocab, 2).tolist())
    return prompts


# The distribution tests' prompt and sample count: the tokens sampled after a repeated phrase.
DISTRIBUTION_PROMPT = (1,) + (40, 41, 42) * 6
N_SAMPLES = 2000
# Their speculating engines' slots: four rows verify 4 tokens each (rz.engine.MAX_VERIFY_TOKENS),
# the last token and 3 drafts, which is all that max_tokens=5 leaves after the prefill's token
# (rz.engine drafts none past max_tokens): as many drafts a call as two rows of 8 would verify.
DISTRIBUTION_SLOTS = 4


def first_five_tokens(engine: Engine, speculative: str | None, first_seed: int) -> np.ndarray:
    """N_SAMPLES seeded top-k samples (seeds from first_seed on) of the first five tokens after
    DISTRIBUTION_PROMPT, drafting with the proposer `speculative` (None: plain): [samples, 5]."""
    options = [
        RequestOptions(
            max_tokens=5, ignore_eos=True, speculative=speculative,
            sampling=SamplingParams(temperature=1.0, top_k=8, seed=first_seed + i),
        )
        for i in range(N_SAMPLES)
    ]
    return np.array([s.output_ids for s in run(engine, [DISTRIBUTION_PROMPT] * N_SAMPLES, options)])


def assert_same_distribution(plain: np.ndarray, speculative: np.ndarray, columns=(0, 4)) -> None:
    """Samples (token ids [samples, tokens]) of each column are alike by a chi-square test of
    homogeneity (p > 0.01), on the tokens seen at least 5 times in all."""
    for column in columns:
        tokens = np.union1d(plain[:, column], speculative[:, column])
        table = np.array([[np.sum(sample[:, column] == t) for t in tokens] for sample in (plain, speculative)])
        table = table[:, table.sum(axis=0) >= 5]
        assert stats.chi2_contingency(table)[1] > 0.01, f"token {column + 1}: {table}"


def assert_stops_land_where_they_do_without_speculation(llm, prompt, drafting_engine_for_one, proposer: str) -> int:
    """A stop string and a stop token (each from the middle of the greedy output) and max_tokens end
    a speculative run (on drafting_engine_for_one(), an engine of one slot) where they end a plain
    one: the same tokens, text and finish reason. Returns how many tokens the runs drafted."""
    greedy = SamplingParams(temperature=0)
    plain_one = plain_engine(llm, 1)
    reference = run(plain_one, [prompt], RequestOptions(max_tokens=30, sampling=greedy))[0]
    text = "".join(reference.text)
    cases = [
        RequestOptions(max_tokens=30, sampling=greedy, stop=(text[len(text) // 2 :][:3],)),
        RequestOptions(max_tokens=30, sampling=greedy, stop_token_ids=frozenset({reference.output_ids[len(reference.output_ids) // 2]})),
        RequestOptions(max_tokens=13, sampling=greedy),
    ]
    drafted = 0
    for options in cases:
        plain = run(plain_one, [prompt], options)[0]
        engine = drafting_engine_for_one()
        speculative = run(engine, [prompt], RequestOptions(**{**options.__dict__, "speculative": proposer}))[0]
        drafted += engine.n_drafted
        assert (speculative.output_ids, "".join(speculative.text), speculative.finish_reason) == (
            plain.output_ids, "".join(plain.text), plain.finish_reason
        )
    assert plain.finish_reason == FinishReason.LENGTH and len(plain.output_ids) == 13
    return drafted
