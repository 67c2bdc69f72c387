"""The engine loop: one thread owns the engine and the device; other threads only submit and read.

A request waits in a bounded queue until a slot is free, is prefilled into it between two
decode steps, and leaves when it finishes or is cancelled, freeing its slot before the next
step. A failure is delivered to the request it belongs to; the loop and the other requests go on.
"""

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from rz.engine import Admission, Engine, Generation, GenerationRequest, StepEvent
from rz.errors import RequestError, RzError
from rz.sampling import SamplingParams

log = logging.getLogger("rz.server")

# Why a request was cancelled before it finished.
CLIENT_CANCELLED = "cancelled"  # the client cancelled or went away
DEADLINE_EXCEEDED = "deadline_exceeded"  # the call's deadline passed
SHUTDOWN = "shutdown"  # the server is stopping and the grace period is over
PREFILL_BUDGET_S = 0.05  # prefill time between two decode steps while sequences are running (see _run)


class OverCapacityError(RzError):
    """Every slot is busy and the queue is full: retry later, or start the server with a larger --max-queue."""


class ShuttingDownError(RzError):
    """The server is shutting down and takes no more requests."""


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
    sequence: Generation | None = None  # set once admitted into a slot
    cancel_reason: str | None = None
    done: bool = False  # a final item has been delivered


class EngineLoop:
    """Continuous batching over an Engine's slots, run by one thread."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._changed = threading.Condition()
        self._live: set[Ticket] = set()  # submitted, not yet given a final item
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: dict[int, Ticket] = {}  # by slot
        self._admission: tuple[Ticket, Admission] | None = None  # the request being prefilled, if any
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
            if len(self._live) >= self.engine.n_slots + self.max_queue:
                raise OverCapacityError(
                    f"the server is full: {self.engine.n_slots} requests generating and {self.max_queue} queued; "
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
            running = list(self._running.values())
            queued = len(self._waiting) + (self._admission is not None)  # being prefilled: still waiting
        used = sum(len(t.request.prompt_ids) + len(t.sequence.output_ids) for t in running)
        return len(running), queued, used / (self.engine.n_slots * self.engine.n_ctx)

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
                while not self._waiting and not self._running and self._admission is None and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
            self._free_cancelled()  # cancelled during the last step: their slots go to waiting requests now
            # Prompt chunks between two decode steps stop once they have taken PREFILL_BUDGET_S
            # while other sequences wait for their next tokens. A 128-token prompt takes ~0.3 s
            # here: admitting every waiting request at once stalled the running streams for
            # seconds (inter-token p99 2.1 s with 8 clients), and so did one long prompt admitted
            # whole (a 512-token chunk is ~1.5 s; a 4,096-token prompt, eight of them).
            started = time.perf_counter()
            while self._admission is not None or self._begin_next():
                self._prefill_next_chunk()
                if self._running and time.perf_counter() - started >= PREFILL_BUDGET_S:
                    break
            self._free_cancelled()  # cancelled during those prefills
            if self._running:
                self._step()

    def _begin_next(self) -> bool:
        """Start admitting the next waiting request that has a free slot; False if none is left."""
        while True:
            with self._changed:
                if not self._waiting or not self.engine.free_slots():
                    return False
                ticket = self._waiting.popleft()
            if ticket.cancel_reason is not None:  # cancelled on its way out of the queue
                self._finish(ticket, _cancelled_item(ticket, None))
                continue
            try:
                admission = self.engine.begin_admission(ticket.request, queued_at=ticket.queued_at)
            except Exception as error:  # noqa: BLE001 - one request's failure must not stop the loop
                self._finish(ticket, _admission_error(error))
                continue
            self._admission = (ticket, admission)
            return True

    def _prefill_next_chunk(self) -> None:
        """Run the admission in progress one prompt chunk further; once prefilled, into its slot."""
        ticket, admission = self._admission
        if ticket.cancel_reason is not None:  # it holds no slot yet: dropping it frees everything
            self._admission = None
            self._finish(ticket, _cancelled_item(ticket, None))
            return
        try:
            self.engine.prefill_chunk(admission)
            if not admission.prefilled:
                # Wait for the chunk: dispatch returns at once, and the budget is of device time
                # (measured without this: three 512-token chunks launched back to back, a 7.4 s
                # stall of the running streams, as if the prompt had been admitted whole).
                admission.wait()
                return
            self._admission = None
            event = self.engine.complete_admission(admission)
        except Exception as error:  # noqa: BLE001 - one request's failure must not stop the loop
            self._admission = None
            self._free_orphan(ticket)
            self._finish(ticket, _admission_error(error))
            return
        ticket.sequence = event.sequence
        if event.finish_reason is not None:
            self._finish(ticket, event)
            return
        with self._changed:
            self._running[event.sequence.slot] = ticket
        ticket.events.put(event)

    def _free_orphan(self, ticket: Ticket) -> None:
        """Free a slot that a failed admission left occupied."""
        for sequence in self.engine.active():
            if sequence.request is ticket.request:
                self.engine.cancel(sequence, "error")

    def _free_cancelled(self) -> None:
        for slot, ticket in list(self._running.items()):
            if ticket.cancel_reason is None:
                continue
            self.engine.cancel(ticket.sequence, "cancelled")
            with self._changed:
                del self._running[slot]
            self._finish(ticket, _cancelled_item(ticket, ticket.sequence))

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as error:  # noqa: BLE001 - fail the requests of this step, keep serving
            log.exception("a decode step failed; failing the %d requests in it", len(self._running))
            with self._changed:
                failed = list(self._running.values())
                self._running.clear()
            for ticket in failed:
                self.engine.cancel(ticket.sequence, "error")
                self._finish(ticket, EngineFailure(f"decode step failed: {error}"))
            return
        for event in events:
            ticket = self._running[event.sequence.slot]
            if event.finish_reason is None:
                ticket.events.put(event)
                continue
            with self._changed:
                del self._running[event.sequence.slot]
            self._finish(ticket, event)

    def _finish(self, ticket: Ticket, item) -> None:
        """Deliver a ticket's final item; None when its caller is gone and was told already."""
        with self._changed:
            ticket.done = True
            self._live.discard(ticket)
            self._changed.notify_all()
        if item is not None:
            ticket.events.put(item)



def _admission_error(error: Exception) -> RzError:
    """What a request is told when its admission raised (called from the except block): a bad
    request is its own fault; anything else is the engine's, and logged."""
    if isinstance(error, RequestError):
        return error
    log.exception("prefill failed")
    return EngineFailure(f"prefill failed: {error}")


def _cancelled_item(ticket: Ticket, sequence: Generation | None):
    """The final item of a cancelled ticket: only a shutdown has a caller still listening."""
    if ticket.cancel_reason != SHUTDOWN:
        return None
    if sequence is None:
        return ShuttingDownError("the server shut down before the request got a slot")
    return StepEvent(sequence, None, "", "cancelled")


def warm_up(engine: Engine) -> None:
    """Compile every step before serving, so that no request waits for a compilation: the prefill
    (a chunk, the first token, the insertion) of each context bucket, and the decode step of each
    batch bucket with and without top log-probabilities.

    Each bucket is compiled with a one-token prompt in a cache of that bucket: running a prompt of
    the bucket's length instead took 40 of the 66 s a SmolLM2 server with 4,096 positions spent
    warming up, all in prefill of prompts nobody asked for.
    """
    greedy = SamplingParams(temperature=0.0)
    for context in engine.buckets.context:
        request = GenerationRequest(prompt_ids=(0,), max_tokens=2, params=greedy, ignore_eos=True)
        _run_together(engine, [request], context=context)
    for params in (greedy, SamplingParams(temperature=0.0, n_logprobs=1)):
        for rows in engine.batch_sizes:
            request = GenerationRequest(prompt_ids=(0,), max_tokens=2, params=params, ignore_eos=True)
            _run_together(engine, [request] * rows)


def _run_together(engine: Engine, requests: list[GenerationRequest], context: int | None = None) -> None:
    """Admit the requests into free slots (prefilled in the context bucket asked for, if any) and
    step them until each has finished."""
    running = set()
    for request in requests:
        event = engine.admit(request, context=context)
        if event.finish_reason is None:
            running.add(id(event.sequence))
    while running:
        for event in engine.step():
            if event.finish_reason is not None:
                running.discard(id(event.sequence))
