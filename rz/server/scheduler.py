"""The engine loop: one thread owns the engines and the devices; other threads only submit and read.

A request waits in a bounded queue until a slot is free, is handed to the host scheduler
(rz.scheduler), whose steps prefill it into the slot between decode calls, and leaves when it
finishes or is cancelled. With data parallelism the loop drives several engine replicas, each on
its own devices with a scheduler of its own: a request goes to the replica with the most free
slots, and one pass of the loop steps every replica that has work (a step returns once its call is
launched and the previous one read back, so the replicas' devices run side by side). This loop keeps only threads, queues, cancellation and deadlines: a
failure is delivered to the request it belongs to; the loop and the other requests go on.
"""

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from rz.constraints import Constraint
from rz.engine import Engine
from rz.errors import RequestError, RzError, ShuttingDownError
from rz.generation import Generation, GenerationRequest, StepEvent
from rz.request import FinishReason, RequestOptions, SamplingParams
from rz.scheduler import Scheduler

log = logging.getLogger("rz.server")

# Why a request was cancelled before it finished.
CLIENT_CANCELLED = "cancelled"  # the client cancelled or went away
DEADLINE_EXCEEDED = "deadline_exceeded"  # the call's deadline passed
SHUTDOWN = "shutdown"  # the server is stopping and the grace period is over
# Prefill time between two decode calls while sequences are running. Admitting every waiting
# request at once stalls the running streams for as long as their prompts take (seconds, with
# several clients), and so does one long prompt admitted whole.
PREFILL_BUDGET_S = 0.05


class OverCapacityError(RzError):
    """Every slot is busy and the queue is full: retry later, or start the server with a larger --max-queue."""


class EngineFailure(RzError):
    """The engine failed while serving a request; not the request's fault."""


@dataclass(frozen=True)
class Cancelled:
    """The last item of a ticket whose caller is gone: nobody reads further."""

    reason: str


@dataclass(eq=False)
class Ticket:
    """One request's way through the loop; its caller reads `events` until a final item.

    An item is a StepEvent (final when it has a finish_reason), an RzError (final), or Cancelled (final).
    """

    request: GenerationRequest
    queued_at: float
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generation: Generation | None = None  # set once handed to the scheduler
    cancel_reason: str | None = None
    done: bool = False  # a final item has been delivered

    @property
    def sequence(self) -> Generation | None:
        """The request's sequence once it has been admitted into a slot (its first token out)."""
        return self.generation if self.generation is not None and self.generation.output_ids else None


class EngineLoop:
    """Continuous batching over an engine (and its replicas), run by one thread that drives the host schedulers."""

    def __init__(self, engine: Engine, max_queue: int, replicas: Sequence[Engine] = ()):
        self.engine = engine  # validates requests; the replicas run the same model
        self.engines = (engine, *replicas)
        self.n_slots = sum(each.n_slots for each in self.engines)
        self.max_queue = max_queue
        self.schedulers = tuple(Scheduler(each, prefill_budget_s=PREFILL_BUDGET_S) for each in self.engines)
        self.scheduler = self.schedulers[0]
        self._changed = threading.Condition()
        self._live: set[Ticket] = set()  # submitted, not yet given a final item
        self._waiting: collections.deque[Ticket] = collections.deque()  # not yet handed to the scheduler
        self._handed: dict[Generation, Ticket] = {}  # handed to the scheduler, not yet finished
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rz-engine-loop", daemon=True)

    # ----- called from any thread -----

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Ticket:
        """Queue a validated request, or refuse it at once when the queue is full."""
        with self._changed:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down; send the request to another server")
            if len(self._live) >= self.n_slots + self.max_queue:
                raise OverCapacityError(
                    f"the server is full: {self.n_slots} requests generating and {self.max_queue} queued; "
                    "retry later"
                )
            ticket = Ticket(request, queued_at=time.perf_counter())
            self._live.add(ticket)
            self._waiting.append(ticket)
            self._changed.notify_all()
        return ticket

    def cancel(self, ticket: Ticket, reason: str) -> None:
        """Cancel a ticket: a queued one leaves the queue now, a running one frees its slot before the next step."""
        with self._changed:
            if ticket.done or ticket.cancel_reason is not None:
                return
            ticket.cancel_reason = reason
            queued = ticket in self._waiting
            if queued:
                self._waiting.remove(ticket)
            elif ticket.generation is not None:
                ticket.generation.stop_requested = True
            self._changed.notify_all()
        if reason != SHUTDOWN:
            ticket.events.put(Cancelled(reason))  # wake the caller now; a slot is freed by the loop
        if queued:
            self._finish(ticket, _cancelled_item(ticket, None))

    def stop_accepting(self) -> None:
        with self._changed:
            self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Wait until every request has finished; False if some still run after timeout seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._live, timeout)

    def cancel_all(self) -> None:
        """End every request: a queued one with ShuttingDownError, a running one with finish reason "cancelled"."""
        with self._changed:
            live = list(self._live)
        for ticket in live:
            self.cancel(ticket, SHUTDOWN)

    def load(self) -> tuple[int, int, float]:
        """(requests generating, requests queued, fraction of the KV cache's positions they hold) now."""
        with self._changed:
            handed = list(self._handed.values())
            waiting = len(self._waiting)
        running = [ticket.sequence for ticket in handed if ticket.sequence is not None]
        used = sum(len(sequence.request.prompt_ids) + len(sequence.output_ids) for sequence in running)
        return len(running), waiting + len(handed) - len(running), used / (self.n_slots * self.engine.n_ctx)

    def stop(self) -> None:
        """Stop the loop thread and wait for it."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # ----- the loop thread -----

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not any(s.has_work() for s in self.schedulers) and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
            # Cancelled during the last step: their slots go to waiting requests now.
            for scheduler in self.schedulers:
                for event in scheduler.free_stopped():
                    self._deliver(event)
            with self._changed:
                refused = self._hand_over()
            for ticket, error in refused:
                self._finish(ticket, _failure(ticket, error))
            for scheduler in self.schedulers:
                for event in scheduler.step():
                    self._deliver(event)

    def _hand_over(self) -> list[tuple[Ticket, Exception]]:
        """Move queued tickets into the schedulers while slots are free for them, each to the
        replica with the most (the lock held); the tickets refused, with why."""
        refused = []
        while self._waiting:
            scheduler = max(self.schedulers, key=_room)
            if _room(scheduler) <= 0:
                break
            ticket = self._waiting.popleft()
            try:
                ticket.generation = scheduler.add(ticket.request, queued_at=ticket.queued_at)
            except Exception as error:  # noqa: BLE001 - one request's failure must not stop the loop
                refused.append((ticket, error))
                continue
            self._handed[ticket.generation] = ticket
        return refused

    def _deliver(self, event: StepEvent) -> None:
        ticket = self._handed[event.sequence]
        if event.finish_reason is None:
            ticket.events.put(event)
            return
        with self._changed:
            del self._handed[event.sequence]
        if event.error is not None:
            self._finish(ticket, _failure(ticket, event.error))
        elif event.finish_reason == FinishReason.CANCELLED:
            self._finish(ticket, _cancelled_item(ticket, ticket.sequence))
        else:
            self._finish(ticket, event)

    def _finish(self, ticket: Ticket, item) -> None:
        """Deliver a ticket's final item; None when its caller is gone and was told already."""
        with self._changed:
            ticket.done = True
            self._live.discard(ticket)
            self._changed.notify_all()
        if item is not None:
            ticket.events.put(item)


def _room(scheduler: Scheduler) -> int:
    """Slots of a scheduler's engine free for requests not yet handed to it."""
    return scheduler.engine.free_slots() - scheduler.n_pending


def _failure(ticket: Ticket, error: Exception) -> RzError:
    """What a request is told when serving it failed: a bad request is its own fault; anything
    else is the engine's, and logged."""
    if isinstance(error, RequestError):
        return error
    stage = "decode step" if ticket.sequence is not None else "prefill"
    log.error("%s failed", stage, exc_info=error)
    return EngineFailure(f"{stage} failed: {error}")


def _cancelled_item(ticket: Ticket, sequence: Generation | None):
    """The final item of a cancelled ticket: only a shutdown has a caller still listening."""
    if ticket.cancel_reason != SHUTDOWN:
        return None
    if sequence is None:
        return ShuttingDownError("the server shut down before the request got a slot")
    return StepEvent(sequence, None, "", FinishReason.CANCELLED)


# Any constraint compiles the masked steps; this one lets a warm-up request run its two tokens.
_ANY_LETTERS = Constraint("regex", "[a-z]{1,64}")


def warm_up(engine: Engine) -> None:
    """Compile every step before serving, so that no request waits for a compilation: the prefill
    (a chunk, the first token, the insertion) of each context bucket, with and without a reused
    prefix, and the decode step of each
    batch bucket with and without top log-probabilities, and with a token mask (structured output:
    its first constrained request would otherwise also build the vocabulary llguidance compiles against).

    Each bucket is compiled with a one-token prompt in a cache of that bucket (the scheduler's
    `context`), not with a prompt of the bucket's length: that would spend most of the warm-up
    prefilling prompts nobody asked for.
    """
    greedy = SamplingParams(temperature=0.0)
    scheduler = Scheduler(engine)
    request = GenerationRequest(prompt_ids=(0,), options=RequestOptions(max_tokens=2, sampling=greedy, ignore_eos=True))
    # The second prompt starts with the first, whose KV its slot still holds: the reuse path
    # (the row's copy and a tail chunk) of the same bucket.
    extended = GenerationRequest(prompt_ids=(0, 0), options=request.options)
    for context in engine.buckets.context:
        for prompt in (request, extended):
            scheduler.add(prompt, context=context)
            collections.deque(scheduler.drain(), maxlen=0)
    for params in (greedy, SamplingParams(temperature=0.0, n_logprobs=1)):
        for rows in engine.batch_sizes:
            request = GenerationRequest(prompt_ids=(0,), options=RequestOptions(max_tokens=2, sampling=params, ignore_eos=True))
            for _ in range(rows):
                scheduler.add(request)
            collections.deque(scheduler.drain(), maxlen=0)
    constrained = RequestOptions(max_tokens=2, sampling=greedy, ignore_eos=True, constraint=_ANY_LETTERS)
    for rows in engine.batch_sizes:
        for _ in range(rows):
            scheduler.add(GenerationRequest(prompt_ids=(0,), options=constrained))
        collections.deque(scheduler.drain(), maxlen=0)
