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

from rz.engine import Engine
from rz.errors import RequestError, RzError, ShuttingDownError
from rz.generation import Generation, GenerationRequest, StepEvent
from rz.request import FinishReason
from rz.scheduler import Scheduler
from rz.warm_up import WarmUpUnit

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

    def __init__(
        self, engine: Engine, max_queue: int, warm_up: Sequence[WarmUpUnit] = (), replicas: Sequence[Engine] = ()
    ):
        """warm_up: units of rz.warm_up.warm_up_units the loop runs on the first engine while no request waits,
        one at a time, so a request waits for at most one unit. replicas: engines of the same model on other
        devices (data parallelism), each driven by a scheduler of its own."""
        self.engine = engine  # validates requests; the replicas run the same model
        self.engines = (engine, *replicas)
        self.n_slots = sum(each.n_slots for each in self.engines)
        self.max_queue = max_queue
        self._warm_up = collections.deque(warm_up)
        self.warm_up_started = time.perf_counter()
        self.warm_up_done = threading.Event()
        if not self._warm_up:
            self.warm_up_done.set()
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
        """(requests generating, requests queued, fraction of the KV cache's positions they hold) now
        (a shared prefix counts once per request: an upper bound)."""
        with self._changed:
            handed = list(self._handed.values())
            waiting = len(self._waiting)
        running = [ticket.sequence for ticket in handed if ticket.sequence is not None]
        used = sum(len(sequence.request.prompt_ids) + len(sequence.output_ids) for sequence in running)
        return len(running), waiting + len(handed) - len(running), min(1.0, used / sum(each.plan.pool_tokens for each in self.engines))

    def warm_up_pending(self) -> int:
        """Warm-up units not yet finished."""
        return 0 if self.warm_up_done.is_set() else len(self._warm_up) + 1

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
                idle = not self._waiting and not any(s.has_work() for s in self.schedulers)
                while idle and not self._stopped and not self._warm_up:
                    self._changed.wait()
                    idle = not self._waiting and not any(s.has_work() for s in self.schedulers)
                if self._stopped:
                    return
            if idle:
                self._warm_up_next()
                continue
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

    def _warm_up_next(self) -> None:
        unit = self._warm_up.popleft()
        try:
            unit(self.scheduler)
        except Exception:  # noqa: BLE001 - a shape left cold compiles when a request meets it
            log.exception("a warm-up step failed; the shapes it compiles will compile on first use")
        if not self._warm_up:
            log.info("background warm-up done: compiled %d steps in %.1f s", len(self.engine.compilations),
                     time.perf_counter() - self.warm_up_started)
            self.warm_up_done.set()

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
