"""The engine loop around a real engine (SmolLM2 135M): what a fake engine cannot show."""


import rz
from rz.buckets import Buckets
from rz.constraints import constraint_of
from rz.engine import Engine
from rz.generation import GenerationRequest, StepEvent
from rz.model_files import smollm2_135m_path
from rz.request import RequestOptions, SamplingParams
from rz.scheduler import Scheduler
from rz.server import scheduler
from rz.server.scheduler import EngineLoop

GREEDY = SamplingParams(temperature=0.0)


def _options(params: SamplingParams = GREEDY, **options) -> RequestOptions:
    return RequestOptions(sampling=params, **options)


def _tokens(ticket) -> list[int]:
    tokens = []
    while True:
        item = ticket.events.get(timeout=120)
        assert isinstance(item, StepEvent), item
        tokens.append(item.token_id)
        if item.finish_reason is not None:
            return tokens


def test_decode_steps_run_between_prompt_chunks_only_once_a_chunk_has_run(monkeypatch):
    """Steps are dispatched asynchronously: a chunk launched is not a chunk done. The loop must wait
    for each chunk before it judges its budget, or every chunk is launched at once and the
    running streams stall for the whole prompt. And both sequences get what they get alone."""
    llm = rz.LLM(smollm2_135m_path(), n_ctx=256)
    engine = Engine(llm.model, llm.tokenizer, 256, 2, buckets=Buckets.for_context(256, largest=32))
    running = GenerationRequest(prompt_ids=tuple(llm.tokenize("Hello, my name is")), options=_options(max_tokens=40, ignore_eos=True))
    # cache_prompt=False: run alone first, the long prompt would otherwise be reused whole, in one chunk.
    long = GenerationRequest(
        prompt_ids=tuple(llm.tokenize("The history of the printing press " * 14)),
        options=_options(max_tokens=4, ignore_eos=True, cache_prompt=False),
    )
    alone = {}
    one_at_a_time = Scheduler(engine)
    for request in (running, long):
        one_at_a_time.add(request)
        alone[request] = [event.token_id for event in one_at_a_time.drain()]

    monkeypatch.setattr(scheduler, "PREFILL_BUDGET_S", 0.0)  # a decode step after every chunk
    loop = EngineLoop(engine, max_queue=2)
    chunks_done_at_steps = []
    decode = engine.decode

    def watched_decode():
        if loop.scheduler._admission is not None:
            chunks_done_at_steps.append(all(leaf.is_ready() for leaf in [loop.scheduler._admission.logits]))
        return decode()

    engine.decode = watched_decode
    loop.start()
    try:
        first = loop.submit(running)
        assert first.events.get(timeout=120).token_id == alone[running][0]
        second = loop.submit(long)
        assert _tokens(second) == alone[long]
        assert alone[running][1:] == _tokens(first)
    finally:
        loop.cancel_all()
        loop.stop()
    assert len(chunks_done_at_steps) >= 2 and all(chunks_done_at_steps)


def test_the_loop_warms_up_while_idle_and_serves_a_request_in_between():
    """A server reports SERVING after warm_up_units' first units; the loop runs the rest when no
    request waits. A request that arrives meanwhile gets the tokens it gets on a warm engine, its
    prefix stays cached, and the warm-up still ends with every shape compiled."""
    from rz.warm_up import FIRST_REQUEST_UNITS, warm_up_units

    llm = rz.LLM(smollm2_135m_path(), n_ctx=256)
    engine = Engine(llm.model, llm.tokenizer, 256, 2, buckets=Buckets.for_context(256, largest=32))
    units = warm_up_units(engine)
    first = Scheduler(engine)
    for unit in units[:FIRST_REQUEST_UNITS]:
        unit(first)
    request = GenerationRequest(prompt_ids=tuple(llm.tokenize("Hello, my name is")), options=_options(max_tokens=6, ignore_eos=True))
    loop = EngineLoop(engine, max_queue=2, warm_up=units[FIRST_REQUEST_UNITS:])
    assert not loop.warm_up_done.is_set()
    loop.start()
    try:
        served = _tokens(loop.submit(request))
        assert loop.warm_up_done.wait(timeout=600)
        compiled = engine.compiled_variants()
        hits = engine.blocks.stats().hit_tokens
        assert _tokens(loop.submit(request)) == served
        assert engine.compiled_variants() == compiled
        # The warm-up forgot its own prompts' blocks at its end, not the request's.
        assert engine.blocks.stats().hit_tokens > hits
    finally:
        loop.stop()


def test_warm_up_compiles_every_shape_that_serving_meets():
    """After warm_up, prompts of every length (one chunk or several, every context bucket), every
    batch size, log-probabilities and structured output compile nothing new."""
    from rz.warm_up import warm_up

    llm = rz.LLM(smollm2_135m_path(), n_ctx=256)
    engine = Engine(llm.model, llm.tokenizer, 256, 2, buckets=Buckets.for_context(256, largest=32))
    warm_up(engine)
    compiled = engine.compiled_variants()
    scheduler = Scheduler(engine)
    for length in (1, 5, 9, 20, 40, 100, 200, 250):
        for params in (GREEDY, SamplingParams(temperature=0.0, n_logprobs=2)):
            request = GenerationRequest(prompt_ids=(1,) * length, options=_options(params, max_tokens=3, ignore_eos=True))
            others = [GenerationRequest(prompt_ids=(2, 3), options=_options(max_tokens=5, ignore_eos=True))]
            for r in [request] + others:
                scheduler.add(r)
            list(scheduler.drain())
    constrained = _options(max_tokens=4, constraint=constraint_of({"type": "json_object"}))
    for rows in (1, 2):
        for _ in range(rows):
            scheduler.add(GenerationRequest(prompt_ids=(1, 2, 3), options=constrained))
        list(scheduler.drain())
    assert engine.compiled_variants() == compiled
