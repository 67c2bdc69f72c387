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
decoding is faster.
"""

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from rz.buckets import VERIFY_WIDTHS
from rz.errors import RequestError

PROPOSERS = ("ngram", "self")
# The proposers that draft with a model on the device (rz.steps.draft), from a distribution q.
MODEL_PROPOSERS = ("self",)
# A request's `speculative` that turns speculation off where the engine's default would turn it on.
OFF = "off"

# The n-gram sizes prompt lookup tries, longest first: a single repeated token says too little.
NGRAM_SIZES = (4, 3, 2)
# A stream starts as if this many of its drafts had been tried, half of them kept.
_PRIOR_DRAFTS = 4.0
# Acceptance is a decayed average: each verify call's counts weigh this much against the past.
_DECAY = 0.8
# A stream that falls back to plain decoding (its drafts are not kept often enough to pay) tries
# drafting again after this many tokens, so that a change of its text (a quote begins) is noticed.
PROBE_INTERVAL = 32
# A stream with nothing to draft is looked at again after this many tokens; in between, its decode
# calls are chained as plain decoding's are (a look needs the last call's tokens on the host).
LOOK_INTERVAL = 8
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


def propose_ngram(history: Sequence[int], n_drafts: int, sizes: Sequence[int] = NGRAM_SIZES) -> list[int]:
    """Prompt lookup: the tokens that followed an earlier occurrence of the longest suffix n-gram of
    history (prompt plus output), at most n_drafts of them; [] if no suffix recurs.

    The occurrence is the latest one followed by n_drafts tokens, else the earliest (the one
    followed by the most): in a loop, the latest would leave a single token to draft."""
    tokens = np.asarray(history, np.int64)
    for n in sizes:
        if n_drafts < 1 or len(tokens) <= n:
            continue
        # Every n-gram that ends before the last token, so at least one token follows it.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if len(starts):
            full = starts[starts + n + n_drafts <= len(tokens)]
            follows = (full[-1] if len(full) else starts[0]) + n
            return tokens[follows : follows + n_drafts].tolist()
    return []


@dataclass
class CostModel:
    """Seconds a compiled call takes on this engine: a plain decode step, and a verify call of each
    width, per batch bucket; averages of the calls timed so far."""

    decode_step: dict[int, float] = field(default_factory=dict)  # rows -> seconds per step
    verify_call: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, width) -> seconds
    # A model's draft call of width - 1 tokens and the verify call of its drafts: (rows, width) -> seconds.
    drafted_call: dict[tuple[int, int], float] = field(default_factory=dict)
    # Until such a call has been timed: what one draft token costs, in plain decode steps (about the
    # share of the target's layers the draft runs).
    assumed_draft_token: float = 1.0

    def record_decode(self, rows: int, seconds_per_step: float) -> None:
        self.decode_step[rows] = _average(self.decode_step.get(rows), seconds_per_step)

    def record_verify(self, rows: int, width: int, seconds: float, drafted_on_device: bool = False) -> None:
        calls = self.drafted_call if drafted_on_device else self.verify_call
        calls[rows, width] = _average(calls.get((rows, width)), seconds)

    def knows(self, rows: int) -> bool:
        """Whether a plain decode step at this batch has been timed: the baseline drafting must beat."""
        return rows in self.decode_step

    def relative_verify_cost(self, rows: int, width: int, drafted_on_device: bool = False) -> float:
        """A verify call of `width` tokens per row, after a model's draft call of its drafts if
        drafted_on_device, in plain decode steps at the same batch."""
        calls = self.drafted_call if drafted_on_device else self.verify_call
        step, call = self.decode_step.get(rows), calls.get((rows, width))
        if step is None or call is None:
            return _ASSUMED_VERIFY_COST[width] + drafted_on_device * (width - 1) * self.assumed_draft_token
        return call / step


@dataclass
class Speculation:
    """A speculating stream's proposer and its record of kept drafts."""

    proposer: str
    drafted: float = _PRIOR_DRAFTS
    kept: float = _PRIOR_DRAFTS / 2
    plain_tokens: int = 0  # tokens decoded plainly since the stream last drafted
    unlooked: int = 0  # tokens decoded plainly since its drafts were last looked for
    drafting: bool = True  # whether it drafted when last looked at

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft is kept, given that the ones before it were."""
        return self.kept / self.drafted

    def record(self, n_drafted: int, n_kept: int) -> None:
        """Count a verify call's drafts; n_kept of them were kept."""
        if n_drafted:
            self.drafted = _DECAY * self.drafted + n_drafted
            self.kept = _DECAY * self.kept + n_kept
            self.plain_tokens = 0

    def record_plain(self, n_tokens: int) -> None:
        self.plain_tokens += n_tokens
        self.unlooked += n_tokens

    def looked(self, drafting: bool) -> None:
        """Note that its drafts were looked for, and whether it drafted."""
        self.drafting, self.unlooked = drafting, 0

    def due(self) -> bool:
        """Whether to look for its drafts after the coming decode call (else that call may be chained)."""
        return self.drafting or self.unlooked >= LOOK_INTERVAL

    def n_drafts(self, costs: CostModel, rows: int, limit: int) -> int:
        """How many tokens to draft now (0: decode plainly), at most limit."""
        alpha = min(self.acceptance, 0.999)
        best_rate, best = 1.0, 0  # plain decoding: one token per decode step
        for width in VERIFY_WIDTHS:
            k = min(width - 1, limit)
            # Each draft is kept with chance alpha once the ones before it are: 1 + a + ... + a^k tokens.
            expected = (1 - alpha ** (k + 1)) / (1 - alpha)
            rate = expected / costs.relative_verify_cost(rows, width, self.proposer in MODEL_PROPOSERS)
            if k >= 1 and rate > best_rate:
                best_rate, best = rate, k
        if best == 0 and limit >= 1 and self.plain_tokens >= PROBE_INTERVAL:
            return min(VERIFY_WIDTHS[0] - 1, limit)
        return best


def draft(speculation: Speculation, history: Sequence[int], n_drafts: int) -> list[int]:
    """A host proposer's drafts to follow history, at most n_drafts (a model drafts on the device)."""
    if speculation.proposer == "ngram":
        return propose_ngram(history, n_drafts)
    raise ValueError(f"unknown proposer {speculation.proposer!r}")


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - _TIMING_WEIGHT) * previous + _TIMING_WEIGHT * value
