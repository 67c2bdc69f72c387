"""The host scheduler: which requests run on an engine, and when; step() is the one generation loop.

Each step() first frees the requests asked to stop, then either admits waiting requests
(prefilling their prompts chunk by chunk into free slots, up to a time budget while other
sequences wait for tokens; in order of arrival, the first waiting while the KV cache cannot
promise it its blocks) or runs one decode call for every sequence in a slot, never both, so
a prompt's first token is out before the decode calls that follow it; then it turns the sampled
tokens into events (rz.generation.accept). rz.LLM's generate, stream and chat, the server's
warm-up and the server's engine loop all drive this one step (nano-vllm's LLMEngine.step is the
shape: schedule, run, post-process).
"""

import collections
import time
from typing import Iterator

from rz.engine import Admission, Engine, SampledRow
from rz.generation import Generation, GenerationRequest, StepEvent, accept
from rz.request import FinishReason


class Scheduler:
    """Requests waiting for a slot, the one being prefilled, and the step that moves them all on.

    prefill_budget_s: None admits every waiting request that has a slot before the next decode
    call (a batch); a number stops admitting once prompt chunks have taken that long while other
    sequences wait for their next tokens (a server), waiting for each chunk to run so that the
    budget is of device time.
    """

    def __init__(self, engine: Engine, prefill_budget_s: float | None = None):
        self.engine = engine
        self.prefill_budget_s = prefill_budget_s
        self._waiting: collections.deque[tuple[Generation, int | None]] = collections.deque()
        self._admission: Admission | None = None
        self._prefilled_last = False  # the last step admitted: the next one decodes, if any sequence runs

    def add(self, request: GenerationRequest, queued_at: float | None = None, context: int | None = None) -> Generation:
        """Queue a request (validated now); `context`: see Engine.begin_admission."""
        sequence = self.engine.new_sequence(request, queued_at)
        self._waiting.append((sequence, context))
        return sequence

    def cancel(self, sequence: Generation, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End a sequence now, wherever it is: queued, being prefilled, or in a slot."""
        sequence.finish(reason)
        self._waiting = collections.deque(entry for entry in self._waiting if entry[0] is not sequence)
        if self._admission is not None and self._admission.sequence is sequence:
            self._admission = None
        self.engine.release(sequence)

    @property
    def n_pending(self) -> int:
        """Requests added that do not hold a slot yet."""
        return len(self._waiting) + (self._admission is not None)

    def has_work(self) -> bool:
        return bool(self._waiting) or self._admission is not None or bool(self.engine.active())

    def step(self) -> list[StepEvent]:
        """Schedule, run one compiled call (or a budget of prompt chunks), post-process: the events."""
        events = self.free_stopped()
        can_admit = self._admission is not None or (self._waiting and self.engine.free_slots())
        if can_admit and not (self._prefilled_last and self.engine.active()):
            events += self._admit()
            if self._prefilled_last:
                return events
        self._prefilled_last = False
        if self.engine.active():
            events += self._decode()
        return events

    def free_stopped(self) -> list[StepEvent]:
        """End the sequences asked to stop (Generation.stop_requested) now: their events."""
        admitting = [self._admission.sequence] if self._admission is not None else []
        every = [sequence for sequence, _ in self._waiting] + admitting + self.engine.active()
        return [self._stop(sequence) for sequence in every if sequence.stop_requested and sequence.finish_reason is None]

    def drain(self) -> Iterator[StepEvent]:
        """Step until every request has finished, yielding the events; a failed request's error is raised."""
        while self.has_work():
            for event in self.step():
                if event.error is not None:
                    raise event.error
                yield event

    # ----- the two kinds of step -----

    def _admit(self) -> list[StepEvent]:
        """Prompt chunks, up to the budget; _prefilled_last says whether any ran."""
        events = []
        started = time.perf_counter()
        self._prefilled_last = False
        while self._admission is not None or self._begin_next(events):
            self._prefilled_last = True
            self._prefill_next_chunk(events)
            over_budget = self.prefill_budget_s is not None and time.perf_counter() - started >= self.prefill_budget_s
            if over_budget and self.engine.active():
                break
        return events

    def _begin_next(self, events: list[StepEvent]) -> bool:
        """Start admitting the next waiting request, if a slot is free and the KV cache can promise
        its blocks; False if none can start."""
        while self._waiting and self.engine.free_slots():
            sequence, context = self._waiting.popleft()
            if sequence.stop_requested:
                events.append(self._stop(sequence))
                continue
            try:
                self._admission = self.engine.begin_admission(sequence, context)
            except Exception as error:  # noqa: BLE001 - one request's failure must not stop the others
                events.append(self._fail(sequence, error))
                continue
            if self._admission is None:
                # First come, first served: the next ones wait behind it, until sequences leave.
                self._waiting.appendleft((sequence, context))
                return False
            return True
        return False

    def _prefill_next_chunk(self, events: list[StepEvent]) -> None:
        """Run the admission in progress one prompt chunk further; once prefilled, into its slot."""
        admission = self._admission
        sequence = admission.sequence
        if sequence.stop_requested:  # it holds no slot yet: dropping it frees everything
            self._admission = None
            events.append(self._stop(sequence))
            return
        try:
            self.engine.prefill_chunk(admission)
            if not admission.prefilled:
                if self.prefill_budget_s is not None:
                    # Dispatch returns at once, and the budget is of device time: without this
                    # wait every chunk would be launched at once, as if the prompt were admitted whole.
                    admission.wait()
                return
            self._admission = None
            events.append(self._accept(self.engine.complete_admission(admission)))
        except Exception as error:  # noqa: BLE001 - one request's failure must not stop the others
            self._admission = None
            events.append(self._fail(sequence, error))

    def _decode(self) -> list[StepEvent]:
        try:
            rows = self.engine.decode()
        except Exception as error:  # noqa: BLE001 - fail the requests of this call, keep the others going
            return [self._fail(sequence, error) for sequence in self.engine.active()]
        # A sequence that finished at one step of the call drops what the call produced for it after.
        return [self._accept(row) for row in rows if row[0].finish_reason is None]

    # ----- post-processing -----

    def _accept(self, row: SampledRow) -> StepEvent:
        event = accept(*row, self.engine.eog_ids)
        if event.finish_reason is not None:
            self.engine.release(event.sequence)
        return event

    def _stop(self, sequence: Generation) -> StepEvent:
        self.cancel(sequence, FinishReason.CANCELLED)
        return StepEvent(sequence, None, "", FinishReason.CANCELLED)

    def _fail(self, sequence: Generation, error: Exception) -> StepEvent:
        self.cancel(sequence, FinishReason.ERROR)
        return StepEvent(sequence, None, "", FinishReason.ERROR, error=error)
