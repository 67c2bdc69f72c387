"""A request's way through the engine: what it asks for, its state while it runs, and the text
pipeline that turns its sampled tokens into output (detokenizing, stop strings, log-probabilities,
the finish reason)."""

import time
from dataclasses import dataclass, field

from rz.constraints import ConstraintMatcher
from rz.errors import RequestError
from rz.request import FinishReason, RequestOptions
from rz.sampling import SampledTokens
from rz.speculative import Speculation
from rz.stopping import StopStringMatcher
from rz.tokenizer import IncrementalDecoder


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: validated on the host before any compute."""

    prompt_ids: tuple[int, ...]
    options: RequestOptions = RequestOptions()


@dataclass
class Timings:
    """Seconds spent on one request, measured on the host."""

    queued_at: float = 0.0
    started_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0

    def as_dict(self) -> dict:
        prefill = self.first_token_at - self.started_at
        decode = self.finished_at - self.first_token_at
        return {
            "queue_seconds": self.started_at - self.queued_at,
            "prefill_seconds": prefill,
            "time_to_first_token_seconds": self.first_token_at - self.queued_at,
            "decode_seconds": decode,
            "total_seconds": self.finished_at - self.queued_at,
        }


@dataclass(eq=False)
class Generation:
    """A request being served: its slot, its tokens so far, and its text pipeline."""

    request: GenerationRequest
    decoder: IncrementalDecoder
    matcher: StopStringMatcher
    timings: Timings
    slot: int = -1
    n_cached: int = 0  # prompt tokens whose KV a slot already held: not prefilled again
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Where the output stands in the request's constraint (structured output); None: free text.
    constraint: ConstraintMatcher | None = None
    # Set from any thread to end the request: the scheduler frees it at its next step.
    stop_requested: bool = False
    speculation: Speculation | None = None  # its proposer and record of kept drafts, if it speculates

    @property
    def position(self) -> int:
        """The position of the next token fed to the model."""
        return len(self.request.prompt_ids) + len(self.output_ids) - 1

    def finish(self, reason: FinishReason) -> None:
        """Mark the request finished (once: a later reason does not replace the first)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.timings.finished_at = time.perf_counter()


@dataclass(frozen=True)
class StepEvent:
    """What one step produced for one request: new text (possibly empty), a token, maybe the end.

    A request that failed ends with FinishReason.ERROR and the exception in `error`.
    """

    sequence: Generation
    token_id: int | None
    text: str
    finish_reason: FinishReason | None
    error: Exception | None = None


def accept(sequence: Generation, sampled: SampledTokens, row: int, eog_ids: frozenset[int]) -> StepEvent:
    """Take row `row` of a step's sampled tokens (on the host) as the sequence's next token: its
    text through the detokenizer and the stop strings, its log-probabilities, and whether it ends
    the generation (an end-of-generation or stop token, a stop string, max_tokens, or a
    constraint that is complete)."""
    token = int(sampled.tokens[row])
    options = sequence.request.options
    sequence.output_ids.append(token)
    if options.sampling.n_logprobs:
        n = options.sampling.n_logprobs
        sequence.logprobs.append(
            {
                "token": token,
                "logprob": float(sampled.logprobs[row]),
                "top": list(zip(map(int, sampled.top_ids[row][:n]), map(float, sampled.top_logprobs[row][:n]))),
            }
        )
    finish = None
    ends_generation = token in options.stop_token_ids or (not options.ignore_eos and token in eog_ids)
    complete = False
    if sequence.constraint is not None and not ends_generation:
        try:
            sequence.constraint.advance(token)
        except RequestError as error:
            sequence.finish(FinishReason.ERROR)
            return StepEvent(sequence, token, "", FinishReason.ERROR, error=error)
        complete = sequence.constraint.finished
    if ends_generation:
        text, finish = sequence.decoder.flush(), FinishReason.STOP
        text, _ = sequence.matcher.feed(text)
        text += sequence.matcher.flush()
    else:
        text, stopped = sequence.matcher.feed(sequence.decoder.add(token))
        if stopped:
            finish = FinishReason.STOP
        elif complete or len(sequence.output_ids) >= options.max_tokens:
            finish = FinishReason.STOP if complete else FinishReason.LENGTH
            tail, _ = sequence.matcher.feed(sequence.decoder.flush())
            text += tail + sequence.matcher.flush()
    sequence.text.append(text)
    if finish is not None:
        sequence.finish(finish)
    return StepEvent(sequence, token, text, finish)
