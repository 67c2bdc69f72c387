"""Speculative decoding on the host: what a stream drafts (the proposers) and how many drafts pay.

A speculating stream feeds its last token and k drafted tokens through one verify step
(rz.steps.verify), which keeps the drafts its sampler agrees with and adds the sampler's own
next token. For a proposer whose draft is a point mass q (`ngram`: q(d) = 1), that is exactly
the speculative-sampling rule of Leviathan et al. (accept d with probability min(1, p(d)/q(d)) =
p(d); after a rejection draw from norm(max(p - q, 0)), which is p without d): drawing x ~ p and
keeping d when x == d gives d with probability p(d), and any other token y with probability
p(y), the residual's. So the output has the distribution of plain decoding, and since the
sampler draws at each position with the key plain decoding would use there, a seeded
speculative run gives the very tokens of the same seeded run without speculation; greedy
decoding is the case of a point-mass p.

The `self` proposer drafts with the target's own first layers, its final norm and its output head
(self_draft_model): a model whose drafts are sampled from a distribution q, on the device
(rz.steps.draft), so the verify call keeps them by the general rule instead, min(1, p/q) and
norm(max(p - q, 0)) (rz.steps.verify): the output distribution is plain decoding's, greedy output
its very tokens, but a seeded sampled run draws other tokens than the same seeded plain run. Its
layers' keys and values for a kept token are the target's, so it drafts in the target's cache,
whose first layers the verify call then writes as it always does.

Whether drafting pays is judged per stream from its acceptance rate and from what verify calls
and plain decode steps have been measured to cost on this engine (CostModel): a stream drafts the
number of tokens that maximizes expected tokens per second, and none (plain decode) when plain
decoding is faster. A stream that has fallen back learns when drafting would pay again: prompt
lookup judges its drafts in hindsight (Speculation.follow: would the proposal at each plain step
have matched the tokens the model then produced?), on the host, for no verify call; a model
proposer, whose drafts cost a call of their own, probes (drafts now and then, ever less often).
"""

from bisect import bisect_right
from dataclasses import dataclass, field, replace
from typing import Sequence

from rz.buckets import VERIFY_WIDTHS
from rz.errors import RequestError

PROPOSERS = ("ngram", "self", "draft")
# The proposers that draft with a model on the device (rz.steps.draft), from a distribution q.
MODEL_PROPOSERS = ("self", "draft")
# A request's `speculative` that turns speculation off where the engine's default would turn it on.
OFF = "off"

# The n-gram sizes prompt lookup tries, longest first: a single repeated token says too little.
NGRAM_SIZES = (5, 4, 3, 2)
# A stream starts as if this many of its drafts had been tried, half of them kept; of its copies
# (COPY_NGRAM), nine in ten, about what both real models keep of those (session 17), so that a copy
# is drafted at the widest verify from its start.
_PRIOR_DRAFTS = 4.0
_PRIOR_COPY_ACCEPTANCE = 0.9
# Prompt-lookup drafts found by a suffix n-gram at least this long are a copy under way, and keep a
# record of their own: when a model rewrites its input, drafts found by a 2- or 3-gram alone are
# kept far less often than those found by the last 5 tokens (SmolLM2,
# benchmarks/results/speculative-session17.md), and one record of both drafted a copy too little.
COPY_NGRAM = 5
# Acceptance is a decayed average: each verify call's counts weigh this much against the past.
_DECAY = 0.8
# A model proposer's stream that falls back to plain decoding (its drafts are not kept often enough
# to pay) tries drafting again after this many tokens, so that a change of its text (a quote begins)
# is noticed; each probe that keeps nothing doubles the wait, up to MAX_PROBE_INTERVAL, so that a
# stream whose text never changes pays for few probes (each one is a draft call and a verify call).
# Prompt lookup needs no probes: it judges its drafts in hindsight (Speculation.follow).
PROBE_INTERVAL = 32
MAX_PROBE_INTERVAL = 512
# Until a call of a shape has been timed, the cost model assumes these costs relative to one plain
# decode step at the same batch: a W-token verify call reads the weights once, as a decode step
# does, and computes W rows (about what both real models measure at batch 1, in
# benchmarks/results/speculative-session12.md).
_ASSUMED_VERIFY_COST = {2: 1.25, 4: 1.5, 8: 1.9}
# The fraction of the target's layers a `self` draft runs by default. A draft's acceptance falls as
# it loses layers, its cost grows with the layers it keeps; on models not trained for an early exit
# no depth was measured to pay (benchmarks/results/speculative-session13.md), so this is a middle.
SELF_DRAFT_FRACTION = 0.5
# Each timing weighs this much against the average of those before it.
_TIMING_WEIGHT = 0.2


def validate_proposer(name: str | None) -> None:
    """Raise RequestError unless name is a known proposer, OFF, or None (the engine's default)."""
    if name is not None and name not in (*PROPOSERS, OFF):
        raise RequestError(
            f"speculative must be one of {', '.join(PROPOSERS)}, {OFF!r}, or unset for the default, got {name!r}"
        )


def chosen_proposer(requested: str | None, default: str | None) -> str | None:
    """The proposer a request speculates with: its own, else the engine's default; None: none."""
    proposer = requested if requested is not None else default
    return None if proposer == OFF else proposer


def choose_self_draft_layers(n_layer: int, requested: int | None) -> int:
    """The layers a `self` draft runs: requested, else SELF_DRAFT_FRACTION of n_layer; at least 1, fewer than n_layer."""
    layers = requested if requested is not None else max(1, round(SELF_DRAFT_FRACTION * n_layer))
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < n_layer:
        raise ValueError(f"self_draft_layers must be an integer from 1 to {n_layer - 1} (the model has {n_layer} layers), got {requested!r}")
    return layers


def self_draft_model(model, n_layers: int):
    """The `self` proposer's draft: model (an rz.models.Model) cut to its first n_layers, with its own
    final norm and output head, its weights shared."""
    cfg = model.cfg
    cfg = replace(cfg, n_layer=n_layers, sliding_layers=cfg.sliding_layers[:n_layers], rope_layers=cfg.rope_layers[:n_layers])
    return replace(model, cfg=cfg, weights=replace(model.weights, layers=model.weights.layers[:n_layers]))


def check_draft_vocabulary(target_tokens: Sequence[str], draft_tokens: Sequence[str]) -> None:
    """Raise ValueError unless a draft model's vocabulary (its token texts, by id) is the target's:
    the verify call reads the draft's token ids as the target's."""
    if len(draft_tokens) != len(target_tokens):
        raise ValueError(
            f"the draft model's vocabulary has {len(draft_tokens):,} tokens, the model's {len(target_tokens):,}: "
            "a draft model must share the model's vocabulary (a smaller model of the same family)"
        )
    for token_id, (ours, theirs) in enumerate(zip(target_tokens, draft_tokens)):
        if ours != theirs:
            raise ValueError(
                f"the draft model's token {token_id} is {theirs!r}, the model's {ours!r}: "
                "a draft model must share the model's vocabulary (a smaller model of the same family)"
            )


class NgramIndex:
    """Prompt lookup over a growing token sequence: where each n-gram of NGRAM_SIZES starts, updated
    per token appended, so that a lookup reads one list instead of scanning the sequence."""

    def __init__(self, sizes: Sequence[int] = NGRAM_SIZES):
        self.sizes = tuple(sizes)
        self.tokens: list[int] = []
        self._starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its start positions, ascending

    def extend(self, tokens: Sequence[int]) -> "NgramIndex":
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in self.sizes:
                if end >= n:
                    self._starts.setdefault(tuple(self.tokens[end - n :]), []).append(end - n)
        return self

    def propose(self, n_drafts: int) -> list[int]:
        """The tokens that followed an earlier occurrence of the longest suffix n-gram, at most
        n_drafts of them; [] if no suffix recurs.

        The occurrence is the latest one followed by n_drafts tokens, else the earliest (the one
        followed by the most): in a loop, the latest would leave a single token to draft."""
        source = self._source(n_drafts)
        return [] if source is None else self.tokens[source : source + n_drafts]

    def found_by(self) -> int:
        """The length of the suffix n-gram propose's drafts are found by; 0 if no suffix recurs."""
        length = len(self.tokens)
        return next((n for n in self.sizes if length > n and len(self._starts[tuple(self.tokens[-n:])]) > 1), 0)

    def _source(self, n_drafts: int) -> int | None:
        """Where propose's drafts start in tokens; None if it drafts nothing."""
        n, length = self.found_by(), len(self.tokens)
        if n_drafts < 1 or not n:
            return None
        # The last start is the suffix itself; every earlier one is followed by a token at least.
        starts = self._starts[tuple(self.tokens[-n:])]
        full = bisect_right(starts, length - n - n_drafts, hi=len(starts) - 1)
        return (starts[full - 1] if full else starts[0]) + n


def propose_ngram(history: Sequence[int], n_drafts: int, sizes: Sequence[int] = NGRAM_SIZES) -> list[int]:
    """Prompt lookup's drafts to follow history (prompt plus output): NgramIndex.propose."""
    return NgramIndex(sizes).extend(history).propose(n_drafts)


@dataclass
class CostModel:
    """Seconds a compiled call takes on this engine: a plain decode step, and a verify call of each
    width, per batch bucket; averages of the calls timed so far."""

    decode_step: dict[int, float] = field(default_factory=dict)  # rows -> seconds per step
    verify_call: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, width) -> seconds
    # A model's draft call of width - 1 tokens and the verify call of its drafts:
    # (model proposer, rows, width) -> seconds.
    drafted_call: dict[tuple[str, int, int], float] = field(default_factory=dict)
    # Until such a call has been timed: what one draft token of each model proposer costs, in plain
    # decode steps (about its share of the target's weights); 1 for one not given.
    assumed_draft_token: dict[str, float] = field(default_factory=dict)

    def record_decode(self, rows: int, seconds_per_step: float) -> None:
        self.decode_step[rows] = _average(self.decode_step.get(rows), seconds_per_step)

    def record_verify(self, rows: int, width: int, seconds: float, drafter: str | None = None) -> None:
        """Time a verify call; drafter: the model proposer whose draft call it includes, if any."""
        calls, key = self._calls(rows, width, drafter)
        calls[key] = _average(calls.get(key), seconds)

    def knows(self, rows: int) -> bool:
        """Whether a plain decode step at this batch has been timed: the baseline drafting must beat."""
        return rows in self.decode_step

    def relative_verify_cost(self, rows: int, width: int, drafter: str | None = None) -> float:
        """A verify call of `width` tokens per row, after the draft call of a model proposer
        (drafter) if given, in plain decode steps at the same batch."""
        calls, key = self._calls(rows, width, drafter)
        step, call = self.decode_step.get(rows), calls.get(key)
        if step is None or call is None:
            drafting = 0.0 if drafter is None else (width - 1) * self.assumed_draft_token.get(drafter, 1.0)
            return _ASSUMED_VERIFY_COST[width] + drafting
        return call / step

    def _calls(self, rows: int, width: int, drafter: str | None):
        if drafter is None:
            return self.verify_call, (rows, width)
        return self.drafted_call, (drafter, rows, width)


@dataclass
class DraftRecord:
    """Drafts tried and kept, each verify call's counts weighing _DECAY against those before."""

    drafted: float = _PRIOR_DRAFTS
    kept: float = _PRIOR_DRAFTS / 2

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft is kept, given that the ones before it were."""
        return self.kept / self.drafted

    def count(self, n_drafted: int, n_kept: int) -> None:
        # The drafts after a rejected one were never tried: acceptance is the chance that a draft is
        # kept once the ones before it are, and n_kept of the tried ones were.
        self.drafted = _DECAY * self.drafted + n_kept + (n_kept < n_drafted)
        self.kept = _DECAY * self.kept + n_kept


@dataclass
class Speculation:
    """A speculating stream's proposer and its records of kept drafts."""

    proposer: str
    # Prompt lookup's hindsight judges the proposals made at this length of the stream's text and
    # after: its prompt's own repeats say nothing about what the model will write.
    judged_from: int = 0
    # A model's drafts, and prompt lookup's found by an n-gram shorter than COPY_NGRAM; prompt
    # lookup's copies, found by a longer one.
    drafts: DraftRecord = field(default_factory=DraftRecord)
    copies: DraftRecord = field(default_factory=lambda: DraftRecord(kept=_PRIOR_COPY_ACCEPTANCE * _PRIOR_DRAFTS))
    plain_tokens: int = 0  # tokens decoded plainly since the stream last drafted
    probe_interval: int = PROBE_INTERVAL  # plain tokens before a model proposer that falls back drafts again
    lookup: NgramIndex = field(default_factory=NgramIndex)  # prompt lookup's index of the text followed so far
    # Hindsight proposals not judged yet: (the text's length when proposed, the drafts, their record).
    _pending: list[tuple[int, list[int], DraftRecord]] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft made now is kept, given that the ones before it were."""
        return self._record().acceptance

    def _record(self) -> DraftRecord:
        """The record of the drafts a stream would make now: prompt lookup's, of the text followed so far."""
        copying = self.proposer not in MODEL_PROPOSERS and self.lookup.found_by() >= COPY_NGRAM
        return self.copies if copying else self.drafts

    def record(self, n_drafted: int, n_kept: int) -> None:
        """Count a verify call's drafts; n_kept of them were kept. Prompt lookup has not followed the
        call's tokens yet: the text it follows is the one the drafts were proposed for."""
        if n_drafted:
            self._record().count(n_drafted, n_kept)
            self.plain_tokens = 0
            self.probe_interval = PROBE_INTERVAL if n_kept else min(2 * self.probe_interval, MAX_PROBE_INTERVAL)
            # The verify call emits its kept drafts and a token of its own: they were judged there.
            self.judged_from = len(self.lookup.tokens) + n_kept + 1

    def record_plain(self, n_tokens: int) -> None:
        self.plain_tokens += n_tokens

    def follow(self, history: Sequence[int], n_drafts: int) -> None:
        """Index the tokens of history (the stream's prompt and output) not followed yet, judging in
        hindsight the proposal of n_drafts tokens prompt lookup would have made at each of them:
        its kept drafts are those that match what the model produced. A stream that does not draft
        so learns when drafting would pay, for no verify call."""
        for length in range(len(self.lookup.tokens), len(history)):
            if length >= self.judged_from:
                proposal = self.lookup.propose(n_drafts)
                if proposal:
                    self._pending.append((length, proposal, self._record()))
            self.lookup.extend(history[length : length + 1])
        waiting = []
        for length, proposal, record in self._pending:
            produced = history[length : length + len(proposal)]
            n_kept = next((i for i, (a, b) in enumerate(zip(proposal, produced)) if a != b), len(produced))
            if n_kept < len(produced) or len(produced) == len(proposal):  # a rejection seen, or every draft kept
                record.count(len(proposal), n_kept)
            else:
                waiting.append((length, proposal, record))
        self._pending = waiting

    def n_drafts(self, costs: CostModel, rows: int, limit: int) -> int:
        """How many tokens to draft now (0: decode plainly), at most limit."""
        alpha = min(self.acceptance, 0.999)
        best_rate, best = 1.0, 0  # plain decoding: one token per decode step
        drafter = self.proposer if self.proposer in MODEL_PROPOSERS else None
        for width in VERIFY_WIDTHS:
            k = min(width - 1, limit)
            # Each draft is kept with chance alpha once the ones before it are: 1 + a + ... + a^k tokens.
            expected = (1 - alpha ** (k + 1)) / (1 - alpha)
            rate = expected / costs.relative_verify_cost(rows, width, drafter)
            if k >= 1 and rate > best_rate:
                best_rate, best = rate, k
        if best == 0 and drafter is not None and limit >= 1 and self.plain_tokens >= self.probe_interval:
            return min(VERIFY_WIDTHS[0] - 1, limit)
        return best


def draft(speculation: Speculation, history: Sequence[int], n_drafts: int) -> list[int]:
    """A host proposer's drafts to follow history, at most n_drafts (a model drafts on the device)."""
    if speculation.proposer == "ngram":
        speculation.follow(history, n_drafts)
        return speculation.lookup.propose(n_drafts)
    raise ValueError(f"unknown proposer {speculation.proposer!r}")


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - _TIMING_WEIGHT) * previous + _TIMING_WEIGHT * value
