"""What a generation request asks for and what it gets back: the types every front shares.

rz.LLM's keyword arguments, the command line's flags and defaults, the gRPC service's
GenerationOptions and rz.client all derive from RequestOptions, and every front validates a
request through RequestOptions.validate, so each gives the same messages. This module imports no
JAX: the client uses it too.
"""

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rz.constraints import Constraint, constraint_of, response_format_of
from rz.errors import RequestError
from rz.speculative import validate_proposer
from rz.stopping import validate_stops

# How many recent tokens the device keeps per row for the penalties: the largest penalty_last_n
# a request may ask for. llama.cpp's -1 ("the whole context") is not offered.
MAX_PENALTY_LAST_N = 256
# OpenAI's limit on top_logprobs; it also bounds the static width of the top-logprob outputs.
MAX_N_LOGPROBS = 20
# OpenAI's limits on logit_bias: at most this many tokens (also the fixed width of each row's biases
# on the device, rz.sampling.SamplingTensors), each biased by at most this much either way.
MAX_LOGIT_BIAS = 300
MAX_ABS_LOGIT_BIAS = 100.0
_SEED_LIMIT = 2**32  # llama.cpp seeds are uint32
# The settings become f32 and i32 on the device: a larger value would turn into inf or wrap.
_F32_MAX = float(np.finfo(np.float32).max)
_I32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (rz.sampling's chain); the defaults are llama.cpp's."""

    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64  # 0: no penalties
    seed: int | None = None  # None: a fresh random seed, as llama.cpp's default seed
    n_logprobs: int = 0  # how many top log-probabilities to return per token
    # (token id, bias) pairs, by id (logit_bias_of builds them): added to the logits before the chain;
    # a bias of -inf bans the token.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def validate(self) -> None:
        """Raise RequestError naming the first setting that is malformed or out of range."""
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
            if abs(value) > _F32_MAX:
                raise RequestError(f"{name} must be within float32's range (magnitude <= {_F32_MAX:.7g}), got {value!r}")
        integers = ("top_k", "penalty_last_n", "n_logprobs") + (() if self.seed is None else ("seed",))
        for name in integers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise RequestError(f"{name} must be an integer, got {value!r}")
        checks = (
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", 0 <= self.top_k <= _I32_MAX, f"must be in [0, {_I32_MAX}] (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1] (0 = off)"),
            ("repeat_penalty", self.repeat_penalty > 0, "must be > 0 (1 = off)"),
            ("penalty_last_n", 0 <= self.penalty_last_n <= MAX_PENALTY_LAST_N, f"must be in [0, {MAX_PENALTY_LAST_N}]"),
            ("seed", self.seed is None or 0 <= self.seed < _SEED_LIMIT, "must be in [0, 2**32), or None for random"),
            ("n_logprobs", 0 <= self.n_logprobs <= MAX_N_LOGPROBS, f"must be in [0, {MAX_N_LOGPROBS}]"),
        )
        for name, in_range, expectation in checks:
            if not in_range:
                raise RequestError(f"{name} {expectation}, got {getattr(self, name)!r}")
        _check_logit_bias(self.logit_bias)


@dataclass(frozen=True)
class RequestOptions:
    """Everything a generation request asks for besides its prompt: limits, sampling, stopping, logprobs,
    and the structured output it must match.

    The fronts use flat names (FLAT_OPTIONS): this type's own fields, SamplingParams' fields,
    `logprobs` for SamplingParams.n_logprobs, as in llama-cpp-python and the gRPC API, and
    `response_format` (OpenAI's) and `grammar` (llama.cpp's GBNF) for `constraint`.
    """

    max_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()  # stop strings, never part of the returned text
    stop_token_ids: frozenset[int] = frozenset()  # tokens that end the generation, besides end-of-generation
    ignore_eos: bool = False  # keep going past end-of-generation tokens
    # Map the full blocks of the KV cache that hold the longest prefix of the prompt, a finished or
    # a running sequence's (rz.kv_blocks; llama.cpp's server option of the same name), and
    # prefill only the rest; False prefills the whole prompt.
    cache_prompt: bool = True
    # Draft tokens with this proposer (rz.speculative.PROPOSERS) and verify them in one step;
    # "off" decodes one token per step; None takes the engine's default (rz serve --speculative;
    # off in rz.LLM). The output is the same either way (rz.speculative).
    speculative: str | None = None
    constraint: Constraint | None = None  # what the output must match (rz.constraints); None: free text

    @classmethod
    def from_flat(cls, **options: Any) -> "RequestOptions":
        """Options from flat names; a name that is not an option raises RequestError. Not yet validated."""
        unknown = set(options) - set(FLAT_OPTIONS)
        if unknown:
            raise RequestError(f"unknown generation options: {', '.join(sorted(unknown))}")
        constraint = constraint_of(options.pop("response_format", None), options.pop("grammar", None))
        sampling = {_SAMPLING_NAMES.get(name, name): value for name, value in options.items() if name not in _OWN}
        own = {name: value for name, value in options.items() if name in _OWN}
        if "stop" in own:
            own["stop"] = validate_stops(own["stop"])
        if "logit_bias" in sampling:
            sampling["logit_bias"] = logit_bias_of(sampling["logit_bias"])
        if "stop_token_ids" in own:
            own["stop_token_ids"] = frozenset(_token_ids(own["stop_token_ids"], "stop_token_ids"))
        for flag in ("ignore_eos", "cache_prompt"):
            if flag in own:
                own[flag] = bool(own[flag])
        return cls(sampling=SamplingParams(**sampling), constraint=constraint, **own)

    def flat(self) -> dict[str, Any]:
        """The options by their flat names (the inverse of from_flat)."""
        own = {name: getattr(self, name) for name in _OWN}
        sampling = {_FLAT_NAMES.get(f.name, f.name): getattr(self.sampling, f.name) for f in dataclasses.fields(SamplingParams)}
        response_format, grammar = response_format_of(self.constraint)
        return own | sampling | {"response_format": response_format, "grammar": grammar}

    def validate(self) -> None:
        """Raise RequestError naming the first option that is malformed or out of range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.sampling.validate()
        validate_stops(self.stop)
        _token_ids(self.stop_token_ids, "stop_token_ids")
        validate_proposer(self.speculative)


class FinishReason(str, enum.Enum):
    """Why a generation ended; equal to its value, so it reads and serializes as that string."""

    STOP = "stop"  # an end-of-generation token, a stop string or a stop token
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the caller cancelled, or the server shut down
    ERROR = "error"  # the engine failed while serving it

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Completion:
    """One generated continuation (rz.LLM.generate and rz.client.Client.generate)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: dict  # prompt_tokens, completion_tokens, total_tokens, cached_tokens (prompt tokens not prefilled again)
    timings: dict  # seconds: queue, prefill, time to first token, decode, total
    logprobs: list[dict] | None = None  # per token: token, logprob, top [(id, logprob)]
    tool_calls: list[dict] | None = None  # a chat with tools over rz.client: OpenAI's tool_calls entries


def check_token_ids(ids: Sequence[int], n_vocab: int, what: str = "token ids") -> None:
    """Raise RequestError if a token id is outside a vocabulary of n_vocab tokens."""
    bad = [i for i in ids if not 0 <= i < n_vocab]
    if bad:
        raise RequestError(f"{what} {bad[:5]} are outside the vocabulary (0..{n_vocab - 1})")


def logit_bias_of(value) -> tuple[tuple[int, float], ...]:
    """A logit_bias option as SamplingParams holds it: (token id, bias) pairs sorted by id.

    Takes OpenAI's map {token id, or its decimal string as JSON keys are: bias}, or llama-server's
    list of [token id, bias] pairs; None means none. A bias of False bans the token (-inf), as in
    llama-server. Range checks are SamplingParams.validate's; the vocabulary's are the engine's.
    """
    if value is None:
        return ()
    if isinstance(value, dict):
        entries = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in value):
        entries = [tuple(e) for e in value]
    else:
        raise RequestError(
            "logit_bias must map token ids to biases ({\"15043\": -100}) or list [token id, bias] pairs, "
            f"got {value!r:.100}"
        )
    if len(entries) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens, got {len(entries)}")
    pairs = {}
    for token, bias in entries:
        if isinstance(token, str) and token.strip().lstrip("-").isdecimal():
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise RequestError(f"logit_bias keys must be token ids (integers), got {token!r:.50}")
        if bias is False:
            bias = -math.inf
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating, np.integer)):
            raise RequestError(f"logit_bias of token {token} must be a number (or false, a ban), got {bias!r:.50}")
        if int(token) in pairs:
            raise RequestError(f"logit_bias gives token {token} twice")
        pairs[int(token)] = float(bias)
    return tuple(sorted(pairs.items()))


def _check_logit_bias(pairs) -> None:
    if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise RequestError(f"logit_bias must be (token id, bias) pairs; rz.request.logit_bias_of builds them from a dict, got {pairs!r:.100}")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}")
    for token, bias in pairs:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token <= _I32_MAX:
            raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {token!r:.50}")
        number = isinstance(bias, (int, float, np.integer, np.floating)) and not isinstance(bias, bool)
        if not (number and (abs(bias) <= MAX_ABS_LOGIT_BIAS or bias == -math.inf)):
            raise RequestError(
                f"logit_bias of token {token} must be in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}] "
                f"(or -inf / false, a ban), got {bias!r}"
            )


def _token_ids(ids, name: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, set, frozenset, np.ndarray)):
        raise RequestError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise RequestError(f"{name} must hold integer token ids, got {token!r}")
    return [int(token) for token in ids]


_OWN = tuple(f.name for f in dataclasses.fields(RequestOptions) if f.name not in ("sampling", "constraint"))
_SAMPLING_NAMES = {"logprobs": "n_logprobs"}  # flat name -> SamplingParams field
_FLAT_NAMES = {field: flat for flat, field in _SAMPLING_NAMES.items()}
# Every option by its flat name, with its default.
FLAT_OPTIONS: dict[str, Any] = RequestOptions().flat()
