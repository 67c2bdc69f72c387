"""The engine loop's bookkeeping with a fake engine: queue bounds, cancellation, failures, shutdown."""

import contextlib
import time

import pytest

from rz.generation import GenerationRequest, StepEvent
from rz.request import RequestOptions
from rz.server.scheduler import (
    CLIENT_CANCELLED,
    Cancelled,
    EngineFailure,
    PREFILL_BUDGET_S,
    EngineLoop,
    OverCapacityError,
    ShuttingDownError,
)
from support.fake_engine import CHUNK, FAIL_ADMIT, FakeEngine


def _request(max_tokens: int = 1000, first_token: int = 1, n_chunks: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt_ids=(first_token,) + (2,) * (CHUNK * n_chunks - 1), options=RequestOptions(max_tokens=max_tokens))


def _final(ticket):
    """Read a ticket's items up to its final one; that item."""
    while True:
        item = ticket.events.get(timeout=10)
        if not isinstance(item, StepEvent) or item.finish_reason is not None:
            return item


@pytest.fixture
def engine():
    return FakeEngine(n_slots=2)


def test_long_prefills_take_turns_with_decode_steps():
    """While a sequence is decoding, prefills past the budget wait for its next step, so one long
    prompt after another does not stall its stream."""
    engine = FakeEngine(n_slots=3)
    engine.prefill_seconds = 1.5 * PREFILL_BUDGET_S
    with _loop_over(engine, max_queue=4) as loop:
        running = loop.submit(_request())
        assert running.events.get(timeout=10).token_id == 7
        engine.go.release()  # let the running sequence step while the others wait
        assert running.events.get(timeout=10).token_id == 7
        late = [loop.submit(_request(max_tokens=2)) for _ in range(2)]
        for _ in range(4):
            engine.go.release()
        assert all(_final(ticket).finish_reason == "length" for ticket in late)
        admits = [i for i, entry in enumerate(engine.log) if entry == "admit"]
        assert len(admits) == 3 and "step" in engine.log[admits[1] : admits[2]]


@pytest.fixture
def slow_prefill_engine():
    """Two slots, prompt chunks past the prefill budget."""
    engine = FakeEngine(n_slots=2)
    engine.prefill_seconds = 1.5 * PREFILL_BUDGET_S
    return engine


def _start_one_stream(loop, engine):
    """One sequence decoding (its first token read), the engine's log cleared."""
    running = loop.submit(_request())
    assert running.events.get(timeout=10).token_id == 7
    engine.log.clear()
    return running


def test_a_long_prompt_takes_turns_with_decode_steps_chunk_by_chunk(slow_prefill_engine):
    """One prompt of several chunks, each past the budget, does not stall a running stream until
    it is all prefilled: a decode step runs between every two of its chunks."""
    engine = slow_prefill_engine
    with _loop_over(engine) as loop:
        _start_one_stream(loop, engine)
        long = loop.submit(_request(max_tokens=1, n_chunks=3))
        for _ in range(3):
            engine.go.release()
        assert _final(long).finish_reason == "length"
        first = engine.log.index("chunk")  # the loop may have been in a step when it arrived
        assert engine.log[first : first + 6] == ["chunk", "step", "chunk", "step", "chunk", "admit"]


def test_a_request_cancelled_while_its_prompt_is_prefilled_never_takes_a_slot(slow_prefill_engine):
    engine = slow_prefill_engine
    with _loop_over(engine) as loop:
        _start_one_stream(loop, engine)
        long = loop.submit(_request(n_chunks=3))
        engine.go.release()  # the step the loop was waiting in
        deadline = time.monotonic() + 10
        while "chunk" not in engine.log and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.cancel(long, CLIENT_CANCELLED)
        assert long.events.get(timeout=10) == Cancelled(CLIENT_CANCELLED)
        for _ in range(2):
            engine.go.release()
        while engine.log.count("step") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not loop.drain(0)  # the running one goes on
        assert "admit" not in engine.log and engine.log.count("chunk") == 1
        assert engine.free_slots() == 1 and long.done


@contextlib.contextmanager
def _loop_over(engine, max_queue: int = 2):
    """A started EngineLoop over the fake engine; at exit every request ended and the loop stopped."""
    loop = EngineLoop(engine, max_queue=max_queue)
    loop.start()
    try:
        yield loop
    finally:
        loop.cancel_all()
        for _ in range(10):
            engine.go.release()
        loop.stop()


@pytest.fixture
def loop(engine):
    with _loop_over(engine) as loop:
        yield loop


def test_slots_plus_queue_bound_the_requests_in_flight(loop):
    tickets = [loop.submit(_request()) for _ in range(4)]
    with pytest.raises(OverCapacityError, match="retry later"):
        loop.submit(_request())
    loop.cancel(tickets[-1], CLIENT_CANCELLED)
    assert tickets[-1].events.get(timeout=10) == Cancelled(CLIENT_CANCELLED)  # at once, while queued
    loop.submit(_request())  # its place is free again


def test_a_cancelled_request_frees_its_slot_before_the_next_step(loop, engine):
    first, second = loop.submit(_request()), loop.submit(_request())
    assert first.events.get(timeout=10).token_id == 7 and second.events.get(timeout=10).token_id == 7
    queued = loop.submit(_request(max_tokens=1))
    loop.cancel(first, CLIENT_CANCELLED)
    assert first.events.get(timeout=10) == Cancelled(CLIENT_CANCELLED)
    engine.go.release()  # one step: the queued request must already have taken the freed slot
    assert _final(queued).finish_reason == "length"
    assert first.sequence.finish_reason == "cancelled" and first.sequence not in engine.slots


def test_a_failing_prefill_fails_only_its_request(loop, engine):
    bad = loop.submit(_request(first_token=FAIL_ADMIT))
    good = loop.submit(_request(max_tokens=2))
    assert isinstance(_final(bad), EngineFailure)
    engine.go.release()
    assert _final(good).finish_reason == "length"
    assert engine.free_slots() == 2


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(loop, engine):
    running = loop.submit(_request())
    assert running.events.get(timeout=10).token_id == 7
    engine.fail_next_step = True
    engine.go.release()
    assert isinstance(_final(running), EngineFailure)
    after = loop.submit(_request(max_tokens=2))
    engine.go.release()
    assert _final(after).finish_reason == "length"


def test_cancel_all_ends_running_and_queued_requests(loop, engine):
    running = [loop.submit(_request()) for _ in range(2)]
    for ticket in running:
        ticket.events.get(timeout=10)
    queued = loop.submit(_request())
    assert loop.load() == (2, 1, 2 * (3 + 1) / (2 * 64))  # the loop waits in a step: 2 generating, 1 queued
    loop.stop_accepting()
    with pytest.raises(ShuttingDownError):
        loop.submit(_request())
    assert not loop.drain(0.05)
    loop.cancel_all()
    assert isinstance(_final(queued), ShuttingDownError)
    engine.go.release()  # the loop wakes from its step and frees the cancelled slots
    for ticket in running:
        assert _final(ticket).finish_reason == "cancelled"
    assert loop.drain(10) and engine.free_slots() == 2
