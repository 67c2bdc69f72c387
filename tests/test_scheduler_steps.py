"""rz.scheduler: the one generation loop, over a fake engine (no model): what each step does, in order."""

import pytest

from rz.generation import GenerationRequest
from rz.request import FinishReason, RequestOptions
from rz.scheduler import Scheduler
from support.fake_engine import CHUNK, FAIL_ADMIT, FakeEngine


def _request(max_tokens: int = 3, first_token: int = 1, n_chunks: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt_ids=(first_token,) + (2,) * (CHUNK * n_chunks - 1), options=RequestOptions(max_tokens=max_tokens))


@pytest.fixture
def engine():
    engine = FakeEngine(n_slots=2)
    engine.go.release(1000)  # decode calls run without waiting
    return engine


def test_a_batch_is_admitted_whole_before_the_first_decode_call(engine):
    scheduler = Scheduler(engine)
    for _ in range(3):
        scheduler.add(_request())
    events = scheduler.step()
    assert engine.log == ["chunk", "admit", "chunk", "admit"]  # the third waits for a slot
    assert [event.token_id for event in events] == [7, 7]
    scheduler.step()
    assert engine.log[-1] == "step"


def test_admitting_and_decoding_alternate_while_sequences_run(engine):
    scheduler = Scheduler(engine, prefill_budget_s=0.0)
    scheduler.add(_request(max_tokens=10))
    scheduler.step()
    scheduler.add(_request(n_chunks=2))
    for _ in range(4):
        scheduler.step()
    assert engine.log == ["chunk", "admit", "step", "chunk", "step", "chunk", "admit"]


def test_every_request_runs_to_its_finish_reason(engine):
    scheduler = Scheduler(engine)
    sequences = [scheduler.add(_request(max_tokens=n)) for n in (1, 4, 2)]
    texts = {}
    for event in scheduler.drain():
        texts[event.sequence] = texts.get(event.sequence, "") + event.text
    assert [s.finish_reason for s in sequences] == [FinishReason.LENGTH] * 3
    assert [texts[s] for s in sequences] == ["x", "xxxx", "xx"]
    assert not scheduler.has_work() and engine.free_slots() == 2


def test_a_failing_prefill_ends_only_its_request_and_drain_raises_it(engine):
    scheduler = Scheduler(engine)
    bad, good = scheduler.add(_request(first_token=FAIL_ADMIT)), scheduler.add(_request())
    events = scheduler.step()
    failed = [event for event in events if event.sequence is bad]
    assert failed[0].finish_reason == FinishReason.ERROR and "prefill exploded" in str(failed[0].error)
    assert good.output_ids == [7] and engine.free_slots() == 1
    scheduler.add(_request(first_token=FAIL_ADMIT))
    with pytest.raises(RuntimeError, match="prefill exploded"):
        list(scheduler.drain())


def test_a_request_asked_to_stop_leaves_before_it_is_prefilled(engine):
    scheduler = Scheduler(engine)
    sequence = scheduler.add(_request())
    sequence.stop_requested = True
    (event,) = scheduler.step()
    assert event.sequence is sequence and event.finish_reason == FinishReason.CANCELLED
    assert "chunk" not in engine.log and not scheduler.has_work()


def test_cancel_frees_the_slot_at_once(engine):
    scheduler = Scheduler(engine)
    sequence = scheduler.add(_request(max_tokens=10))
    scheduler.step()
    scheduler.cancel(sequence)
    assert sequence.finish_reason == FinishReason.CANCELLED and engine.free_slots() == 2 and not scheduler.has_work()
